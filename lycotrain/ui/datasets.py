"""Datasets from the browser: safe import of uploaded images / zips, and the caption editor's file operations.

Uploads are untrusted: every name is reduced to a plain file name (no folders from the client, no ``..``,
no absolute paths — a zip entry that tries to climb out is refused, never extracted), every image is decoded
before it is kept, and anything else is listed back to the user with the reason. Caption files are kept only
next to an image of the same name, so a stray text file cannot slip in as training data.
"""

from __future__ import annotations

import io
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

from lycotrain.atomic import atomic_write_bytes, atomic_write_text
from lycotrain.diffusion.images import IMAGE_EXTENSIONS
from lycotrain.errors import DatasetError

CAPTION_EXTENSIONS = (".txt", ".caption")
MAX_UPLOAD_FILES = 20_000
MAX_ENTRY_BYTES = 256 * 2**20  # a bigger "image" in a zip is refused unread (zip bombs)
REPEAT_FOLDER_NAME = re.compile(r"^\d+_.")  # kohya's N_name folders: their repeats need them under dataset.path


@dataclass
class ImportResult:
    folder: Path
    images: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (name as uploaded, reason)
    renamed: list[tuple[str, str]] = field(default_factory=list)  # (name as uploaded, name kept)
    uncaptioned: list[str] = field(default_factory=list)  # kept images with no caption file in the upload

    @property
    def dataset_folder(self) -> Path:
        """The folder to train on: a zip of one folder unpacks to ``folder/<its name>/...``, so go down while a
        folder holds nothing but one sub-folder (never into an N_name repeat folder)."""
        folder = self.folder
        while len(entries := list(folder.iterdir())) == 1 and entries[0].is_dir() \
                and not REPEAT_FOLDER_NAME.match(entries[0].name):
            folder = entries[0]
        return folder

    def summary(self) -> str:
        lines = [f"Imported {len(self.images)} image(s) and {len(self.captions)} caption(s) into "
                 f"`{self.dataset_folder if self.images else self.folder}`."]
        lines += [f"- renamed `{name}` to `{kept}`: another uploaded file has the same name"
                  for name, kept in self.renamed]
        lines += [f"- rejected `{name}`: {reason}" for name, reason in self.rejected]
        if self.uncaptioned:
            shown = ", ".join(f"`{name}`" for name in self.uncaptioned[:10])
            more = f" and {len(self.uncaptioned) - 10} more" if len(self.uncaptioned) > 10 else ""
            lines.append(f"- {len(self.uncaptioned)} image(s) without a caption file: {shown}{more} (they train with "
                         "an empty caption or the trigger word; add captions in the caption editor)")
        return "\n".join(lines)


def sanitize_name(name: str) -> str:
    """A safe file name: the last path part only, letters and digits of any script (so that names in other
    alphabets stay distinct) plus ``._ -``, no leading dot, bounded length."""
    base = re.split(r"[\\/]", name)[-1]
    cleaned = re.sub(r"[^\w. -]", "_", base).strip(" .")
    stem, dot, ext = cleaned.rpartition(".")
    if dot and len(cleaned) > 120:
        cleaned = f"{stem[:110]}.{ext[:9]}"
    return cleaned[:120] or "file"


def safe_relative(name: str) -> PurePosixPath | None:
    """The sanitized relative path of a zip entry, or None when it would leave the target folder."""
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return None
    parts = [p for p in re.split(r"[\\/]", name) if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return PurePosixPath(*[sanitize_name(p) for p in parts])


def is_decodable_image(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def display_name(path: str | Path) -> str:
    """A short name for a dataset, for run names: the file or folder name without an upload timestamp."""
    return re.sub(r"^\d{8}-\d{6}-", "", Path(path).stem) or "dataset"


def new_upload_folder(root: Path, name: str = "upload") -> Path:
    folder = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    for suffix in range(1000):
        candidate = folder if suffix == 0 else folder.with_name(f"{folder.name}-{suffix}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise DatasetError(f"could not create an upload folder under {root}")


@dataclass
class _Entry:
    shown: str  # the name as uploaded, for messages
    target: PurePosixPath | None  # sanitized path inside the upload folder; None when unsafe
    data: bytes = b""
    reason: str = ""  # set when the entry is refused before looking at its content

    @property
    def source_stem(self) -> str:
        """The name as uploaded without its extension: what pairs a caption with its image."""
        return os.path.splitext(self.shown)[0]


def import_uploads(paths: list[str], dest: Path) -> ImportResult:
    """Copy uploaded images (loose or inside zips) into ``dest``; captions only beside a kept image."""
    entries: list[_Entry] = []
    for path in paths:
        shown = Path(path).name
        if shown.lower().endswith(".zip"):
            entries += _zip_entries(Path(path), shown)
        else:
            entries.append(_Entry(shown, PurePosixPath(sanitize_name(shown)), Path(path).read_bytes()))
    if len(entries) > MAX_UPLOAD_FILES:
        raise DatasetError(f"the upload holds {len(entries)} files; at most {MAX_UPLOAD_FILES} per upload")
    result = ImportResult(folder=dest)
    kept_images: dict[str, PurePosixPath] = {}  # source stem -> kept stem, for the captions
    taken: set[PurePosixPath] = set()
    captions: list[_Entry] = []
    for entry in entries:
        suffix = entry.target.suffix.lower() if entry.target else ""
        if entry.reason or entry.target is None:
            result.rejected.append((entry.shown, entry.reason or "its path leaves the upload folder (zip-slip); "
                                                                "entry skipped"))
        elif suffix in CAPTION_EXTENSIONS:
            captions.append(entry)
        elif suffix not in IMAGE_EXTENSIONS:
            result.rejected.append((entry.shown, f"not an image (accepted: {', '.join(IMAGE_EXTENSIONS)}, "
                                                 "or a .zip of them)"))
        elif not is_decodable_image(entry.data):
            result.rejected.append((entry.shown, "not a readable image (the file is damaged or not an image)"))
        else:
            target = _unused(entry.target, taken)
            if target != entry.target:
                result.renamed.append((entry.shown, str(target)))
            atomic_write_bytes(dest / target, entry.data)
            kept_images[entry.source_stem] = target.with_suffix("")
            result.images.append(str(target))
    kept_stems = set(kept_images.values())
    for entry in captions:
        stem = kept_images.get(entry.source_stem) or (entry.target.with_suffix("") if entry.target.with_suffix("")
                                                      in kept_stems else None)
        if stem is None:
            result.rejected.append((entry.shown, "caption file without an image of the same name in this upload"))
            continue
        target = _unused(stem.with_name(stem.name + entry.target.suffix), taken)
        atomic_write_bytes(dest / target, entry.data)
        result.captions.append(str(target))
    captioned = {PurePosixPath(caption).with_suffix("") for caption in result.captions}
    result.uncaptioned = [image for image in result.images if PurePosixPath(image).with_suffix("") not in captioned]
    return result


def _unused(target: PurePosixPath, taken: set[PurePosixPath]) -> PurePosixPath:
    """``target``, or ``name-N.ext`` when another file of this upload already took it (never overwrite one)."""
    candidate, number = target, 1
    while candidate in taken:
        candidate, number = target.with_name(f"{target.stem}-{number}{target.suffix}"), number + 1
    taken.add(candidate)
    return candidate


def _zip_entries(path: Path, shown: str) -> list[_Entry]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:  # refused like a bad image: the other files of the upload are still imported
        return [_Entry(shown, None, reason="not a valid zip file; re-create it or upload the images directly")]
    entries: list[_Entry] = []
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            entry = _Entry(f"{shown}:{info.filename}", safe_relative(info.filename))
            if info.file_size > MAX_ENTRY_BYTES:
                entry.reason = f"larger than {MAX_ENTRY_BYTES // 2**20} MiB; refused unread"
            elif entry.target is not None:
                entry.data = archive.read(info)
            entries.append(entry)
    return entries


# ---- caption editor -----------------------------------------------------------------------------------------
def list_images(folder: str | Path) -> list[Path]:
    """Every image under ``folder`` (kohya ``N_name`` sub-folders included), in a stable order. An empty path is
    refused: ``Path("")`` is the app's working folder, whose captions the bulk edits would otherwise rewrite."""
    if not str(folder).strip():
        raise DatasetError("dataset.path is empty; enter the image folder whose captions to edit, upload images, or "
                           "press “Create the demo dataset”")
    root = Path(str(folder).strip())
    if not root.is_dir():
        raise DatasetError(f"dataset.path: folder {root} does not exist; enter a folder on the server or upload "
                           "images")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def caption_path(image: Path, extension: str) -> Path:
    extension = extension.strip()
    if not extension.strip("."):
        raise DatasetError("dataset.caption_extension is empty; enter the extension of the caption files, e.g. "
                           ".txt")
    return image.with_suffix(extension if extension.startswith(".") else f".{extension}")


def read_caption(image: Path, extension: str) -> str:
    path = caption_path(image, extension)
    return path.read_text(encoding="utf-8", errors="replace").strip() if path.exists() else ""


def save_caption(image: Path, extension: str, text: str) -> Path:
    path = caption_path(image, extension)
    atomic_write_text(path, text.strip() + "\n")
    return path


def add_prefix(folder: str | Path, extension: str, prefix: str) -> int:
    """Put ``prefix`` (e.g. a trigger word) in front of every caption that does not start with it yet."""
    prefix = prefix.strip().rstrip(",").strip()
    if not prefix:
        raise DatasetError("trigger word / prefix is empty; type the word to put in front of every caption")
    changed = 0
    for image in list_images(folder):
        caption = read_caption(image, extension)
        if caption == prefix or caption.startswith(f"{prefix},"):
            continue
        save_caption(image, extension, f"{prefix}, {caption}" if caption else prefix)
        changed += 1
    return changed


def find_replace(folder: str | Path, extension: str, find: str, replace: str) -> int:
    """Replace text in every caption; returns how many caption files changed."""
    if not find:
        raise DatasetError("find is empty; type the text to replace in the captions")
    changed = 0
    for image in list_images(folder):
        caption = read_caption(image, extension)
        if find in caption:
            save_caption(image, extension, caption.replace(find, replace))
            changed += 1
    return changed
