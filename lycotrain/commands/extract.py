"""``lycotrain extract``: a LoRA by SVD, from any adapter file (``FILE --model PATH``) or from the difference of
two checkpoints (``--base A --tuned B``), at a fixed ``--rank`` or the smallest rank keeping ``--energy``."""

from __future__ import annotations

import argparse
from pathlib import Path

from lycotrain.commands.check import add_family_argument


def add_rank_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="rank of every module")
    size.add_argument("--energy", type=float,
                      help="per module, the smallest rank keeping this fraction (0-1] of sum(singular values^2)")
    parser.add_argument("--out", required=True, help="output .safetensors")
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", help="adapter file to turn into a LoRA (needs --model)")
    parser.add_argument("--model", help="base model of FILE: diffusers folder, single file, builtin:...")
    parser.add_argument("--base", help="base checkpoint (with --tuned)")
    parser.add_argument("--tuned", help="fine-tuned checkpoint (with --base)")
    add_family_argument(parser)
    add_rank_arguments(parser)


def report(extraction, out: Path) -> None:
    errors = extraction.errors
    worst = max(errors, key=errors.get) if errors else None
    print(f"wrote {out}: {len(errors)} modules; relative error max {extraction.max_error:.3g}"
          + (f" ({worst})" if worst else "")
          + f", mean {sum(errors.values()) / max(len(errors), 1):.3g}")


def run(args: argparse.Namespace) -> int:
    from lycotrain.diffusion.models import load_pipeline
    from lycotrain.errors import FormatError
    from lycotrain.formats.convert import extract_from_checkpoints, extract_from_file

    out = Path(args.out)
    if args.file is not None:
        if args.model is None or args.base or args.tuned:
            raise FormatError("extract FILE needs --model (the base model of FILE) and no --base/--tuned")
        extraction = extract_from_file(args.file, load_pipeline(args.model, family=args.family).components(),
                                       rank=args.rank, energy=args.energy)
    elif args.base and args.tuned:
        extraction = extract_from_checkpoints(load_pipeline(args.base, family=args.family).components(),
                                              load_pipeline(args.tuned, family=args.family).components(),
                                              rank=args.rank, energy=args.energy,
                                              output_name=out.name.removesuffix(".safetensors"))
    else:
        raise FormatError("give an adapter FILE with --model, or --base and --tuned checkpoints")
    extraction.save(out, args.dtype)
    report(extraction, out)
    return 0
