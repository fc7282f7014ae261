"""``lycotrain lint DATASET``: the pre-flight report of an image dataset, readable or as JSON; with a model
(``--model`` or the config's ``model.path``) also the estimate of the GPU memory the training settings need.

The dataset and training settings come from the config schema's defaults, a config file (``--config``), the
shorthand options below and ``--set section.key=value``, in that order. Exit status: 0 when no problem is
found, 1 when the report lists problems (the dataset is still usable), 2 when it cannot be used at all.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="image folder (N_name sub-folders repeat N times) or dataset TOML")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--config", help="a training config whose [dataset] and [training] settings apply")
    parser.add_argument("--model", help="model.path, for the memory estimate (read from its config files only)")
    parser.add_argument("--resolution", type=int, help="dataset.resolution")
    parser.add_argument("--min-bucket", type=int, help="dataset.min_bucket_resolution")
    parser.add_argument("--max-bucket", type=int, help="dataset.max_bucket_resolution")
    parser.add_argument("--bucket-step", type=int, help="dataset.bucket_step")
    parser.add_argument("--no-upscale", action="store_true", help="dataset.no_upscale = true")
    parser.add_argument("--caption-extension", help="dataset.caption_extension (default .txt)")
    parser.add_argument("--batch-size", type=int, help="training.batch_size")
    parser.add_argument("--grad-accum", type=int, help="training.grad_accum")
    parser.add_argument("--epochs", type=int, help="training.epochs")
    parser.add_argument("--max-steps", type=int, help="training.max_steps")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any config field, e.g. --set dataset.keep_tokens=1 (repeatable)")


_SHORTHANDS = {"resolution": "dataset.resolution", "min_bucket": "dataset.min_bucket_resolution",
               "max_bucket": "dataset.max_bucket_resolution", "bucket_step": "dataset.bucket_step",
               "batch_size": "training.batch_size", "grad_accum": "training.grad_accum",
               "epochs": "training.epochs", "max_steps": "training.max_steps"}


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    overrides = [f"dataset.path={json.dumps(args.dataset)}"]
    overrides += [f"{key}={getattr(args, name)}" for name, key in _SHORTHANDS.items()
                  if getattr(args, name) is not None]
    if args.no_upscale:
        overrides.append("dataset.no_upscale=true")
    if args.model is not None:
        overrides.append(f"model.path={json.dumps(args.model)}")
    if args.caption_extension is not None:
        overrides.append(f"dataset.caption_extension={json.dumps(args.caption_extension)}")
    return overrides + list(args.set)


def run(args: argparse.Namespace) -> int:
    from lycotrain.diffusion.lint import lint_config
    from lycotrain.engine.config import load_config

    config = load_config(args.config, overrides_from_args(args))
    _, report = lint_config(config)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 1 if report.problem_count else 0
