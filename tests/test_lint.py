"""The pre-flight report catches each defect and gets the step arithmetic exactly right; the CLI prints it."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from _dataset_images import small_config, write_image, write_images
from lycotrain.cli import main
from lycotrain.diffusion.dataset import ImageDataset
from lycotrain.diffusion.lint import lint_dataset


@pytest.fixture
def messy(tmp_path):
    """One of each defect, in a kohya layout."""
    folder = tmp_path / "data" / "5_sks"
    write_images(folder, 3, caption="sks, a thing")
    write_image(folder / "nocap.png", colour=(1, 1, 1))
    write_image(folder / "blank.png", colour=(2, 2, 2), caption="  \n")
    write_image(folder / "mismatch.png", colour=(3, 3, 3))
    (folder / "mismatch.caption").write_text("caption with the wrong extension")
    (folder / "ghost.txt").write_text("caption of a deleted image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    write_image(folder / "tiny.png", size=(12, 12), colour=(4, 4, 4), caption="tiny")
    shutil.copy(folder / "img00.png", folder / "copy_of_img00.png")
    write_image(folder / "tall.png", size=(24, 64), colour=(5, 5, 5), caption="tall")  # alone in its bucket
    return tmp_path / "data"


def test_report_catches_each_defect(messy):
    dataset = ImageDataset.from_config(small_config(messy, trigger_word="sks"))
    report = lint_dataset(dataset, batch_size=4)
    names = lambda items, key: sorted(x[key].rsplit("/", 1)[-1] for x in items)  # noqa: E731
    assert names(report.missing_captions, "image") == ["copy_of_img00.png", "mismatch.png", "nocap.png"]
    assert all(x["used_instead"] == "sks" for x in report.missing_captions)
    assert names(report.empty_captions, "image") == ["blank.png"]
    orphans = {x["caption"].rsplit("/", 1)[-1]: x["reason"] for x in report.orphan_captions}
    assert set(orphans) == {"mismatch.caption", "ghost.txt"}
    assert "extension mismatch" in orphans["mismatch.caption"] and "no image named ghost" in orphans["ghost.txt"]
    assert names(report.unreadable, "image") == ["broken.jpg"] and report.unreadable[0]["reason"]
    assert [(x["image"].rsplit("/", 1)[-1], x["size"]) for x in report.below_smallest_bucket] == [("tiny.png", "12x12")]
    assert "upscaled" in report.below_smallest_bucket[0]["action"]
    tall = next(r for r in dataset.records if r.path.name == "tall.png").placement.bucket
    assert report.starved_buckets == [{"bucket": f"{tall[0]}x{tall[1]}", "images": 1, "batch_size": 4}]
    assert [sorted(p.rsplit("/", 1)[-1] for p in group) for group in report.duplicates] == \
        [["copy_of_img00.png", "img00.png"]]
    assert report.problem_count == 3 + 1 + 2 + 1 + 1 + 1 + 1
    text = report.format()
    for fragment in ("Missing captions (3)", "nocap.png -> trained as \"sks\"", "Unreadable images (skipped) (1)",
                     "mismatch.caption: extension mismatch", "Duplicate images (1)", "5 repeats"):
        assert fragment in text
    json.dumps(report.to_dict())  # JSON-ready for the preflight event and the GUI


def test_no_upscale_small_images_are_reported_with_their_fate(tmp_path):
    write_image(tmp_path / "ok.png", size=(32, 32), caption="ok")
    write_image(tmp_path / "small.png", size=(20, 12), colour=(9, 9, 9), caption="small")
    write_image(tmp_path / "sliver.png", size=(40, 4), colour=(8, 8, 8), caption="sliver")
    dataset = ImageDataset.from_config(small_config(tmp_path, no_upscale=True))
    actions = {x["image"].rsplit("/", 1)[-1]: x["action"] for x in lint_dataset(dataset).below_smallest_bucket}
    assert "own 16x8 bucket" in actions["small.png"] and "skipped" in actions["sliver.png"]
    assert sorted(r.path.name for r in dataset.records) == ["ok.png", "small.png"]


def test_step_arithmetic(tmp_path):
    write_images(tmp_path / "10_a", 3)  # bucket 32x32: 3 x 10 = 30 samples
    write_image(tmp_path / "3_b" / "wide.png", size=(64, 32), caption="w")  # bucket 40x24: 1 x 3 = 3 samples
    dataset = ImageDataset.from_config(small_config(tmp_path))
    report = lint_dataset(dataset, batch_size=4, grad_accum=3, epochs=5)
    steps = report.steps
    assert steps.batches_per_epoch == math.ceil(30 / 4) + math.ceil(3 / 4) == 9 == len(dataset.sampler(4))
    assert steps.steps_per_epoch == 3 and steps.total_steps == 15 and steps.epochs == 5
    assert "30 samples / batch 4 = 8 batches" in "\n".join(steps.arithmetic)
    assert "optimizer steps per epoch = ceil(9 / grad_accum 3) = 3" in steps.arithmetic
    assert steps.arithmetic[-1] == "total = 3 steps x 5 epochs = 15 steps"
    capped = lint_dataset(dataset, batch_size=4, grad_accum=3, epochs=5, max_steps=7).steps
    assert capped.total_steps == 7 and capped.epochs == 3
    two = lint_dataset(dataset, batch_size=4, num_processes=2).steps
    assert two.batches_per_epoch == 5 == math.ceil(len(dataset.sampler(4)) / 2)
    assert [f.samples for f in report.folders] == [30, 3] and [f.repeats for f in report.folders] == [10, 3]


def test_cli_lint_json_and_exit_codes(tmp_path, isolated_home, capsys):
    write_images(tmp_path / "clean", 2, size=(64, 64))
    args = ["lint", "--resolution", "64", "--min-bucket", "32", "--max-bucket", "128", "--bucket-step", "16"]
    assert main(args + [str(tmp_path / "clean"), "--json", "--epochs", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["problem_count"] == 0 and data["steps"]["total_steps"] == 4
    assert list((tmp_path / "home" / "cache" / "scan").glob("*.json"))
    write_image(tmp_path / "clean" / "nocap.png", size=(64, 64), colour=(0, 0, 0))
    assert main(args + [str(tmp_path / "clean")]) == 1
    assert "Missing captions (1)" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(args + [str(tmp_path / "empty")]) == 2
    assert "No images found in" in capsys.readouterr().err
