"""``lycotrain build-tiny --arch sd1|sdxl|llama --out DIR``: write a tiny random-weight model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

ARCHS = ("sd1", "sdxl", "llama")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=ARCHS, default="sd1", help="model family (default: sd1)")
    parser.add_argument("--out", required=True, help="folder to write (an ordinary diffusers/transformers folder)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed; the same seed gives the same weights")


def run(args: argparse.Namespace) -> int:
    from lycotrain.errors import ConfigError

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # never mix two models in one folder
        raise ConfigError(f"--out {out} exists and is not an empty folder; choose a new folder")
    if args.arch == "llama":
        from lycotrain.text.models import build_tiny_llama

        path = build_tiny_llama(args.out, seed=args.seed)
    else:
        from lycotrain.diffusion.models import build_tiny_pipeline

        path = build_tiny_pipeline(args.out, arch=args.arch, seed=args.seed)
    print(f"tiny {args.arch} model written to {path}")
    return 0
