"""Helpers for image-training tests: a tiny SD1 model, a generated dataset, small fast configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lycotrain.engine.config import Config
from lycotrain.engine.events import iter_events


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
