"""Dataset scanning (folders, N_name repeats, dataset TOML), missing captions, corrupt images, the batch
format, and exact resume of the batch order."""

from __future__ import annotations

import os
import random
import re
from collections import Counter

import pytest
import torch
from PIL import Image

from _dataset_images import epoch_batches, small_config, write_image, write_images
from lycotrain.diffusion.dataset import ImageDataset, resolve_dataset
from lycotrain.diffusion.lint import lint_dataset
from lycotrain.errors import DatasetError


def _epoch_counts(dataset: ImageDataset, batch_size: int = 2) -> Counter:
    return Counter(path for batch in epoch_batches(dataset, batch_size) for path in batch["paths"])


def test_plain_folder_with_captions(tmp_path):
    write_images(tmp_path, 3, caption="a red thing")
    dataset = ImageDataset.from_config(small_config(tmp_path))
    assert len(dataset) == 3 and len(dataset.spec.subsets) == 1
    assert all(r.caption == "a red thing" and r.caption_status == "ok" for r in dataset.records)
    assert set(_epoch_counts(dataset).values()) == {1}


def test_repeat_folders_count_and_other_folders_are_reported(tmp_path):
    write_images(tmp_path / "10_sks", 3)
    write_images(tmp_path / "2_style", 2, prefix="s")
    write_images(tmp_path / "misc", 1, prefix="m")
    dataset = ImageDataset.from_config(small_config(tmp_path))
    assert sorted(s.repeats for s in dataset.spec.subsets) == [2, 10]
    counts = _epoch_counts(dataset, batch_size=4)
    assert sum(counts.values()) == 3 * 10 + 2 * 2
    assert {c for p, c in counts.items() if "10_sks" in p} == {10}
    assert any("misc" in note and "N_name" in note for note in dataset.spec.notes)


def test_pointing_at_a_repeat_folder_itself_is_explained(tmp_path):
    write_images(tmp_path / "10_sks", 2)
    spec = resolve_dataset(tmp_path / "10_sks")
    assert spec.subsets[0].repeats == 1
    assert any(str(tmp_path) in note and "10 times" in note for note in spec.notes)


def test_empty_folder_and_wrong_level_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"No images found in .*empty; expected images \(.*\) or N_name sub-folders"):
        resolve_dataset(tmp_path / "empty")
    write_images(tmp_path / "project" / "photos", 2)  # an image folder without the N_ prefix
    with pytest.raises(DatasetError, match="rename it to 1_photos") as info:
        resolve_dataset(tmp_path / "project")
    assert str(tmp_path / "project" / "photos") in str(info.value)
    write_images(tmp_path / "top" / "img" / "10_sks", 2)  # the parent of the N_name folders' parent
    with pytest.raises(DatasetError, match=re.escape(f"set dataset.path to {tmp_path / 'top' / 'img'}")):
        resolve_dataset(tmp_path / "top")
    with pytest.raises(DatasetError, match="does not exist"):
        resolve_dataset(tmp_path / "nowhere")


def test_missing_caption_is_never_the_folder_name(tmp_path):
    folder = tmp_path / "10_sks dog"
    write_image(folder / "a.png", caption="a dog on grass")
    write_image(folder / "b.png", colour=(0, 90, 0))
    (folder / "b.caption").write_text("a dog in snow")  # wrong extension: not read
    dataset = ImageDataset.from_config(small_config(tmp_path, trigger_word="sks"))
    by_name = {r.path.name: r for r in dataset.records}
    assert by_name["b.png"].caption_status == "missing" and by_name["b.png"].caption == ""
    captions = {c for batch in epoch_batches(dataset, 1) for c in batch["captions"]}
    assert captions == {"sks, a dog on grass", "sks"}  # the explicit trigger word, never "sks dog"
    assert [p.name for p, _ in dataset.scan.orphan_captions] == ["b.caption"]


def test_configured_caption_extension_is_used(tmp_path):
    write_image(tmp_path / "a.png", caption="from caption file", caption_extension=".caption")
    dataset = ImageDataset.from_config(small_config(tmp_path, caption_extension="caption"))
    assert dataset.records[0].caption == "from caption file" and not dataset.scan.orphan_captions


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    write_images(tmp_path, 2)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    dataset = ImageDataset.from_config(small_config(tmp_path))
    assert len(dataset) == 2
    assert [p.name for p, _ in dataset.scan.unreadable] == ["broken.png"]
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="1 could not be read .*x.jpg"):
        ImageDataset.from_config(small_config(tmp_path / "only"))


def test_dataset_toml_subsets(tmp_path):
    write_images(tmp_path / "train", 2, caption="a, b, c")
    for image in write_images(tmp_path / "reg", 3, prefix="r"):
        image.with_suffix(".txt").unlink()  # class images without captions: class_token is their caption
    (tmp_path / "data.toml").write_text(
        '[[subsets]]\npath = "train"\nrepeats = 3\ntrigger_word = "sks"\nshuffle_caption = true\n'
        'keep_tokens = 1\n\n'
        '[[subsets]]\npath = "reg"\nis_regularization = true\nprior_loss_weight = 0.5\nclass_token = "a dog"\n')
    dataset = ImageDataset.from_config(small_config(tmp_path / "data.toml", caption_dropout=0.0))
    train, reg = dataset.spec.subsets
    assert (train.repeats, train.captions.trigger_word, train.captions.shuffle, train.captions.keep_tokens) == \
        (3, "sks", True, 1)
    assert reg.is_regularization and reg.loss_weight == 0.5 and reg.repeats == 1 and not reg.captions.shuffle
    weights = Counter()
    for batch in epoch_batches(dataset, 2):
        for path, weight, caption in zip(batch["paths"], batch["loss_weights"].tolist(), batch["captions"]):
            weights[weight] += 1
            assert caption.startswith("sks, a") if "train" in path else caption == "a dog"
    assert weights == {1.0: 6, 0.5: 3}
    report = lint_dataset(dataset)
    assert [x["used_instead"] for x in report.missing_captions] == ["a dog"] * 3
    assert [(f.regularization, f.loss_weight, f.samples) for f in report.folders] == [(False, 1.0, 6), (True, 0.5, 3)]


@pytest.mark.parametrize("body, message", [
    ('[[subsets]]\npath = "train"\nnum_repeats = 2\n', "unknown key.*num_repeats"),
    ('[[subsets]]\npath = "train"\nprior_loss_weight = 2.0\n', "regularization subsets only"),
    ('[[subsets]]\npath = "train"\nrepeats = 0\n', "repeats = 0 is out of range"),
    ('[[subsets]]\npath = "nope"\n', "is not a folder"),
    ('[general]\nresolution = 512\n', "only \\[\\[subsets\\]\\]"),
])
def test_dataset_toml_errors_name_the_key(tmp_path, body, message):
    write_images(tmp_path / "train", 1)
    (tmp_path / "data.toml").write_text(body)
    with pytest.raises(DatasetError, match=message):
        resolve_dataset(tmp_path / "data.toml")


def test_batch_format(tmp_path):
    write_image(tmp_path / "wide.png", size=(64, 32), caption="wide")
    write_image(tmp_path / "wide2.png", size=(64, 32), colour=(1, 2, 3), caption="wide too")
    dataset = ImageDataset.from_config(small_config(tmp_path))
    batch = next(epoch_batches(dataset, 2))
    assert batch["pixel_values"].shape == (2, 3, 24, 40)  # bucket 40x24 for a 2:1 image at 32² area
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].abs().max() <= 1.0
    assert batch["original_size"].tolist() == [[32, 64]] * 2  # (height, width)
    assert batch["target_size"].tolist() == [[24, 40]] * 2
    assert batch["crop_top_left"].tolist() == [[0, 4]] * 2  # resized to 48x24, centred crop of 40 wide
    assert sorted(batch["captions"]) == ["wide", "wide too"] and batch["loss_weights"].tolist() == [1.0, 1.0]


def test_flip_mirrors_the_pixels_and_the_crop(tmp_path):
    image = Image.new("RGB", (32, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 32))  # left half red
    image.save(tmp_path / "half.png")
    (tmp_path / "half.txt").write_text("half")
    dataset = ImageDataset.from_config(small_config(tmp_path, flip=True, repeats=20))
    left_reds = [bool(b["pixel_values"][0, 0, 16, 2] > 0) for b in epoch_batches(dataset, 1)]
    assert 3 < sum(left_reds) < 17  # mirrored about half the time


def test_batches_are_a_pure_function_of_seed_epoch_and_position(tmp_path):
    """What exact resume rests on: a fresh dataset (a resumed process) skipping the batches already done
    sees the same batches, with the same flips, crops and captions, whatever the global RNG did meanwhile."""
    write_images(tmp_path / "3_a", 5, caption="one, two, three, four")
    write_image(tmp_path / "3_a" / "tall.png", size=(32, 64), caption="tall, thin")
    config = small_config(tmp_path, flip=True, crop="random", shuffle_caption=True, caption_dropout=0.2)

    def batches(epoch: int, skip: int = 0) -> list[tuple]:
        dataset = ImageDataset.from_config(config, seed=7)
        return [(b["paths"], b["captions"], b["pixel_values"], b["crop_top_left"])
                for b in epoch_batches(dataset, 2, epoch, skip)]

    straight = batches(1)
    random.seed(123), torch.manual_seed(123)
    resumed = batches(1, skip=3)
    assert len(resumed) == len(straight) - 3 > 0
    for a, b in zip(straight[3:], resumed):
        assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    other_epoch = batches(2)
    assert [a[0] for a in other_epoch] != [a[0] for a in straight]
    other_seed = ImageDataset.from_config(config, seed=8)
    assert [b["paths"] for b in epoch_batches(other_seed, 2, 1)] != [a[0] for a in straight]


def test_text_cache_needs_fixed_captions(tmp_path):
    write_images(tmp_path, 2, caption="a, b")
    fixed = ImageDataset.from_config(small_config(tmp_path, trigger_word="t", caption_dropout=0.1))
    assert fixed.caption_texts() == ["", "t, a, b"]
    shuffled = ImageDataset.from_config(small_config(tmp_path, shuffle_caption=True))
    with pytest.raises(DatasetError, match="cannot be cached"):
        shuffled.caption_texts()


def test_scan_cache_skips_unchanged_images_and_rereads_edited_ones(tmp_path, monkeypatch):
    import lycotrain.diffusion.dataset as dataset_module

    paths = write_images(tmp_path / "data", 3)
    decoded: list[str] = []
    real = dataset_module.inspect_image
    monkeypatch.setattr(dataset_module, "inspect_image", lambda p: decoded.append(p.name) or real(p))
    config = small_config(tmp_path / "data")
    first = ImageDataset.from_config(config, scan_cache=tmp_path / "scan")
    assert len(decoded) == 3
    second = ImageDataset.from_config(config, scan_cache=tmp_path / "scan")
    assert len(decoded) == 3 and second.records == first.records
    Image.new("RGB", (40, 32), (0, 0, 0)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # a different modification time, whatever the clock's resolution
    third = ImageDataset.from_config(config, scan_cache=tmp_path / "scan")
    assert decoded[3:] == [paths[1].name]
    assert next(r for r in third.records if r.path == paths[1]).width == 40
