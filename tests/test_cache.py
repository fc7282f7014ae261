"""Latent and text-encoder caches: the second epoch runs no VAE encode, an edited image is re-encoded, a
different VAE does not read another's entries, cached latents equal fresh ones, entries are written atomically."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from _dataset_images import epoch_batches, small_config, write_image, write_images
from lycotrain.diffusion.cache import LatentCache, TextEncoderCache, encode_latents, fill_latent_cache, \
    fill_text_cache, model_identity
from lycotrain.diffusion.dataset import ImageDataset
from lycotrain.errors import DatasetError


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                         latent_channels=4).eval()


class CountingVAE:
    """Counts the images the wrapped VAE encodes."""

    def __init__(self, vae: AutoencoderKL) -> None:
        self.vae, self.encoded = vae, 0

    def parameters(self):
        return self.vae.parameters()

    def encode(self, pixels):
        self.encoded += len(pixels)
        return self.vae.encode(pixels)


def _epoch(dataset: ImageDataset) -> list[dict]:
    return list(epoch_batches(dataset, 2))


def test_second_epoch_and_second_run_encode_nothing(tmp_path):
    write_images(tmp_path / "data", 3)
    write_image(tmp_path / "data" / "wide.png", size=(64, 32), caption="wide")
    vae = tiny_vae()
    counting = CountingVAE(vae)
    cache = LatentCache.for_vae(tmp_path / "cache", vae)
    dataset = ImageDataset.from_config(small_config(tmp_path / "data", flip=True))
    assert fill_latent_cache(dataset, cache, counting) == 8  # 4 images, each plain and mirrored
    assert counting.encoded == 8
    for _ in range(2):
        batches = _epoch(dataset)
        assert all("latents" in b and "pixel_values" not in b for b in batches)
    assert counting.encoded == 8  # the epochs only read the cache
    again = ImageDataset.from_config(small_config(tmp_path / "data", flip=True))
    assert fill_latent_cache(again, LatentCache.for_vae(tmp_path / "cache", vae), counting) == 0
    assert counting.encoded == 8


def test_cached_latents_equal_fresh_encodes(tmp_path):
    write_image(tmp_path / "data" / "a.png", size=(48, 32), caption="a")
    vae = tiny_vae()
    dataset = ImageDataset.from_config(small_config(tmp_path / "data"))
    fresh = next(epoch_batches(dataset, 1))
    fill_latent_cache(dataset, LatentCache.for_vae(tmp_path / "cache", vae), vae)
    cached = next(epoch_batches(dataset, 1))
    expected = encode_latents(vae, fresh["pixel_values"])
    assert cached["latents"].shape == (1, 4, fresh["pixel_values"].shape[2] // 8, fresh["pixel_values"].shape[3] // 8)
    torch.testing.assert_close(cached["latents"], expected)
    assert torch.equal(cached["target_size"], fresh["target_size"])


def test_editing_an_image_invalidates_only_its_entry(tmp_path):
    paths = write_images(tmp_path / "data", 3)
    vae = tiny_vae()
    counting = CountingVAE(vae)
    config = small_config(tmp_path / "data")
    fill_latent_cache(ImageDataset.from_config(config), LatentCache.for_vae(tmp_path / "cache", vae), counting)
    assert counting.encoded == 3
    edited = Image.open(paths[1]).convert("RGB")
    edited.putpixel((3, 3), (0, 255, 0))
    edited.save(paths[1])
    dataset = ImageDataset.from_config(config)
    assert fill_latent_cache(dataset, LatentCache.for_vae(tmp_path / "cache", vae), counting) == 1
    assert counting.encoded == 4


def test_another_vae_or_size_does_not_reuse_entries(tmp_path):
    write_images(tmp_path / "data", 2)
    first, second = tiny_vae(0), tiny_vae(1)
    assert model_identity(first) != model_identity(second)
    assert model_identity(first) == model_identity(tiny_vae(0))
    assert model_identity(first) != model_identity(tiny_vae(0).to(torch.float16))
    fill_latent_cache(ImageDataset.from_config(small_config(tmp_path / "data")),
                      LatentCache.for_vae(tmp_path / "cache", first), first)
    other_vae = ImageDataset.from_config(small_config(tmp_path / "data"))
    assert fill_latent_cache(other_vae, LatentCache.for_vae(tmp_path / "cache", second), second) == 2
    bigger = ImageDataset.from_config(small_config(tmp_path / "data", resolution=48, max_bucket_resolution=96))
    assert fill_latent_cache(bigger, LatentCache.for_vae(tmp_path / "cache", first), first) == 2


def test_random_crop_cannot_be_cached(tmp_path):
    write_images(tmp_path / "data", 1)
    dataset = ImageDataset.from_config(small_config(tmp_path / "data", crop="random"))
    with pytest.raises(DatasetError, match="crop = 'center' or dataset.cache_latents = false"):
        fill_latent_cache(dataset, LatentCache.for_vae(tmp_path / "cache", tiny_vae()), tiny_vae())


def test_entries_are_written_atomically(tmp_path, monkeypatch):
    cache = LatentCache(tmp_path, "vae-id")

    def crash(tensors, filename):
        open(filename, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr("lycotrain.diffusion.cache.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.save("k", {"latents": torch.ones(4, 2, 2)})
    assert not cache.has("k") and not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_text_encoder_cache(tmp_path):
    write_images(tmp_path / "data", 3, caption="a cat")
    dataset = ImageDataset.from_config(small_config(tmp_path / "data", trigger_word="t", caption_dropout=0.5))
    encoder = torch.nn.Linear(3, 5)
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        calls.append(texts)
        return {"hidden": torch.stack([torch.full((2, 5), float(len(t))) for t in texts]),
                "pooled": torch.tensor([[float(len(t))] for t in texts])}

    cache = TextEncoderCache.for_encoders(tmp_path / "cache", encoder, extra="clip_skip=1")
    assert fill_text_cache(dataset, cache, encode) == 2  # "t, a cat" and the dropped-out ""
    assert calls == [["", "t, a cat"]]
    for batch in epoch_batches(dataset, 3):
        lengths = [float(len(c)) for c in batch["captions"]]
        assert batch["text_embeds"]["hidden"].shape == (3, 2, 5)
        assert batch["text_embeds"]["pooled"][:, 0].tolist() == lengths
    assert fill_text_cache(dataset, TextEncoderCache.for_encoders(tmp_path / "cache", encoder, extra="clip_skip=1"),
                           encode) == 0
    assert fill_text_cache(dataset, TextEncoderCache.for_encoders(tmp_path / "cache", encoder, extra="clip_skip=2"),
                           encode) == 2
