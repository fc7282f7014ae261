"""Helpers for the dataset tests: tiny images and captions written into a folder."""

from __future__ import annotations

from pathlib import Path

from typing import Any, Iterator

from PIL import Image
from torch.utils.data import DataLoader

from lycotrain.diffusion.dataset import ImageDataset, collate
from lycotrain.engine.config import DatasetConfig


def write_image(path: Path, size: tuple[int, int] = (32, 32), colour: tuple[int, int, int] = (200, 30, 30),
                caption: str | None = None, caption_extension: str = ".txt") -> Path:
    """A solid-colour PNG (or JPEG by suffix) and, when ``caption`` is given, its caption file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(caption_extension).write_text(caption, encoding="utf-8")
    return path


def write_images(folder: Path, count: int, size: tuple[int, int] = (32, 32), caption: str = "a photo",
                 prefix: str = "img") -> list[Path]:
    """``count`` distinct images (different colours, so no duplicates) with captions."""
    return [write_image(folder / f"{prefix}{i:02d}.png", size, (10 + 20 * i, 100, 255 - 20 * i), caption)
            for i in range(count)]


def small_config(path: Path | str, **fields) -> DatasetConfig:
    """A dataset config with buckets sized for 32-64 px images."""
    base = dict(path=str(path), resolution=32, min_bucket_resolution=16, max_bucket_resolution=64, bucket_step=8)
    return DatasetConfig(**{**base, **fields})


def epoch_batches(dataset: ImageDataset, batch_size: int, epoch: int = 0, skip: int = 0) -> Iterator[dict[str, Any]]:
    """Collated batches of ``epoch`` from batch ``skip`` on, loaded the way the training loop loads them."""
    batches = dataset.sampler(batch_size).epoch_batches(epoch)[skip:]
    return iter(DataLoader(dataset, batch_sampler=batches, collate_fn=collate))
