"""``lycotrain demo [--method M] [--out DIR] [--steps N]``: the whole image pipeline on the built-in tiny model.

Builds the tiny SD1 model into DIR/base and a generated dataset with captions into DIR/dataset, trains
(LoHa by default) on the CPU into DIR/run — the WebUI ``.safetensors``, previews, events, sidecars — and prints
where everything is. ``--task text`` runs the text demo instead (``lycotrain.text.demo``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from lycotrain.engine.config import IMAGE_METHODS, TEXT_METHODS, Config

DEMO_STEPS = 300
DEMO_PROMPTS = [{"prompt": "lyco, red circle, white background", "seed": 1, "steps": 12, "cfg": 5.0},
                {"prompt": "lyco, blue square, black background", "seed": 2, "steps": 12, "cfg": 5.0}]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("image", "text"), default="image")
    parser.add_argument("--method", choices=sorted(set(IMAGE_METHODS + TEXT_METHODS)),
                        help="adapter method (image default: loha)")
    parser.add_argument("--out", help="output folder (default: demo-out; the text demo: demo-out/text)")
    parser.add_argument("--steps", type=int, default=None, help=f"training steps (image default: {DEMO_STEPS})")


def demo_config(out: Path, method: str, steps: int) -> Config:
    """The demo run: 64 px tiny SD1, attention + MLP adapters, previews at the start, halfway and the end."""
    return Config.from_dict({
        "run_dir": str(out / "run"), "seed": 0,
        "model": {"path": str(out / "base")},
        "dataset": {"path": str(out / "dataset"), "resolution": 64, "min_bucket_resolution": 32,
                    "max_bucket_resolution": 128, "bucket_step": 16},
        "network": {"method": method, "rank": 4, "alpha": 4.0, "block_size": 4},
        "training": {"max_steps": steps, "batch_size": 2, "lr": 3e-3, "scheduler": "cosine",
                     "warmup_steps": min(10, steps // 10)},
        "sample": {"prompts": DEMO_PROMPTS, "at_start": True, "every_n_steps": max(1, steps // 2),
                   "sampler": "euler_a"},
        "save": {"every_n_steps": max(1, steps // 2), "output_name": f"demo-{method}",
                 "activation_text": "lyco"},
    })


def run(args: argparse.Namespace) -> int:
    if args.task == "text":
        from lycotrain.text.demo import run_demo

        return run_demo(args)
    from lycotrain.commands.train import ProgressBar
    from lycotrain.diffusion.demo_data import make_demo_dataset
    from lycotrain.diffusion.models import build_tiny_pipeline
    from lycotrain.engine.loop import train
    from lycotrain.errors import ConfigError

    method = args.method or "loha"
    if method not in IMAGE_METHODS:
        raise ConfigError(f"--method {method} is a text method; the image demo takes {', '.join(IMAGE_METHODS)} "
                          "(or add --task text)")
    out = Path(args.out or "demo-out")
    if (out / "base" / "config.json").is_file() and not (out / "base" / "model_index.json").is_file():
        raise ConfigError(f"{out / 'base'} holds the text demo's model; give the image demo another --out folder")
    config = demo_config(out, method, args.steps or DEMO_STEPS)
    if not (out / "base" / "model_index.json").is_file():
        build_tiny_pipeline(out / "base", arch="sd1")
    make_demo_dataset(out / "dataset")
    if (out / "run").exists():
        shutil.rmtree(out / "run")  # the demo's own previous run: start clean
    bar = ProgressBar()
    result = train(config, listener=bar)
    bar.close()
    if result["status"] != "finished":
        print(f"demo {result['status']}: {result['message']}")
        return 1
    run_dir = out / "run"
    print(f"\nlycotrain demo ({method}) finished in {run_dir}:")
    for name, path in result["outputs"].items():
        print(f"  {name:<10} {path}")
    print(f"  {'previews':<10} {run_dir / 'previews'}")
    print(f"  {'events':<10} {run_dir / 'events.jsonl'}")
    print(f"  {'config':<10} {run_dir / 'config.toml'}  (rerun: lycotrain train {run_dir / 'config.toml'})")
    print(f"  {'base':<10} {out / 'base'}   dataset: {out / 'dataset'}")
    return 0
