"""How much GPU memory an image run needs, estimated before it starts (shown in the pre-flight report).

What a LoRA-style run keeps on the device, and how each part is found:

* the frozen weights (UNet and text encoders in the training dtype, the VAE in fp32: the task keeps all of
  them on the device, the VAE and text encoders for previews even when latents and text outputs are cached),
  from the parameter counts of the architecture built on the **meta device** (no memory, no weights read);
* the adapter parameters, their gradients (fp32) and the optimizer state (:func:`optimizer_state_bytes`);
* the activations autograd saves for backward. One training forward (+ loss) of the real architecture, with
  the configured adapters injected, at the batch size and bucket that need the most, runs on the meta device
  under ``saved_tensors_hooks`` (:class:`SavedTensorMeter`) that add up the bytes of every saved storage once,
  leaving out the models' own parameters (counted above). Gradient checkpointing is switched on the meta
  models as the task switches it on the real ones, and torch's checkpoint runs; its segments are metered
  apart (``context_fn``): the estimate keeps what lives outside them (their inputs included) plus the largest
  segment, which backward recomputes one at a time;
* on CUDA, the runtime itself (context and library workspaces): a typical constant, not measured.

Meta tensors differ from GPU tensors in two ways that matter here; :class:`_MetaTrainingMode` makes up for
both. Autocast does not exist for them, so the mode casts the inputs of the ops in the device's autocast lists
as autocast does (:data:`AUTOCAST_OPS`). And scaled-dot-product attention on meta falls back to its math
decomposition, which keeps the L x L attention matrix; GPUs (and CPUs) run fused kernels that keep only q, k,
v, the output and the log-sum-exp, so the mode routes attention to the fused CPU kernel's meta version, which
saves exactly those.

Left out, and said so in the report: transient tensors (the activation gradients backward holds for a moment,
the VAE encoder when latents are not cached, the VAE decoder and the CFG batch of previews), and the caching
allocator's fragmentation. Distributed runs: the estimate is per process (each process holds all of it).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from lycotrain.errors import ModelError

if TYPE_CHECKING:
    from lycotrain.diffusion.models import LoadedModel
    from lycotrain.engine.config import Config

GIB = 1024**3
# CUDA context plus cuBLAS/cuDNN workspaces, outside PyTorch's allocator: typically 0.3-0.6 GiB
CUDA_RUNTIME_BYTES = 512 * 1024**2
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Ops (by name) that autocast runs in the low-precision dtype / in float32, per device: PyTorch's "Autocast
# Op Reference", restricted to what SD UNets and CLIP text encoders call. CUDA runs norms and softmax in fp32
# (upsampling is on neither list: it keeps its input's dtype); the CPU list keeps them in the input's dtype.
_LOW_PRECISION = frozenset({"linear", "conv1d", "conv2d", "conv_transpose2d", "matmul", "__matmul__", "mm", "bmm",
                            "baddbmm", "addmm", "addbmm", "scaled_dot_product_attention"})
_LOSSES = frozenset({"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss"})
AUTOCAST_OPS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "cuda": (_LOW_PRECISION, _LOSSES | {"group_norm", "layer_norm", "softmax", "log_softmax", "exp",
                                        "log", "pow", "rsqrt", "norm", "softplus", "cumsum", "sum", "prod"}),
    "cpu": (_LOW_PRECISION, _LOSSES),
}

# bitsandbytes' 8-bit AdamW layout (optimizer_state_bytes)
_ADAM8BIT_MIN_SIZE = 4096  # bitsandbytes keeps fp32 state for tensors smaller than this (min_8bit_size)
_ADAM8BIT_BLOCK = 256  # one fp32 absmax per block of 256 values, per state


# ---- the estimate --------------------------------------------------------------------------------------------
@dataclass
class MemoryItem:
    name: str
    bytes: int
    detail: str = ""
    parts: dict[str, int] = field(default_factory=dict)  # activations: where they live (see estimate_memory)


@dataclass
class MemoryEstimate:
    """An estimate (labelled so wherever it is shown) of the device memory one training process needs."""

    items: list[MemoryItem]
    batch_size: int
    width: int
    height: int
    precision: str  # fp32 | fp16 | bf16: the frozen weights' dtype and autocast's
    device_type: str  # the rules it was made for: "cuda" (autocast lists, runtime overhead) or "cpu"
    gradient_checkpointing: bool
    optimizer: str
    seconds: float = 0.0  # what the estimate itself took
    not_included: list[str] = field(default_factory=list)
    gpu: dict[str, Any] | None = None  # name, total_bytes, free_bytes of the visible GPU, when there is one

    @property
    def total_bytes(self) -> int:
        return sum(item.bytes for item in self.items)

    def item(self, name: str) -> MemoryItem:
        return next(i for i in self.items if i.name == name)

    def fit_warning(self) -> str | None:
        """A message when the estimate exceeds the visible GPU's memory, naming settings that lower it."""
        if self.gpu is None or self.total_bytes <= self.gpu["total_bytes"]:
            return None
        return (f"the estimated memory need, {gib(self.total_bytes)} GiB, exceeds the {gib(self.gpu['total_bytes'])} "
                f"GiB of {self.gpu['name']}: training will likely run out of memory; {', '.join(self._savings())}")

    def _savings(self) -> list[str]:
        savings = [] if self.gradient_checkpointing else ["set training.gradient_checkpointing = true"]
        if self.precision == "fp32":
            savings.append('set training.mixed_precision = "bf16" (or "fp16")')
        if self.batch_size > 1:
            savings.append("lower training.batch_size (raise training.grad_accum to keep the effective batch)")
        savings.append(f"lower dataset.max_bucket_resolution (largest batch: {self.width}x{self.height})")
        if self.optimizer in ("adamw", "prodigy"):
            savings.append('choose training.optimizer = "adamw8bit" or "adafactor"')
        return savings

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "estimate": True, "total_bytes": self.total_bytes, "total_gib": gib(self.total_bytes)}

    def format_lines(self) -> list[str]:
        checkpointing = "on" if self.gradient_checkpointing else "off"
        lines = [f"Memory estimate (an estimate, per training process; batch {self.batch_size} at "
                 f"{self.width}x{self.height}, {self.precision}, gradient checkpointing {checkpointing}, "
                 f"{self.optimizer}):"]
        lines += [f"  {item.name}: {size_text(item.bytes)}" + (f" ({item.detail})" if item.detail else "")
                  for item in self.items]
        lines.append(f"  total: about {gib(self.total_bytes)} GiB")
        if self.gpu is not None:
            lines.append(f"  GPU: {self.gpu['name']}, {gib(self.gpu['total_bytes'])} GiB "
                         f"({gib(self.gpu['free_bytes'])} GiB free now)")
        if (warning := self.fit_warning()) is not None:
            lines.append(f"  WARNING: {warning}")
        if self.not_included:
            lines.append(f"  not included: {'; '.join(self.not_included)}")
        return lines


def gib(n_bytes: float) -> float:
    return round(n_bytes / GIB, 2)


def size_text(n_bytes: float) -> str:
    """GiB with two decimals, or MiB below a GiB (tiny models would read 0.0 GiB everywhere)."""
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 1024**2:.1f} MiB"


def visible_gpu(device: torch.device | str | None = None) -> dict[str, Any] | None:
    """Name, total and free memory of the CUDA device (the current one by default); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return {"name": torch.cuda.get_device_name(device), "total_bytes": int(total), "free_bytes": int(free)}


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


# ---- counting what autograd saves ------------------------------------------------------------------------------
class SavedTensorMeter:
    """While active, adds up the bytes of the tensors autograd saves for backward: each storage once (views and
    tensors saved by several ops share one), leaving out the storages of ``exclude`` (the models' parameters and
    buffers, which are counted as weights). Works the same on meta and on real tensors.

    ``segment()`` is a context for one gradient-checkpointing segment: what is saved inside it is metered
    apart, and only the largest segment counts (``total``), since backward recomputes them one at a time.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {_storage_id(t) for t in exclude}
        self._seen: set[int] = set()
        self._alive: list[torch.UntypedStorage] = []  # ids stay unique while the storages live
        self._outside = {"bytes": 0}
        self.largest_segment_bytes = 0
        self._stack = contextlib.ExitStack()

    @property
    def outside_bytes(self) -> int:
        return self._outside["bytes"]

    @property
    def total(self) -> int:
        return self.outside_bytes + self.largest_segment_bytes

    def __enter__(self) -> "SavedTensorMeter":
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._packer(self._seen, self._outside),
                                                                           _unpack))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def segment(self) -> Iterator[None]:
        tally = {"bytes": 0}
        with torch.autograd.graph.saved_tensors_hooks(self._packer(set(), tally), _unpack):
            yield
        self.largest_segment_bytes = max(self.largest_segment_bytes, tally["bytes"])

    def _packer(self, seen: set[int], tally: dict[str, int]) -> Callable[[torch.Tensor], torch.Tensor]:
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            key = storage._cdata  # the storage's identity, the same for every view of it (also on meta)
            if key not in self._excluded and key not in seen:
                seen.add(key)
                self._alive.append(storage)
                tally["bytes"] += storage.nbytes()
            return tensor

        return pack


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage_id(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


# ---- making meta tensors behave like GPU tensors ------------------------------------------------------------------
class _MetaTrainingMode(TorchFunctionMode):
    """Autocast emulation (``autocast_dtype`` with ``device_type``'s op lists; None: no autocast) and fused
    attention for meta tensors; see the module docstring. Also usable on real tensors (tests compare both)."""

    def __init__(self, autocast_dtype: torch.dtype | None, device_type: str = "cuda") -> None:
        super().__init__()
        self.autocast_dtype = autocast_dtype
        # other accelerators (mps, xpu) follow CUDA's lists
        self.low_precision, self.full_precision = AUTOCAST_OPS.get(device_type, AUTOCAST_OPS["cuda"])

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if self.autocast_dtype is not None:
            if name in self.low_precision:
                args, kwargs = _cast_floats((args, kwargs), self.autocast_dtype)
            elif name in self.full_precision:
                args, kwargs = _cast_floats((args, kwargs), torch.float32)
        if func is F.scaled_dot_product_attention and args[0].is_meta:
            return _fused_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _cast_floats(tree: Any, dtype: torch.dtype) -> Any:
    return tree_map(lambda a: a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a, tree)


def _fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                     dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                     enable_gqa: bool = False) -> torch.Tensor:
    """SDPA as a fused kernel computes and saves it (q, k, v, output, log-sum-exp; no attention matrix)."""
    if enable_gqa:  # not used by SD models; keep torch's own path rather than guess
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                              enable_gqa=True)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return out


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
    frozen = {"UNet": _module_bytes(unet), "text encoders": sum(_module_bytes(te) for te in encoders)}
    for model in [unet, *encoders]:
        model.requires_grad_(False).train()
    return _MetaModels(unet=unet, text_encoders=encoders, vae_bytes=_module_bytes(vae), frozen_bytes=frozen)


def _module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _inject_meta(models: _MetaModels, spec: ModelSpec, config: "Config") -> None:
    from lycotrain.diffusion.task import inject_network

    models.adapters, _ = inject_network(config.network, spec.family, models.unet, models.text_encoders)


def _enable_checkpointing(models: _MetaModels, meter: SavedTensorMeter, train_text_encoder: bool) -> None:
    """torch's non-reentrant checkpoint, as the task enables it, with each segment metered apart."""
    from torch.utils.checkpoint import checkpoint

    context = lambda: (meter.segment(), contextlib.nullcontext())  # noqa: E731  (forward, recompute)
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
    with meter, _MetaTrainingMode(autocast, device_type):
        _training_loss(models, spec, batch_size=batch_size, width=width, height=height, train_text_encoder=train_te)
    return meter


# ---- optimizer state --------------------------------------------------------------------------------------------
def optimizer_state_bytes(optimizer: str, shapes: Iterable[torch.Size]) -> int:
    """Bytes of optimizer state for fp32 parameters of ``shapes``, as each implementation allocates it.

    adamw: exp_avg and exp_avg_sq (2 x fp32). adafactor (transformers, no first moment as configured in
    engine/optim.py): factored second moment for >= 2-d tensors (a row and a column vector over the last two
    dims), a full one for 1-d. adamw8bit (bitsandbytes): two uint8 states plus one fp32 absmax per block of
    256, fp32 states below 4096 elements. prodigy (prodigyopt): exp_avg, exp_avg_sq, s and the initial copy
    p0 (4 x fp32).
    """
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if optimizer == "adamw":
            total += 8 * n
        elif optimizer == "prodigy":
            total += 16 * n
        elif optimizer == "adamw8bit":
            total += 2 * (n + 4 * math.ceil(n / _ADAM8BIT_BLOCK)) if n >= _ADAM8BIT_MIN_SIZE else 8 * n
        elif optimizer == "adafactor":
            total += 4 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else n)
        else:
            raise ValueError(f"no state model for optimizer {optimizer!r}")
    return total


# ---- putting it together ------------------------------------------------------------------------------------
def estimate_memory(spec: ModelSpec, config: "Config", *, batch_size: int, width: int, height: int,
                    weight_dtype: torch.dtype, device_type: str = "cuda") -> MemoryEstimate:
    """The estimate for ``config``'s network and training settings on the architecture ``spec``, for one batch
    of ``batch_size`` images at ``width`` x ``height``, with the frozen weights (and autocast) in ``weight_dtype``.
    ``device_type`` chooses the autocast lists and whether the CUDA runtime is counted."""
    import time

    started = time.perf_counter()
    models = _build_meta_models(spec, weight_dtype)
    _inject_meta(models, spec, config)
    meter = _measure_activations(models, spec, config, batch_size=batch_size, width=width, height=height,
                                weight_dtype=weight_dtype, device_type=device_type)
    trainable = [p for p in models.adapters.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = config.training.optimizer
    dtype_name = _DTYPE_NAMES[weight_dtype]
    activations = f"saved for backward, batch {batch_size} at {width}x{height}"
    if config.training.gradient_checkpointing:
        activations += (f"; {size_text(meter.outside_bytes)} kept between checkpoints + "
                        f"{size_text(meter.largest_segment_bytes)} for the largest recomputed block")
    items = [
        MemoryItem("UNet weights", models.frozen_bytes["UNet"], dtype_name),
        MemoryItem("text encoder weights", models.frozen_bytes["text encoders"], dtype_name),
        MemoryItem("VAE weights", models.vae_bytes, "fp32"),
        MemoryItem("adapter parameters", adapter_bytes, f"{count:,} trainable, fp32"),
        MemoryItem("gradients", adapter_bytes, "fp32"),
        MemoryItem("optimizer state", optimizer_state_bytes(optimizer, [p.shape for p in trainable]), optimizer),
        MemoryItem("activations", meter.total, activations,
                   parts={"outside_checkpoints": meter.outside_bytes, "largest_segment": meter.largest_segment_bytes}),
    ]
    if device_type == "cuda":
        items.append(MemoryItem("CUDA runtime", CUDA_RUNTIME_BYTES, "context and library workspaces, typical"))
    not_included = ["backward's transient gradient tensors and previews (VAE decode, CFG batch)",
                    "allocator fragmentation (keep 10-20% headroom)"]
    if not config.dataset.cache_latents:
        not_included.insert(0, "the VAE encoder's transient activations (dataset.cache_latents is off)")
    return MemoryEstimate(items=items, batch_size=batch_size, width=width, height=height, precision=dtype_name,
                          device_type=device_type, gradient_checkpointing=config.training.gradient_checkpointing,
                          optimizer=optimizer, seconds=round(time.perf_counter() - started, 3),
                          not_included=not_included)
