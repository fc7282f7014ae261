"""Optional TensorBoard logs (``save.tensorboard``): the run's events, written as TensorBoard records.

The sink is an events listener: the loop attaches it to its EventWriter, so TensorBoard sees exactly what
``events.jsonl`` holds, with no second path through the loop. Records go to ``RUN_DIR/tensorboard/``:

* ``loss``, ``it_s`` and ``lr/group_<i>`` (one per optimizer parameter group, in the task's order: for image
  runs the UNet group first, then the text encoder's) from each ``step`` event;
* ``preview/<i>`` images (the i-th preview prompt) from each image ``preview`` event, at its step;
* ``adalora/budget`` from AdaLoRA's ``ranks`` event (the total rank budget once the pattern is fixed).

``tensorboard`` is not a dependency of lycotrain: :func:`require_tensorboard` turns a missing package into a
ConfigError before training starts. A failing write (a full disk) must never end a run: the sink reports one
``warning`` event through ``warn`` and stops writing; training goes on.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from lycotrain.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
FLUSH_SECS = 10  # a TensorBoard open on a running job shows new points within seconds


def require_tensorboard() -> type:
    """The SummaryWriter class; a ConfigError naming the field and the fix when tensorboard is not usable."""
    try:
        return importlib.import_module("torch.utils.tensorboard").SummaryWriter
    except Exception as exc:  # ImportError, or a broken install raising something else at import time
        raise ConfigError(
            f"save.tensorboard = true needs the tensorboard package, which is not usable here "
            f"({type(exc).__name__}: {exc}); install it with `pip install tensorboard` or set "
            f"save.tensorboard = false") from None


class TensorBoardSink:
    """Turns events into TensorBoard records in ``run_dir/tensorboard``.

    ``purge_step``: records from an earlier attempt at steps >= it are hidden (TensorBoard's purge), so a run
    resumed from the checkpoint at step N passes N + 1 and shows no duplicate points past its checkpoint.
    ``warn`` receives the one message sent when writing fails.
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None, warn: Callable[[str], None]) -> None:
        summary_writer = require_tensorboard()
        self.run_dir = Path(run_dir)
        self.warn = warn
        self.writer: Any = None
        try:
            self.writer = summary_writer(str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step,
                                         flush_secs=FLUSH_SECS)
        except Exception as exc:  # noqa: BLE001 - a full disk must not end the run
            self._stop(exc)

    def __call__(self, event: dict[str, Any]) -> None:
        handler = {"step": self._step, "preview": self._preview, "ranks": self._ranks,
                   "end": self._close}.get(event["type"])
        if handler is None or self.writer is None:
            return
        try:
            handler(event)
        except Exception as exc:  # noqa: BLE001 - a full disk or an unreadable preview must not end the run
            self._stop(exc)

    def _step(self, event: dict[str, Any]) -> None:
        step = event["step"]
        self.writer.add_scalar("loss", event["loss"], step)
        self.writer.add_scalar("it_s", event["it_s"], step)
        for index, lr in enumerate(event["lrs"]):
            self.writer.add_scalar(f"lr/group_{index}", lr, step)

    def _preview(self, event: dict[str, Any]) -> None:
        for index, path in enumerate(event.get("images", [])):  # text previews carry no images
            with Image.open(self.run_dir / path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"preview/{index}", pixels, event["step"], dataformats="HWC")

    def _ranks(self, event: dict[str, Any]) -> None:
        self.writer.add_scalar("adalora/budget", event["budget"], event["step"])

    def _close(self, event: dict[str, Any]) -> None:
        writer, self.writer = self.writer, None
        writer.close()

    def _stop(self, exc: Exception) -> None:
        """Stop logging for good and warn once; the writer's background thread may be dead, so it is dropped
        without a close."""
        self.writer = None
        self.warn(f"TensorBoard logging stopped ({type(exc).__name__}: {exc}); training continues and "
                  f"events.jsonl still records every step. Free disk space in {self.run_dir} or set "
                  "save.tensorboard = false")
