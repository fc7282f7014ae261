"""Helpers for image-training tests: a tiny SD1 model, a generated dataset, small fast configs, learning runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lycotrain.diffusion.task import DiffusionTask
from lycotrain.engine.config import Config
from lycotrain.engine.events import iter_events
from lycotrain.engine.loop import train

LEARNING_STEPS = 40
LEARNING_LR = {"unet": 1e-2, "te": 5e-2}  # the text encoders move the loss only through cross-attention


def build_assets(root: Path, images: int = 2) -> tuple[Path, Path]:
    """(tiny SD1 model folder, dataset folder) under ``root``."""
    from lycotrain.diffusion.demo_data import make_demo_dataset
    from lycotrain.diffusion.models import build_tiny_pipeline

    model = build_tiny_pipeline(root / "model", arch="sd1")
    data = make_demo_dataset(root / "data", count=images)
    return model, data


def image_config(run_dir: Path, model: Path, data: Path, **tables: dict[str, Any]) -> Config:
    """A 32 px, few-step config; ``tables`` update the defaults per table (``training={"lr": 1e-3}``)."""
    base: dict[str, dict[str, Any]] = {
        "model": {"path": str(model)},
        "dataset": {"path": str(data), "resolution": 32, "min_bucket_resolution": 32, "max_bucket_resolution": 64,
                    "bucket_step": 8},
        "network": {"method": "lora", "rank": 4, "alpha": 4.0, "block_size": 4},
        "training": {"max_steps": 10, "batch_size": 2, "lr": 1e-2},
        "sample": {"at_end": False},
    }
    for table, values in tables.items():
        base[table] = {**base.get(table, {}), **values}
    return Config.from_dict({"run_dir": str(run_dir), **base})


def losses(run_dir: Path) -> list[float]:
    return [e["loss"] for e in iter_events(run_dir) if e["type"] == "step"]


def events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    return [e for e in iter_events(run_dir) if e["type"] == kind]


class DisconnectedTask(DiffusionTask):
    """The same run with every adapter at multiplier 0: the adapters are out of the forward pass (a zero term
    keeps the loss attached to them, so the run goes through and shows what the loss does without them)."""

    def setup(self, config, accelerator, events):
        super().setup(config, accelerator, events)
        self.adapters.set_multiplier(0.0)

    def training_step(self, batch, step):
        return super().training_step(batch, step) + 0.0 * sum(p.sum() for p in self.adapters.parameters())


def learning_run(run_dir: Path, model: Path, data: Path, method: str, component: str,
                 task: DiffusionTask | None = None, **tables: dict[str, Any]) -> tuple[float, float]:
    """(first, last) training-set loss of a fixed-noise run of ``method`` on ``component`` ("unet", or "te":
    every text encoder of the model); ``tables`` update the config as in ``image_config``."""
    network = {"method": method, "train_unet": component == "unet", "train_text_encoder": component == "te"}
    training = {"max_steps": LEARNING_STEPS, "lr": LEARNING_LR[component], "fixed_noise": True,
                "max_grad_norm": 0.0, **tables.pop("training", {})}
    config = image_config(run_dir, model, data, network=network, training=training, **tables)
    result = train(config, task=task)
    assert result["status"] == "finished", result["message"]
    curve = losses(run_dir)
    return curve[0], curve[-1]
