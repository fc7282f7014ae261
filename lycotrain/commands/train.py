"""``lycotrain train CONFIG.toml [--set key=value ...]`` and ``lycotrain train --resume RUN_DIR [--add-steps N]``.

The progress bar is fed by the same events the GUI reads from ``RUN_DIR/events.jsonl``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lycotrain.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config (optional with --set or --resume)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set training.lr=1e-4 (TOML syntax; repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    parser.add_argument("--add-steps", type=int, default=0, metavar="N",
                        help="with --resume: train N more steps (the LR schedule is rebuilt for the new total)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (events are still written)")


def load_run_config(args: argparse.Namespace):
    """The config of a new run (CONFIG + overrides) or of the run to resume (RUN_DIR/config.toml + overrides)."""
    from lycotrain.engine.config import load_config

    if args.add_steps and not args.resume:
        raise ConfigError("--add-steps needs --resume RUN_DIR (it extends an existing run)")
    if args.add_steps < 0:
        raise ConfigError(f"--add-steps must be positive, got {args.add_steps}")
    if args.resume:
        run_dir = Path(args.resume)
        if args.config is None and not (run_dir / "config.toml").is_file():
            raise ConfigError(f"--resume {run_dir}: no run there (no config.toml); give the run_dir of an earlier "
                              "`lycotrain train`")
        config = load_config(args.config or run_dir / "config.toml", args.overrides)
        config.run_dir = str(run_dir)  # the folder may have been moved since
        return config
    if args.config is None and not args.overrides:
        raise ConfigError("give a config file (lycotrain train CONFIG.toml), --set fields, or --resume RUN_DIR")
    return load_config(args.config, args.overrides)


def run(args: argparse.Namespace) -> int:
    from lycotrain.engine.loop import train

    config = load_run_config(args)
    bar = None if args.no_progress else ProgressBar()
    result = train(config, resume=bool(args.resume), add_steps=args.add_steps, listener=bar)
    if bar is not None:
        bar.close()
    if result["status"] == "failed":
        print(f"error: {result['message']}", file=sys.stderr)
        return 1
    print(f"{result['status']} at step {result['step']}; run folder: {config.run_dir}")
    for name, path in result["outputs"].items():
        print(f"  {name:<10} {path}")
    if result["status"] == "stopped":
        print(f"continue with: lycotrain train --resume {config.run_dir}")
    return 0


class ProgressBar:
    """A tqdm bar driven by training events; other events print as lines above it."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        from tqdm import tqdm

        kind = event["type"]
        if kind == "start":
            self.close()
            self.bar = tqdm(total=event["total_steps"], initial=event["resumed_from"] or 0, unit="step",
                            dynamic_ncols=True)
        elif kind == "step" and self.bar is not None:
            self.bar.update(event["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}", refresh=False)
        elif kind in ("preview", "checkpoint", "warning"):  # an error is printed once, by the command, at the end
            detail = event.get("message") or event.get("path") or ", ".join(event.get("images", [])) or \
                "; ".join(t.get("output", "") for t in event.get("texts", []))
            (self.bar.write if self.bar is not None else print)(f"[{kind}] {detail}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
