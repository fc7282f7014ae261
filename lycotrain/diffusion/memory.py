"""How much GPU memory an image run needs, estimated before it starts (shown in the pre-flight report).

The method (meta-device forward under a saved-tensor meter, autocast and fused-attention emulation, optimizer
state arithmetic, the report) is shared with text runs: ``engine/memory.py``. What is specific to Stable
Diffusion, and found here:

* the frozen weights: UNet and text encoders in the training dtype, the VAE in fp32 (the task keeps all of
  them on the device, the VAE and text encoders for previews even when latents and text outputs are cached),
  from the parameter counts of the architecture built on the meta device from its config files (:class:`ModelSpec`);
* the training forward: the configured adapters injected as the task injects them (``inject_network``), at
  the batch size and bucket that need the most, text encoders run (when trained) or replaced by their cached
  fp32 output, the UNet on noisy latents and the per-image L2 loss in fp32. Gradient checkpointing is switched
  on the meta models as the task switches it on the real ones.

Left out, and said so in the report: transient tensors (the activation gradients backward holds for a moment,
the VAE encoder when latents are not cached, the VAE decoder and the CFG batch of previews), and the caching
allocator's fragmentation. Distributed runs: the estimate is per process (each process holds all of it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lycotrain.engine.memory import (DTYPE_NAMES, MemoryEstimate, MemoryItem, MetaTrainingMode, SavedTensorMeter,
                                     module_bytes, training_state_items)
from lycotrain.errors import ModelError

if TYPE_CHECKING:
    from lycotrain.diffusion.models import LoadedModel
    from lycotrain.engine.config import Config


@dataclass(kw_only=True)
class ImageMemoryEstimate(MemoryEstimate):
    """The estimate for one batch of ``batch_size`` images at ``width`` x ``height`` (the largest bucket)."""

    width: int
    height: int

    def batch_text(self) -> str:
        return f"batch {self.batch_size} at {self.width}x{self.height}"

    def size_saving(self) -> str:
        return f"lower dataset.max_bucket_resolution (largest batch: {self.width}x{self.height})"


# ---- what the model is ---------------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """The architecture of a Stable Diffusion model: its component configs, no weights."""

    family: str  # sd1 | sd2 | sdxl
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: list[dict[str, Any]]  # transformers config dicts, "architectures" naming the class


def spec_from_pipeline(model: "LoadedModel") -> ModelSpec:
    """The spec of an already loaded model (the training task has one)."""
    pipe = model.pipeline
    encoders = [{**te.config.to_dict(), "architectures": [type(te).__name__]} for te in model.text_encoders]
    return ModelSpec(family=model.family.split("-")[0], unet=dict(pipe.unet.config), vae=dict(pipe.vae.config),
                     text_encoders=encoders)


def spec_from_path(path: str, family: str = "auto") -> ModelSpec:
    """The spec of ``model.path`` from its config files only: ``builtin:...``, a diffusers folder, or one
    ``.safetensors`` (the configs lycotrain recorded in it, else the published ones of its family)."""
    from lycotrain.diffusion.models import builtin_model_path
    from lycotrain.paths import BUILTIN_PREFIX

    folder = builtin_model_path(path) if path.startswith(BUILTIN_PREFIX) else Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"model.path {path} does not exist")
    if folder.is_dir():
        configs = {name: _read_json(folder / name / "config.json") for name in ("unet", "vae")}
        configs.update({name: _read_json(folder / name / "config.json")
                        for name in ("text_encoder", "text_encoder_2") if (folder / name).is_dir()})
    elif folder.suffix == ".safetensors":
        configs = _single_file_configs(folder, family)
    elif folder.suffix == ".ckpt" and family != "auto":
        from lycotrain.diffusion.single_file import _package_configs

        configs = _package_configs(family)
    else:
        raise ModelError(f"model.path {path}: cannot read its architecture without loading it (a .ckpt needs "
                         "model.family, other files are not models)")
    encoders = [configs[name] for name in ("text_encoder", "text_encoder_2") if name in configs]
    family = "sdxl" if len(encoders) == 2 else ("sd2" if configs["unet"]["cross_attention_dim"] == 1024 else "sd1")
    return ModelSpec(family=family, unet=configs["unet"], vae=configs["vae"], text_encoders=encoders)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelError(f"{path} is missing: {path.parent.parent} is not a complete diffusers model folder "
                         "(model.path)")
    return json.loads(path.read_text())


def _single_file_configs(path: Path, family: str) -> dict[str, Any]:
    from lycotrain.diffusion.single_file import METADATA_KEY, _package_configs, detect_family, \
        read_keys_and_metadata

    keys, metadata = read_keys_and_metadata(path)
    detected = detect_family(keys)
    if family != "auto" and family.split("-")[0] != detected:  # as loading refuses it: no estimate of another model
        raise ModelError(f"{path}: holds a {detected} model, not {family!r} (model.family)")
    if METADATA_KEY in metadata:
        return json.loads(metadata[METADATA_KEY])["configs"]
    return _package_configs(family if family != "auto" else detected)


# ---- the meta-device training step ----------------------------------------------------------------------------------
@dataclass
class _MetaModels:
    unet: Any
    text_encoders: list[Any]
    vae_bytes: int
    frozen_bytes: dict[str, int]  # component -> bytes of its own parameters and buffers
    adapters: Any = None


def _build_meta_models(spec: ModelSpec, weight_dtype: torch.dtype) -> _MetaModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    with torch.device("meta"):
        # nn.Module.to: diffusers' own .to() logs a dtype advice meant for loading real weights
        unet = torch.nn.Module.to(UNet2DConditionModel.from_config(spec.unet), weight_dtype)
        vae = AutoencoderKL.from_config(spec.vae)
        encoders = []
        for config in spec.text_encoders:
            cls = classes[(config.get("architectures") or ["CLIPTextModel"])[0]]
            encoders.append(cls(CLIPTextConfig(**config)).to(weight_dtype))
    frozen = {"UNet": module_bytes(unet), "text encoders": sum(module_bytes(te) for te in encoders)}
    for model in [unet, *encoders]:
        model.requires_grad_(False).train()
    return _MetaModels(unet=unet, text_encoders=encoders, vae_bytes=module_bytes(vae), frozen_bytes=frozen)


def _inject_meta(models: _MetaModels, spec: ModelSpec, config: "Config") -> None:
    from lycotrain.diffusion.task import inject_network

    models.adapters, _ = inject_network(config.network, spec.family, models.unet, models.text_encoders)


def _enable_checkpointing(models: _MetaModels, meter: SavedTensorMeter, train_text_encoder: bool) -> None:
    """torch's non-reentrant checkpoint, as the task enables it, with each segment metered apart."""
    from torch.utils.checkpoint import checkpoint

    context = meter.checkpoint_contexts
    models.unet.enable_gradient_checkpointing(partial(checkpoint, use_reentrant=False, context_fn=context))
    if train_text_encoder:
        for encoder in models.text_encoders:
            encoder.activation_checkpointing_enable({"use_reentrant": False, "context_fn": context})


def _training_loss(models: _MetaModels, spec: ModelSpec, *, batch_size: int, width: int, height: int,
                   train_text_encoder: bool) -> torch.Tensor:
    """The memory-relevant part of ``DiffusionTask.training_step`` on meta inputs: text encoders (when trained),
    the UNet on noisy latents, the per-image L2 loss in fp32, the adapters' regulariser."""
    unet, meta = models.unet, torch.device("meta")
    factor = 2 ** (len(spec.vae["block_out_channels"]) - 1)
    latents = torch.empty(batch_size, unet.config.in_channels, height // factor, width // factor, device=meta)
    timesteps = torch.zeros(batch_size, dtype=torch.long, device=meta)
    context = spec.text_encoders[0].get("max_position_embeddings", 77)
    if train_text_encoder:
        hidden, pooled = _encode_meta_text(models.text_encoders, spec.family, batch_size, context)
    else:  # frozen encoders run without grad or are cached: only their output, fp32, enters the graph (the cache
        # stores fp32; CUDA autocast ends CLIP with an fp32 layer norm), so autocast casts it once per linear
        hidden = torch.empty(batch_size, context, unet.config.cross_attention_dim, device=meta)
        pooled = None
    added = None
    if spec.family == "sdxl":
        if pooled is None:
            width_pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            pooled = torch.empty(batch_size, width_pooled, device=meta)
        added = {"text_embeds": pooled, "time_ids": torch.empty(batch_size, 6, dtype=pooled.dtype, device=meta)}
    prediction = unet(latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    loss = F.mse_loss(prediction.float(), latents.float(), reduction="none").mean(dim=(1, 2, 3)).mean()
    extra = models.adapters.extra_loss()
    return loss if extra is None else loss + extra


def _encode_meta_text(encoders: list[Any], family: str, batch_size: int,
                      context: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.zeros(batch_size, context, dtype=torch.long, device="meta")
    if family != "sdxl":
        return encoders[0](ids).last_hidden_state, None
    outputs = [encoder(ids, output_hidden_states=True) for encoder in encoders]
    return torch.cat([o.hidden_states[-2] for o in outputs], dim=-1), outputs[-1].text_embeds


def _measure_activations(models: _MetaModels, spec: ModelSpec, config: "Config", *, batch_size: int, width: int,
                        height: int, weight_dtype: torch.dtype, device_type: str) -> SavedTensorMeter:
    """Run the meta training forward under a :class:`SavedTensorMeter`; the meter holds the counts."""
    frozen = [t for m in [models.unet, *models.text_encoders] for t in [*m.parameters(), *m.buffers()]]
    meter = SavedTensorMeter(exclude=frozen)
    train_te = config.network.train_text_encoder
    if config.training.gradient_checkpointing:
        _enable_checkpointing(models, meter, train_te)
    autocast = None if weight_dtype == torch.float32 else weight_dtype
    with meter, MetaTrainingMode(autocast, device_type):
        _training_loss(models, spec, batch_size=batch_size, width=width, height=height, train_text_encoder=train_te)
    return meter


# ---- putting it together ------------------------------------------------------------------------------------
def estimate_memory(spec: ModelSpec, config: "Config", *, batch_size: int, width: int, height: int,
                    weight_dtype: torch.dtype, device_type: str = "cuda") -> ImageMemoryEstimate:
    """The estimate for ``config``'s network and training settings on the architecture ``spec``, for one batch
    of ``batch_size`` images at ``width`` x ``height``, with the frozen weights (and autocast) in ``weight_dtype``.
    ``device_type`` chooses the autocast lists and whether the CUDA runtime is counted."""
    started = time.perf_counter()
    models = _build_meta_models(spec, weight_dtype)
    _inject_meta(models, spec, config)
    meter = _measure_activations(models, spec, config, batch_size=batch_size, width=width, height=height,
                                weight_dtype=weight_dtype, device_type=device_type)
    trainable = [p for p in models.adapters.parameters() if p.requires_grad]
    t = config.training
    dtype_name = DTYPE_NAMES[weight_dtype]
    items = [
        MemoryItem("UNet weights", models.frozen_bytes["UNet"], dtype_name),
        MemoryItem("text encoder weights", models.frozen_bytes["text encoders"], dtype_name),
        MemoryItem("VAE weights", models.vae_bytes, "fp32"),
        *training_state_items(trainable, t.optimizer, meter, batch_text=f"batch {batch_size} at {width}x{height}",
                              gradient_checkpointing=t.gradient_checkpointing, device_type=device_type),
    ]
    not_included = ["backward's transient gradient tensors and previews (VAE decode, CFG batch)",
                    "allocator fragmentation (keep 10-20% headroom)"]
    if not config.dataset.cache_latents:
        not_included.insert(0, "the VAE encoder's transient activations (dataset.cache_latents is off)")
    return ImageMemoryEstimate(items=items, batch_size=batch_size, width=width, height=height, precision=dtype_name,
                               device_type=device_type, gradient_checkpointing=t.gradient_checkpointing,
                               optimizer=t.optimizer, seconds=round(time.perf_counter() - started, 3),
                               not_included=not_included)
