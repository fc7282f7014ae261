"""Checkpoints: ``RUN_DIR/checkpoints/step-N/`` holds the user-facing adapter file(s) and ``training_state.pt``
(adapter tensors and task state, optimizer, scheduler, position in the data, RNG states of every process).

A checkpoint folder is written under a hidden temporary name and renamed into place, so ``step-N`` either
holds a complete checkpoint or does not exist; a run killed mid-write leaves only a hidden ``.step-N.*``
folder, which is ignored and removed by the next run.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lycotrain.atomic import publish_mode
from lycotrain.errors import LycotrainError

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class Position:
    """Where the run is: optimizer steps done, the current epoch, micro-batches of that epoch consumed."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    total_steps: int = 0


# ---- folders --------------------------------------------------------------------------------------------------
def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            match = _NAME.match(folder.name)
            if match and (folder / STATE_FILE).is_file():
                found.append((int(match.group(1)), folder))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete what a killed run may have left half-written: hidden checkpoint folders (``.step-N.*``) and the
    hidden temporary files of atomic writes (``.NAME.*.tmp``, see lycotrain/atomic.py)."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    leftovers = list(root.glob(".step-*")) if root.is_dir() else []
    leftovers += [p for p in run_dir.rglob(".*.tmp") if p.is_file() and not any(part in leftovers for part in p.parents)]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return leftovers


def write_checkpoint(run_dir: str | Path, step: int, fill: Callable[[Path], None], keep_last: int) -> Path:
    """Create ``checkpoints/step-<step>`` atomically with ``fill(folder)``; keep the newest ``keep_last``."""
    root = Path(run_dir) / CHECKPOINTS
    target = root / f"step-{step}"
    if (target / STATE_FILE).is_file():  # this step is already saved (e.g. a stop right after a periodic save)
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.", dir=root))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        publish_mode(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last > 0:
        for _, old in checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


# ---- RNG -------------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's random generators (python, numpy, torch CPU and CUDA), in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the training state ---------------------------------------------------------------------------------------
def save_training_state(folder: Path, *, position: Position, optimizer: torch.optim.Optimizer,
                        scheduler: Any, task_state: dict[str, Any], rng_states: list[dict[str, Any]]) -> None:
    torch.save({"position": asdict(position), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "task": task_state, "rng": rng_states}, folder / STATE_FILE)


def load_training_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LycotrainError(f"cannot read the checkpoint {path} ({exc}); delete that folder to resume from "
                             "the one before") from None
    state["position"] = Position(**state["position"])
    return state
