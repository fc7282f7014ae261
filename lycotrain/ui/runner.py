"""Run ``lycotrain`` commands in a child process, so the app itself never loads torch or the models.

Inspect, check, merge, extract, resize, lint and generate all load heavy libraries; each runs as the same
command a user would type, and the page shows its output. A failure becomes one line (the command's own
``error: ...`` message), never a traceback.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass


@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def message(self) -> str:
        """A one-line reason for a failure: the CLI's ``error:`` line, else the last line of its output."""
        lines = [line.strip() for line in (self.stderr + "\n" + self.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:")]
        last = errors[-1] if errors else (lines[-1] if lines else f"exit code {self.returncode}")
        return f"`lycotrain {self.args[0]}` failed: {last.removeprefix('error:').strip()}"

    @property
    def command_line(self) -> str:
        return "lycotrain " + " ".join(shlex.quote(a) for a in self.args)


def run_cli(args: list[str], timeout_s: float = 3600.0) -> CliResult:
    """``lycotrain ARGS`` in a subprocess; a timeout is reported like any other failure."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "lycotrain.cli", *args], capture_output=True, text=True,
                              timeout=timeout_s, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return CliResult(args, 124, "", f"error: no answer within {timeout_s:.0f} s; try the command in a terminal")
    return CliResult(args, done.returncode, done.stdout, done.stderr)

