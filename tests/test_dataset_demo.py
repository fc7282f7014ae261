"""The generated demo dataset: deterministic, captioned with the trigger word, several buckets, no defects."""

from __future__ import annotations

from _dataset_images import small_config
from lycotrain.diffusion.dataset import ImageDataset
from lycotrain.diffusion.demo_data import DEMO_TRIGGER, make_demo_dataset
from lycotrain.diffusion.lint import lint_dataset


def test_demo_dataset_is_deterministic_and_clean(tmp_path):
    first, second = make_demo_dataset(tmp_path / "a"), make_demo_dataset(tmp_path / "b")
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir()) and len(files) == 20
    assert all((first / name).read_bytes() == (second / name).read_bytes() for name in files)
    config = small_config(first, resolution=64, min_bucket_resolution=32, max_bucket_resolution=128, bucket_step=16)
    dataset = ImageDataset.from_config(config)
    assert all(r.caption.startswith(f"{DEMO_TRIGGER}, ") for r in dataset.records)
    report = lint_dataset(dataset, batch_size=2)
    assert report.problem_count == 0 and not report.notes
    assert len(report.buckets) >= 3  # square, landscape and portrait
    assert len({r.pixel_hash for r in dataset.records}) == 10
