"""Progress events: one JSON object per line in ``RUN_DIR/events.jsonl``.

The training process appends; the CLI progress bar and the GUI read the same file, so a page reload or a
second browser re-attaches to a running job just by reading it again.

Every event has ``type`` and ``time`` (unix seconds). Types and their fields:

* ``start``      run_dir, task ("image" | "text"), method, total_steps, config (dict)
* ``preflight``  report (dict: the dataset report, see diffusion/dataset.py or text/dataset.py)
* ``step``       step, total_steps, epoch, loss, lr, lrs (every parameter group's lr, in order), it_s, eta_s
* ``preview``    step, images (list of paths relative to run_dir) or texts (list of {prompt, output})
* ``checkpoint`` step, path (relative to run_dir)
* ``ranks``      step, budget, ranks (dict module -> kept rank): AdaLoRA's rank pattern once it is fixed
* ``warning``    message
* ``error``      message (a user-facing message; the traceback goes to RUN_DIR/error.log)
* ``end``        status ("finished" | "stopped" | "failed"), step, outputs (dict name -> relative path)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

EVENTS_FILE = "events.jsonl"


class EventWriter:
    """Appends events; each line is flushed and fsynced so readers never see half a line for long.

    ``listener`` (optional) also receives every event in-process (the CLI's progress bar).
    """

    def __init__(self, run_dir: str | Path, listener: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.path = Path(run_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.listener = listener

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type_, "time": time.time(), **fields}
        line = json.dumps(event, default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        if self.listener is not None:
            self.listener(event)
        return event


def read_events(run_dir: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events appended since byte ``offset``, and the new offset. A trailing partial line is left for later."""
    path = Path(run_dir) / EVENTS_FILE
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    events = [json.loads(line) for line in data[:end].splitlines() if line.strip()]
    return events, offset + end


def iter_events(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    events, _ = read_events(run_dir)
    yield from events
