"""The Task protocol: what a kind of training (image, text) gives the shared loop.

The loop (``engine/loop.py``) owns everything that is the same for every task: accelerate, the optimizer and
schedule, gradient accumulation and clipping, gradient averaging across processes, checkpoints and exact
resume, stop requests, events, and the order of hooks. A task owns its model, data, loss, previews and
adapter files.

Call order, once: ``setup`` -> ``param_groups`` -> (resume: ``load_state_dict``) -> ``preview(0)`` if
``sample.at_start``; then per epoch ``dataloader(epoch)`` and per micro-batch ``training_step``; after every
optimizer step ``after_optimizer_step``; every N steps ``preview`` and ``save_adapter`` (+ ``state_dict``)
into a checkpoint; at the end ``save_adapter(run_dir)`` (the export) and ``preview(step, exported=...)``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from lycotrain.engine.config import Config
    from lycotrain.engine.events import EventWriter


@runtime_checkable
class Task(Protocol):
    def setup(self, config: "Config", accelerator: "Accelerator", events: "EventWriter") -> None:
        """Load the model, inject adapters, read the data (emit the ``preflight`` event), build caches.

        Runs on every process; only the main process's ``events`` write to disk. Model weights go to
        ``accelerator.device``; adapter parameters stay fp32 under mixed precision.
        """

    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters as optimizer groups: ``{"params": [...], "lr": float}`` (lr optional)."""

    def dataloader(self, epoch: int) -> "DataLoader":
        """This epoch's batches for ONE process (the loop shards them across processes and skips the ones
        already done on resume). The order must depend only on (config.seed, epoch), never on the global RNG,
        so a resumed run sees the same batches. The loop reads ``batch_sampler``, ``dataset``, ``collate_fn``
        and ``num_workers`` from it."""

    def training_step(self, batch: Any, step: int) -> "torch.Tensor":
        """Scalar loss of one micro-batch, regularisers included (already on the accelerator's device).
        Runs under ``accelerator.autocast()``; ``step`` is the number of optimizer steps done so far."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called by the loop after every optimizer step, before the gradients are cleared (AdaLoRA's rank
        allocator lives here and reads them); ``step`` counts from 1."""

    def preview(self, step: int, exported: dict[str, Path] | None = None) -> dict[str, Any]:
        """Render previews (main process only). Returns the ``preview`` event fields: ``images`` (paths
        relative to the run folder) or ``texts``. With ``exported`` (the final files), render from those
        files reloaded, not from the in-memory adapters. Must not use the global RNG."""

    def save_adapter(self, out_dir: Path, step: int) -> dict[str, Path]:
        """Write the user-facing adapter file(s) into ``out_dir`` (main process only): name -> path."""

    def state_dict(self) -> dict[str, Any]:
        """Everything the task needs to resume exactly: adapter tensors and any task state (allocators)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""


# task name (config.task) -> (module, class); imported on use so an image run never imports the text stack
TASKS: dict[str, tuple[str, str]] = {
    "image": ("lycotrain.diffusion.task", "DiffusionTask"),
    "text": ("lycotrain.text.task", "TextTask"),
}


def make_task(name: str) -> Task:
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)()
