"""Aspect-ratio bucketing: the bucket grid, where each image goes, and the order batches are drawn in.

Buckets are sizes (width, height), multiples of ``step``, with an area close to ``resolution``²; an image goes
to the bucket whose aspect ratio is closest to its own, is resized to cover it and cropped. Every image gets a
bucket: with ``no_upscale`` an image smaller than every grid bucket gets its own bucket (its size rounded
down to ``step``) instead of being enlarged, and only an image narrower than one ``step`` is left out.

Batches are drawn per bucket (a batch never mixes sizes). The order is a pure function of (seed, epoch), so
the state to save for an exact resume is just (epoch, batches done).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class BucketOptions:
    resolution: int = 512  # buckets hold about resolution² pixels
    enabled: bool = True  # False: one square bucket resolution x resolution
    min_resolution: int = 256  # shortest bucket side
    max_resolution: int = 1024  # longest bucket side
    step: int = 64  # bucket sides are multiples of this
    no_upscale: bool = False


@dataclass(frozen=True)
class Placement:
    """How one image becomes a training sample: resize to ``resized``, then crop ``bucket`` out of it."""

    bucket: Size
    resized: Size
    original: Size
    on_grid: bool  # False: an own bucket for an image smaller than every grid bucket (no_upscale)

    @property
    def scale(self) -> float:
        return self.resized[0] / self.original[0]

    def center_crop(self) -> tuple[int, int]:
        """(left, top) of the centred crop."""
        return (self.resized[0] - self.bucket[0]) // 2, (self.resized[1] - self.bucket[1]) // 2

    def random_crop(self, rng: random.Random) -> tuple[int, int]:
        return rng.randint(0, self.resized[0] - self.bucket[0]), rng.randint(0, self.resized[1] - self.bucket[1])


def bucket_grid(options: BucketOptions) -> list[Size]:
    """All bucket sizes, sorted by aspect ratio (width / height)."""
    step = options.step
    square = max(step, options.resolution // step * step)
    if not options.enabled:
        return [(square, square)]
    max_area = options.resolution * options.resolution
    sizes = {(square, square)}
    lo = math.ceil(options.min_resolution / step) * step
    for width in range(lo, options.max_resolution + 1, step):
        height = min(options.max_resolution, max_area // width // step * step)
        if height >= lo:
            sizes.add((width, height))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def place_image(width: int, height: int, grid: list[Size], options: BucketOptions) -> Placement | None:
    """The bucket, resize and crop geometry of a ``width`` x ``height`` image; None if it is too small to use."""
    candidates = grid
    if options.no_upscale:
        candidates = [b for b in grid if b[0] <= width and b[1] <= height]
        if not candidates:
            own = (min(width // options.step * options.step, options.max_resolution),
                   min(height // options.step * options.step, options.max_resolution))
            if own[0] == 0 or own[1] == 0:
                return None
            return _covering(width, height, own, on_grid=False)
    log_aspect = math.log(width / height)
    bucket = min(candidates, key=lambda b: (abs(math.log(b[0] / b[1]) - log_aspect), -b[0] * b[1]))
    return _covering(width, height, bucket, on_grid=True)


def _covering(width: int, height: int, bucket: Size, on_grid: bool) -> Placement:
    """Resize that keeps the aspect ratio and covers ``bucket`` with the least scaling."""
    scale = max(bucket[0] / width, bucket[1] / height)
    resized = (max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale)))
    return Placement(bucket=bucket, resized=resized, original=(width, height), on_grid=on_grid)


def fits_grid(width: int, height: int, grid: list[Size]) -> bool:
    """True when some grid bucket fits inside the image (it can be trained without enlarging it)."""
    return any(b[0] <= width and b[1] <= height for b in grid)


# ---- batches ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleRef:
    """One sample of an epoch: which item, and the seed of its random flip, crop and caption operations."""

    item: int
    aug_seed: int


class BucketBatchSampler:
    """Per-bucket batches in a seeded order; each item appears ``repeats[item]`` times per epoch.

    The last batch of a bucket may be smaller than ``batch_size``. Sharding over processes is the training
    loop's job (it pads the epoch's list by wrapping around and deals batches out round-robin).
    """

    def __init__(self, buckets: list[Size], repeats: list[int], batch_size: int, seed: int) -> None:
        if len(buckets) != len(repeats):
            raise ValueError("one bucket and one repeat count per item")
        self.buckets, self.repeats = buckets, repeats
        self.batch_size, self.seed = batch_size, seed

    def epoch_batches(self, epoch: int) -> list[list[SampleRef]]:
        """All batches of ``epoch``, in training order."""
        rng = random.Random(f"{self.seed}:{epoch}")
        by_bucket: dict[Size, list[int]] = {}
        for item, (bucket, count) in enumerate(zip(self.buckets, self.repeats)):
            by_bucket.setdefault(bucket, []).extend([item] * count)
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            rng.shuffle(items)
            batches += [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        rng.shuffle(batches)
        return [[SampleRef(item, rng.getrandbits(63)) for item in batch] for batch in batches]

    def __len__(self) -> int:
        """Batches per epoch."""
        counts: dict[Size, int] = {}
        for bucket, count in zip(self.buckets, self.repeats):
            counts[bucket] = counts.get(bucket, 0) + count
        return sum(math.ceil(n / self.batch_size) for n in counts.values())
