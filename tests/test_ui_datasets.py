"""Uploads are untrusted: names sanitized, zip-slip refused, non-images rejected with a reason; the caption
editor's bulk operations change exactly the captions they should."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from lycotrain.errors import DatasetError
from lycotrain.ui import datasets


def _png(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_names_are_reduced_to_safe_file_names() -> None:
    assert datasets.sanitize_name("../../etc/passwd") == "passwd"
    assert datasets.sanitize_name("C:\\Users\\x\\cat photo.png") == "cat photo.png"
    assert datasets.sanitize_name(".hidden") == "hidden"
    assert datasets.sanitize_name("a<b>|c.png") == "a_b__c.png"
    assert datasets.sanitize_name("..") == "file"
    assert datasets.safe_relative("../evil.png") is None
    assert datasets.safe_relative("/abs/evil.png") is None
    assert datasets.safe_relative("sub/../../evil.png") is None
    assert str(datasets.safe_relative("10_cat/img 1.png")) == "10_cat/img 1.png"


def test_upload_keeps_images_and_their_captions_and_rejects_the_rest(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "cat.png").write_bytes(_png())
    (src / "cat.txt").write_text("a cat")
    (src / "notes.txt").write_text("not a caption of anything")
    (src / "fake.png").write_text("this is text, not a png")
    dest = tmp_path / "dest"
    result = datasets.import_uploads([str(p) for p in sorted(src.iterdir())], dest)
    assert result.images == ["cat.png"] and result.captions == ["cat.txt"] and not result.uncaptioned
    reasons = dict(result.rejected)
    assert "not a readable image" in reasons["fake.png"]
    assert "without an image" in reasons["notes.txt"]
    assert sorted(p.name for p in dest.iterdir()) == ["cat.png", "cat.txt"]
    assert "rejected `fake.png`" in result.summary()


def test_zip_slip_entries_are_never_written(tmp_path: Path) -> None:
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../escape.png", _png())
        z.writestr("/abs.png", _png())
        z.writestr("5_dog/dog.png", _png("blue"))
        z.writestr("5_dog/dog.txt", "a dog")
        z.writestr("readme.md", "hello")
    dest = tmp_path / "uploads" / "one"
    result = datasets.import_uploads([str(archive)], dest)
    assert result.images == ["5_dog/dog.png"] and result.captions == ["5_dog/dog.txt"]
    assert len(result.rejected) == 3
    assert not (tmp_path / "uploads" / "escape.png").exists() and not Path("/abs.png").exists()
    assert all("zip-slip" in reason for name, reason in result.rejected if "escape" in name or "abs" in name)


def test_caption_editor_prefix_and_find_replace(tmp_path: Path) -> None:
    for name, caption in (("a", "red circle"), ("b", "lyco, blue square"), ("c", None)):
        (tmp_path / f"{name}.png").write_bytes(_png())
        if caption is not None:
            (tmp_path / f"{name}.txt").write_text(caption)
    assert datasets.add_prefix(tmp_path, ".txt", "lyco") == 2  # b already starts with it
    assert datasets.add_prefix(tmp_path, ".txt", "lyco") == 0  # idempotent
    assert datasets.read_caption(tmp_path / "a.png", ".txt") == "lyco, red circle"
    assert datasets.read_caption(tmp_path / "c.png", ".txt") == "lyco"
    assert datasets.find_replace(tmp_path, ".txt", "circle", "ring") == 1
    assert datasets.read_caption(tmp_path / "a.png", ".txt") == "lyco, red ring"
    datasets.save_caption(tmp_path / "b.png", ".txt", "  edited  ")
    assert (tmp_path / "b.txt").read_text() == "edited\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_run_names_drop_the_upload_timestamp(tmp_path: Path) -> None:
    folder = datasets.new_upload_folder(tmp_path, "demo-dataset")
    assert datasets.display_name(folder) == "demo-dataset"
    assert datasets.display_name("/data/cats.jsonl") == "cats"


def test_caption_editor_refuses_an_empty_dataset_path(tmp_path: Path, monkeypatch) -> None:
    """An empty field is not the app's working folder: the bulk edits would write captions all over it."""
    (tmp_path / "logo.png").write_bytes(_png())
    monkeypatch.chdir(tmp_path)
    for folder in ("", "  "):
        with pytest.raises(DatasetError, match="dataset.path is empty"):
            datasets.add_prefix(folder, ".txt", "lyco")
        with pytest.raises(DatasetError, match="dataset.path is empty"):
            datasets.list_images(folder)
    assert not (tmp_path / "logo.txt").exists()


def test_names_in_other_scripts_stay_distinct_and_clashing_names_never_overwrite(tmp_path: Path) -> None:
    """日本.png and 中国.png were both saved as __.png: the first image was silently replaced by the second."""
    src = tmp_path / "src"
    src.mkdir()
    for name, color, caption in (("日本", "red", "japan"), ("中国", "blue", "china"), ("😀", "green", "smile"),
                                 ("😃", "white", "grin")):
        (src / f"{name}.png").write_bytes(_png(color))
        (src / f"{name}.txt").write_text(caption)
    dest = tmp_path / "dest"
    result = datasets.import_uploads([str(p) for p in sorted(src.iterdir())], dest)
    assert len(result.images) == 4 and len(result.captions) == 4 and not result.rejected
    assert datasets.sanitize_name("mein präset") == "mein präset"
    assert (dest / "日本.txt").read_text() == "japan" and (dest / "中国.txt").read_text() == "china"
    pairs = {Image.open(dest / image).getpixel((0, 0)): (dest / image).with_suffix(".txt").read_text()
             for image in result.images}
    assert pairs == {(255, 0, 0): "japan", (0, 0, 255): "china", (0, 128, 0): "smile", (255, 255, 255): "grin"}
    assert len(result.renamed) == 1 and "renamed" in result.summary()


def test_a_broken_zip_is_rejected_and_the_rest_of_the_upload_kept(tmp_path: Path) -> None:
    (tmp_path / "broken.zip").write_bytes(b"PK not really a zip")
    (tmp_path / "cat.png").write_bytes(_png())
    result = datasets.import_uploads([str(tmp_path / "broken.zip"), str(tmp_path / "cat.png")], tmp_path / "dest")
    assert result.images == ["cat.png"]
    assert result.rejected == [("broken.zip", "not a valid zip file; re-create it or upload the images directly")]


def test_an_empty_caption_extension_is_a_message_not_a_crash(tmp_path: Path) -> None:
    """An emptied caption extension field crashed the caption editor and the run with "Invalid suffix '.'"."""
    from lycotrain.engine.config import load_config
    from lycotrain.errors import ConfigError

    (tmp_path / "a.png").write_bytes(_png())
    for extension in ("", " ", "."):
        with pytest.raises(DatasetError, match="caption_extension is empty"):
            datasets.read_caption(tmp_path / "a.png", extension)
        with pytest.raises(ConfigError, match="dataset.caption_extension"):
            load_config(None, ["run_dir=\"r\"", f"dataset.caption_extension=\"{extension}\""])
    assert datasets.caption_path(tmp_path / "a.png", "caption") == tmp_path / "a.caption"


def test_a_zip_of_one_folder_is_trained_from_inside_that_folder(tmp_path: Path) -> None:
    """A zipped folder unpacked to upload/<folder>/, and dataset.path named the upload folder, where the dataset
    reader finds no images; an N_name repeat folder keeps its parent, which its repeats need."""
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("set/10_style/a.png", _png())
        z.writestr("set/nocap.png", _png())
    result = datasets.import_uploads([str(archive)], tmp_path / "one")
    assert result.dataset_folder == tmp_path / "one" / "set" and f"`{tmp_path / 'one' / 'set'}`" in result.summary()
    assert sorted(result.uncaptioned) == ["set/10_style/a.png", "set/nocap.png"]
    assert "2 image(s) without a caption file" in result.summary()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("10_style/a.png", _png())
    assert datasets.import_uploads([str(archive)], tmp_path / "two").dataset_folder == tmp_path / "two"
