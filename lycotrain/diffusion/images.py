"""Reading training images: every file becomes an upright 8-bit RGB image, or a clear reason why not.

Camera photos carry their rotation in EXIF; transparent PNGs must not turn black where alpha is 0; palette,
grayscale and 16-bit files must not be clipped or mis-scaled. All of that is settled here, once, so the
bucketing, the latent cache and the pre-flight report see the same pixels the VAE will see.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import astuple, dataclass
from pathlib import Path

from lycotrain.atomic import atomic_write_text

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Modes that store more than 8 bits per sample as integers; PIL's convert("RGB") would clip them at 255.
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class UnreadableImage(Exception):
    """An image file that cannot be decoded; ``str()`` is the reason shown in the pre-flight report."""


@dataclass(frozen=True)
class ImageInfo:
    """What the scan keeps of an image: its upright size and a hash of its decoded RGB pixels.

    The hash covers exactly what the VAE will see (after EXIF rotation and alpha compositing), so it serves
    both to find duplicates and to key the latent cache: any visible edit changes it.
    """

    width: int
    height: int
    pixel_hash: str


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an upright 8-bit RGB image; raise UnreadableImage with the reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()  # decode now: a truncated file fails here, not in the middle of training
                image = ImageOps.exif_transpose(opened)
                return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"{type(exc).__name__}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, 16-bit scaled (not clipped) to 8 bits."""
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in _WIDE_INT_MODES:
        wide = np.asarray(image, dtype=np.float64)
        eight_bit = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)  # 65535 / 257 = 255 exactly
        return Image.fromarray(eight_bit).convert("RGB")
    if image.mode == "F":
        floats = np.asarray(image, dtype=np.float64)
        scale = 255.0 if floats.max(initial=0.0) <= 1.0 else 1.0  # float images come as 0..1 or 0..255
        return Image.fromarray(np.clip(np.rint(floats * scale), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def inspect_image(path: str | Path) -> ImageInfo:
    """Decode ``path`` and return its upright size and pixel hash (raises UnreadableImage)."""
    image = load_rgb(path)
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return ImageInfo(image.width, image.height, digest.hexdigest())


class InfoCache:
    """``ImageInfo`` of earlier scans, keyed by path, file size and modification time, in one JSON file.

    Decoding every image is what makes a scan slow (a 12-megapixel JPEG takes ~0.1 s); with this cache a
    second pre-flight of an unchanged folder decodes nothing, and a file that was rewritten (new size or
    modification time) is decoded again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.changed = False
        try:
            self.entries: dict[str, list] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # no cache yet, or a damaged one: start over
            self.entries = {}

    @staticmethod
    def _stamp(image: Path) -> list[int]:
        stat = image.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def get(self, image: Path) -> ImageInfo | None:
        entry = self.entries.get(str(image.resolve()))
        if entry is None or entry[:2] != self._stamp(image):
            return None
        return ImageInfo(*entry[2:])

    def put(self, image: Path, info: ImageInfo) -> None:
        self.entries[str(image.resolve())] = self._stamp(image) + list(astuple(info))
        self.changed = True

    def save(self) -> None:
        if self.changed:
            atomic_write_text(self.path, json.dumps(self.entries))
            self.changed = False
