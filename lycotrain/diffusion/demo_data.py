"""A small generated image dataset for the demo and the tests: coloured shapes with tag captions.

Deterministic (the same call writes the same bytes), fast (a few milliseconds), and shaped like a real
dataset: same-name ``.txt`` captions that start with a trigger word, and a mix of square, landscape and
portrait images so bucketing has something to do.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from lycotrain.atomic import atomic_write, atomic_write_text

DEMO_TRIGGER = "lyco"
_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
_BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15), "grey": (128, 128, 128)}
_SIZES = ((64, 64), (96, 64), (64, 96), (80, 64), (64, 80))
_SHAPES = ("circle", "square", "triangle")


def make_demo_dataset(out_dir: str | Path, count: int = 10, trigger_word: str = DEMO_TRIGGER) -> Path:
    """Write ``count`` PNG images with captions into ``out_dir`` and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colours, backgrounds = list(_COLOURS), list(_BACKGROUNDS)
    for index in range(count):
        shape = _SHAPES[index % len(_SHAPES)]
        colour = colours[index % len(colours)]
        background = backgrounds[(index // len(colours)) % len(backgrounds)]
        size = _SIZES[index % len(_SIZES)]
        image = _draw(shape, _COLOURS[colour], _BACKGROUNDS[background], size)
        name = f"{index:02d}_{colour}_{shape}"
        atomic_write(out / f"{name}.png", lambda path, im=image: im.save(path, format="PNG"))
        atomic_write_text(out / f"{name}.txt", f"{trigger_word}, {colour} {shape}, {background} background\n")
    return out


def _draw(shape: str, colour: tuple[int, int, int], background: tuple[int, int, int],
          size: tuple[int, int]) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    side = min(width, height) * 5 // 8
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(left + side // 2, top), (left, top + side), (left + side, top + side)], fill=colour)
    return image
