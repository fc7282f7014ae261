"""``lycotrain merge FILE --model PATH --out PATH``: bake an adapter file into a base model.

The output is one original-layout ``.safetensors`` checkpoint (what WebUIs load) when ``--out`` ends in
``.safetensors``, else a diffusers folder. The base may be either kind (or ``builtin:tiny-sd1``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lycotrain.commands.check import add_family_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="adapter file (.safetensors, kohya/LyCORIS or lycotrain native)")
    parser.add_argument("--model", required=True, help="base model: diffusers folder, single file, builtin:...")
    parser.add_argument("--out", required=True, help="output: a folder, or a .safetensors single file")
    parser.add_argument("--multiplier", type=float, default=1.0, help="adapter strength (default 1)")
    add_family_argument(parser)


def run(args: argparse.Namespace) -> int:
    from lycotrain.diffusion.models import load_pipeline
    from lycotrain.diffusion.single_file import save_single_file
    from lycotrain.errors import FormatError
    from lycotrain.formats.convert import merge_file
    from lycotrain.formats.kohya import read_adapter_file

    file = read_adapter_file(args.file)
    out = Path(args.out)
    if out.exists() and out.is_dir() and any(out.iterdir()):
        raise FormatError(f"--out {out} is a folder that is not empty; choose a new path")
    model = load_pipeline(args.model, family=args.family)
    count = merge_file(model.components(), file, args.multiplier)
    if out.suffix == ".safetensors":
        save_single_file(model.pipeline, out, model.family)
    else:
        model.pipeline.save_pretrained(out, safe_serialization=True)
    print(f"merged {count} modules of {args.file} (multiplier {args.multiplier}) into {args.model} -> {out}")
    return 0
