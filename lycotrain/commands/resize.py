"""``lycotrain resize FILE --rank R | --energy E --out OUT``: change the rank of a LoRA file (SVD)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lycotrain.commands.extract import add_rank_arguments, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="LoRA file (.safetensors)")
    add_rank_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lycotrain.formats.convert import resize_lora

    extraction = resize_lora(args.file, rank=args.rank, energy=args.energy)
    extraction.save(args.out, args.dtype)
    report(extraction, Path(args.out))
    return 0
