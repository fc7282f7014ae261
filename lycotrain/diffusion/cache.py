"""On-disk caches of VAE latents and text-encoder outputs, so each image and caption is encoded once.

An entry's name is a hash of everything its content depends on, so a stale entry is never read:
* latents: the decoded pixels of the image (any edit changes them), its resize/crop/flip geometry, and the
  VAE's identity (class, config, dtype and a fingerprint of its weights);
* text-encoder outputs: the caption text and the identity of the encoders (plus anything else the caller's
  encoding depends on, e.g. CLIP skip, passed as ``extra``). Usable only when the text encoders are frozen
  and the captions fixed (no shuffle, no tag dropout): ``ImageDataset.caption_texts`` says so otherwise.
Entries are single ``.safetensors`` files written atomically; a crash leaves the old state or the new entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from safetensors.torch import load_file, save_file

from lycotrain.atomic import atomic_write
from lycotrain.errors import DatasetError

if TYPE_CHECKING:
    from lycotrain.diffusion.dataset import ImageDataset

Progress = Callable[[int, int], None]  # (done, total)


def default_cache_dir() -> Path:
    """``$LYCOTRAIN_HOME/cache``: shared by all runs, since entries are keyed by content."""
    from lycotrain.paths import lycotrain_home

    return lycotrain_home() / "cache"


def model_identity(*modules: torch.nn.Module, extra: str = "") -> str:
    """A hash of the modules' classes, configs and weights: changes when any weight or the dtype changes.

    The weights are summarised per tensor (name, shape, dtype, sum, absolute sum and 64 evenly spaced
    values), which is fast on a full-size model and catches a fine-tuned or swapped checkpoint. The sums
    are taken on the CPU in float64, so the identity does not depend on the device the model sits on.
    """
    digest = hashlib.sha256(extra.encode())
    for module in modules:
        digest.update(type(module).__name__.encode())
        digest.update(json.dumps(_config_dict(module), sort_keys=True, default=str).encode())
        for name, tensor in sorted(module.state_dict().items()):
            tensor = tensor.detach().cpu()
            flat = tensor.reshape(-1)
            picks = flat[:: max(1, flat.numel() // 64)][:64].to(torch.float64)
            summary = (name, tuple(tensor.shape), str(tensor.dtype), tensor.sum(dtype=torch.float64).item(),
                       tensor.abs().sum(dtype=torch.float64).item(), picks.tolist())
            digest.update(repr(summary).encode())
    return digest.hexdigest()


def _config_dict(module: torch.nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        return {}
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


class _EntryStore:
    """Files ``root/ab/abcdef....safetensors`` named by a hash of (identity, key)."""

    def __init__(self, root: Path, identity: str) -> None:
        self.root, self.identity = Path(root), identity

    def path(self, key: str) -> Path:
        name = hashlib.sha256(f"{self.identity}\n{key}".encode()).hexdigest()
        return self.root / name[:2] / f"{name}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)
                   for name, t in tensors.items()}  # own storage: a row of a batch output is a view
        atomic_write(self.path(key), lambda tmp: save_file(tensors, str(tmp)))

    def load_all(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        if not path.is_file():
            raise DatasetError(f"cache entry {path} is missing (was the cache folder cleaned during the run?); "
                               "restart the run to re-encode it")
        return load_file(str(path))


class LatentCache(_EntryStore):
    """Unscaled VAE latent means, one entry per (image pixels, geometry, flip) and VAE."""

    @classmethod
    def for_vae(cls, root: str | Path, vae: torch.nn.Module) -> "LatentCache":
        return cls(Path(root) / "latents", model_identity(vae))

    def load(self, key: str) -> torch.Tensor:
        return self.load_all(key)["latents"]


@torch.no_grad()
def encode_latents(vae: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unscaled latent means (float32) of (B, 3, H, W) pixels in [-1, 1]; the task multiplies by the VAE's
    ``scaling_factor``. Cached and uncached training both use this, so they see the same latents."""
    parameter = next(vae.parameters())
    latents = vae.encode(pixel_values.to(parameter.device, parameter.dtype)).latent_dist.mean
    return latents.float()


def fill_latent_cache(dataset: "ImageDataset", cache: LatentCache, vae: Any, batch_size: int = 4,
                      progress: Progress | None = None) -> int:
    """Encode every variant the dataset can draw that the cache lacks, then make the dataset read the cache.

    Returns the number of images encoded (0 when everything was cached: the second run or epoch encodes
    nothing). Images of one bucket are encoded together, ``batch_size`` at a time.
    """
    missing: dict[tuple[int, int], list[tuple[str, Any]]] = {}
    for record, crop, flip in dataset.latent_variants():
        key = dataset.latent_key(record, crop, flip)
        if not cache.has(key):
            missing.setdefault(record.placement.bucket, []).append((key, (record, crop, flip)))
    total, done = sum(len(v) for v in missing.values()), 0
    for bucket in sorted(missing):
        entries = missing[bucket]
        for start in range(0, len(entries), batch_size):
            chunk = entries[start:start + batch_size]
            pixels = torch.stack([dataset.pixels(*variant) for _, variant in chunk])
            for (key, _), latents in zip(chunk, encode_latents(vae, pixels)):
                cache.save(key, {"latents": latents})
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    dataset.use_latent_cache(cache)
    return total


class TextEncoderCache(_EntryStore):
    """Text-encoder outputs per caption text; ``identity`` from ``model_identity(*encoders, extra=...)``."""

    @classmethod
    def for_encoders(cls, root: str | Path, *encoders: torch.nn.Module, extra: str = "") -> "TextEncoderCache":
        return cls(Path(root) / "text", model_identity(*encoders, extra=extra))

    def load(self, text: str) -> dict[str, torch.Tensor]:
        return self.load_all(text)


def fill_text_cache(dataset: "ImageDataset", cache: TextEncoderCache,
                    encode: Callable[[list[str]], dict[str, torch.Tensor]], batch_size: int = 16) -> int:
    """Encode the caption texts the cache lacks with ``encode(texts) -> {name: (B, ...) tensor}``, then make
    the dataset's batches carry ``text_embeds``. Raises DatasetError when captions are randomised."""
    missing = [text for text in dataset.caption_texts() if not cache.has(text)]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start:start + batch_size]
        with torch.no_grad():
            outputs = encode(chunk)
        for index, text in enumerate(chunk):
            cache.save(text, {name: value[index] for name, value in outputs.items()})
    dataset.use_text_cache(cache)
    return len(missing)
