"""``lycotrain`` command line. Each subcommand lives in ``lycotrain/commands/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int``; modules are imported only when their command runs,
so ``lycotrain --help`` stays fast."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lycotrain.errors import LycotrainError

COMMANDS: dict[str, str] = {
    "train": "train an adapter from a TOML config (image or text)",
    "demo": "build the tiny model and dataset, train, and show where everything is",
    "app": "serve the browser GUI",
    "lint": "pre-flight report of an image dataset",
    "check": "what A1111, Forge and ComfyUI will do with an adapter file",
    "inspect": "method, modules, ranks and metadata of an adapter file",
    "merge": "merge an adapter file into a base model",
    "extract": "extract a LoRA from an adapter file or from two checkpoints (SVD)",
    "resize": "change the rank of a LoRA file (SVD)",
    "generate": "greedy generation with a causal LM and an optional adapter",
    "build-tiny": "build a tiny random-weight model (sd1, sdxl or llama) as an ordinary folder",
}


def _command_module(name: str):
    return importlib.import_module(f"lycotrain.commands.{name.replace('-', '_')}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lycotrain", description="Train adapters: LoRA, LoHa, LoKr, OFT and HRA "
                                     "for Stable Diffusion (WebUI .safetensors); LoRA, AdaLoRA, Llama-Adapter and "
                                     "X-LoRA for language models (PEFT folders).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the command being run pays for its imports
            _command_module(name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        status = int(_command_module(args.command).run(args) or 0)
        sys.stdout.flush()  # a reader that left early (`lycotrain inspect FILE | head`) fails here, not at exit
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to say to a closed pipe
        return 1
    except LycotrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
