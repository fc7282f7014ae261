"""``lycotrain inspect FILE [--json]``: method, modules, ranks, dtypes and metadata of an adapter file."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="adapter file (.safetensors, kohya/LyCORIS or lycotrain native)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from lycotrain.formats.convert import summarize, summary_text

    summary = summarize(args.file)
    print(json.dumps(summary, indent=2) if args.json else summary_text(summary))
    return 0
