"""``lycotrain app [--host H] [--port P] [--auth USER:PASS] [--share] [--runs DIR]``: serve the browser GUI."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this login (recommended off-loopback)")
    parser.add_argument("--share", action="store_true", help="ask Gradio for a public share link (off by default)")
    parser.add_argument("--runs", default="runs",
                        help="folder of the runs (job registry, uploads); a restarted app finds its runs here")


def run(args: argparse.Namespace) -> int:
    from lycotrain.ui.app import serve  # gradio loads only when the app is asked for

    serve(host=args.host, port=args.port, auth=args.auth, share=args.share, runs_root=args.runs)
    return 0
