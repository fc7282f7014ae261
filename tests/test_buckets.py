"""Aspect-ratio bucketing: the grid, every image placed, no upscaling with no_upscale, and the batch order."""

from __future__ import annotations

import math
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lycotrain.diffusion.buckets import BucketBatchSampler, BucketOptions, bucket_grid, fits_grid, place_image

OPTIONS = BucketOptions(resolution=64, min_resolution=32, max_resolution=128, step=16)


def test_grid_sides_are_steps_within_limits_and_area():
    grid = bucket_grid(OPTIONS)
    assert (64, 64) in grid
    for width, height in grid:
        assert width % 16 == 0 and height % 16 == 0
        assert 32 <= width <= 128 and 32 <= height <= 128
        assert width * height <= 64 * 64
    ratios = [w / h for w, h in grid]
    assert ratios == sorted(ratios) and min(ratios) < 0.5 < 2 < max(ratios)


def test_sd_defaults_match_the_usual_buckets():
    grid = bucket_grid(BucketOptions())  # 512, 256..1024, step 64
    assert {(512, 512), (576, 448), (448, 576), (640, 384), (768, 320), (1024, 256)} <= set(grid)


def test_bucketing_off_gives_one_square():
    assert bucket_grid(BucketOptions(resolution=64, enabled=False, step=16)) == [(64, 64)]


def test_wide_and_tall_images_get_wide_and_tall_buckets():
    grid = bucket_grid(OPTIONS)
    wide, tall = place_image(200, 100, grid, OPTIONS), place_image(100, 200, grid, OPTIONS)
    assert wide.bucket[0] > wide.bucket[1] and tall.bucket[1] > tall.bucket[0]
    assert wide.bucket == tall.bucket[::-1]


sizes = st.tuples(st.integers(16, 400), st.integers(16, 400))


@settings(max_examples=300, deadline=None)
@given(size=sizes, no_upscale=st.booleans())
def test_every_image_is_assigned_and_cropped_inside(size, no_upscale):
    options = BucketOptions(**{**OPTIONS.__dict__, "no_upscale": no_upscale})
    grid = bucket_grid(options)
    placement = place_image(*size, grid, options)
    assert placement is not None  # every image of at least one step per side gets a bucket
    bucket, resized = placement.bucket, placement.resized
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]  # the crop lies inside the resized image
    scale = max(bucket[0] / size[0], bucket[1] / size[1])  # the aspect ratio is kept (up to rounding)
    assert abs(resized[0] - size[0] * scale) <= 0.5 + 1e-9 and abs(resized[1] - size[1] * scale) <= 0.5 + 1e-9
    if no_upscale:
        assert resized[0] <= size[0] and resized[1] <= size[1], "no_upscale enlarged an image"
        assert placement.on_grid == fits_grid(*size, grid)
    else:
        assert placement.on_grid and bucket in grid


def test_no_upscale_small_image_gets_its_own_bucket_and_a_too_narrow_one_none():
    options = BucketOptions(**{**OPTIONS.__dict__, "no_upscale": True})
    grid = bucket_grid(options)
    own = place_image(40, 20, grid, options)
    assert own.bucket == (32, 16) and not own.on_grid and own.scale <= 1
    assert place_image(40, 10, grid, options) is None  # narrower than one step: cannot train
    upscaled = place_image(40, 20, grid, OPTIONS)
    assert upscaled.scale > 1 and upscaled.on_grid


def _sampler(seed=0, batch_size=3):
    buckets = [(64, 64)] * 7 + [(80, 48)] * 4 + [(48, 80)] * 2
    repeats = [1, 2, 1, 1, 3, 1, 1, 2, 1, 1, 1, 5, 1]
    return BucketBatchSampler(buckets, repeats, batch_size=batch_size, seed=seed), buckets, repeats


def test_each_item_appears_repeats_times_in_single_bucket_batches():
    sampler, buckets, repeats = _sampler()
    batches = sampler.epoch_batches(0)
    assert len(batches) == len(sampler)
    seen = Counter(ref.item for batch in batches for ref in batch)
    assert seen == Counter({i: r for i, r in enumerate(repeats)})
    for batch in batches:
        assert len({buckets[ref.item] for ref in batch}) == 1 and 1 <= len(batch) <= 3
    per_bucket = Counter()
    for bucket, count in zip(buckets, repeats):
        per_bucket[bucket] += count
    assert len(sampler) == sum(math.ceil(n / 3) for n in per_bucket.values())


def test_order_is_a_function_of_seed_and_epoch():
    first, second, other_seed = _sampler()[0], _sampler()[0], _sampler(seed=1)[0]
    assert first.epoch_batches(0) == second.epoch_batches(0)
    assert first.epoch_batches(0) != first.epoch_batches(1)
    assert first.epoch_batches(0) != other_seed.epoch_batches(0)


def test_sampler_rng_does_not_touch_global_random():
    state = random.getstate()
    _sampler()[0].epoch_batches(0)
    assert random.getstate() == state
