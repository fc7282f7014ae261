"""Image decoding: EXIF orientation, alpha, palette, 16-bit and grayscale images come out as upright 8-bit RGB
with the right colours; corrupt files raise UnreadableImage with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lycotrain.diffusion.images import UnreadableImage, inspect_image, load_rgb

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (32, 16), BLUE)
    stored.paste(RED, (0, 0, 16, 16))  # left half red, as stored on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "photo.jpg"
    stored.save(path, exif=exif, quality=95)
    image = load_rgb(path)
    assert image.size == (16, 32)  # upright: portrait
    top, bottom = np.asarray(image)[4, 8], np.asarray(image)[28, 8]
    assert top[0] > 200 and top[2] < 60  # the stored left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60
    info = inspect_image(path)
    assert (info.width, info.height) == (16, 32)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black must not train as black
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (255, 0, 0, 128))
    rgba.save(tmp_path / "a.png")
    image = load_rgb(tmp_path / "a.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == WHITE
    assert image.getpixel((1, 1)) == RED
    assert image.getpixel((2, 2)) == (255, 127, 127)


def test_palette_with_and_without_transparency(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    palette.putpixel((1, 1), 1)
    palette.save(tmp_path / "opaque.png")
    palette.save(tmp_path / "transparent.png", transparency=0)
    opaque, transparent = load_rgb(tmp_path / "opaque.png"), load_rgb(tmp_path / "transparent.png")
    assert opaque.getpixel((0, 0)) == (0, 0, 0) and opaque.getpixel((1, 1)) == BLUE
    assert transparent.getpixel((0, 0)) == WHITE and transparent.getpixel((1, 1)) == BLUE


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64], [257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really stored as 16-bit
    image = load_rgb(tmp_path / "deep.png")
    assert image.mode == "RGB"
    assert [image.getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 64, 128, 255]
    assert image.getpixel((1, 0)) == (64, 64, 64)


def test_grayscale_and_gray_alpha(tmp_path):
    Image.new("L", (4, 4), 90).save(tmp_path / "gray.png")
    Image.new("LA", (4, 4), (90, 0)).save(tmp_path / "gray_alpha.png")
    assert load_rgb(tmp_path / "gray.png").getpixel((0, 0)) == (90, 90, 90)
    assert load_rgb(tmp_path / "gray_alpha.png").getpixel((0, 0)) == WHITE


def test_corrupt_and_truncated_files_raise_with_a_reason(tmp_path):
    (tmp_path / "garbage.png").write_bytes(b"this is not an image")
    Image.new("RGB", (64, 64), RED).save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    for name in ("garbage.png", "truncated.jpg"):
        with pytest.raises(UnreadableImage) as info:
            load_rgb(tmp_path / name)
        assert str(info.value)


def test_pixel_hash_follows_the_pixels_not_the_file(tmp_path):
    Image.new("RGB", (8, 8), RED).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), RED).save(tmp_path / "b.png", compress_level=1)  # other bytes, same pixels
    Image.new("RGB", (8, 8), BLUE).save(tmp_path / "c.png")
    a, b, c = (inspect_image(tmp_path / n).pixel_hash for n in ("a.png", "b.png", "c.png"))
    assert a == b != c
