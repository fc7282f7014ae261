"""``lycotrain check FILE --model PATH [--json]``: what A1111, Forge and ComfyUI will do with an adapter file."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="adapter file (.safetensors, kohya/LyCORIS format)")
    parser.add_argument("--model", required=True,
                        help="base model: diffusers folder, single-file checkpoint, or builtin:tiny-sd1")
    add_family_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def add_family_argument(parser: argparse.ArgumentParser) -> None:
    """``--family``: what ``model.family`` is in a config (SD 2.x single files need it)."""
    parser.add_argument("--family", choices=("auto", "sd1", "sd2", "sd2-v", "sdxl"), default="auto",
                        help="model family (default: detected); an SD 2.x single file needs sd2 or sd2-v")


def run(args: argparse.Namespace) -> int:
    from lycotrain.diffusion.models import load_pipeline
    from lycotrain.formats.compat import check_file
    from lycotrain.formats.kohya import read_adapter_file

    file = read_adapter_file(args.file)  # fail on a bad file before loading a model
    report = check_file(file, load_pipeline(args.model, family=args.family).components())
    print(report.to_json() if args.json else report.to_text())
    return 0
