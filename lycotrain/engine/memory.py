"""How much device memory a training run needs, estimated before it starts: the parts every task shares.

A parameter-efficient run keeps on the device

* the frozen model weights (each task counts its own models: ``diffusion/memory.py``, ``text/memory.py``),
* the adapter parameters, their gradients and the optimizer state (:func:`training_state_items`,
  :func:`optimizer_state_bytes`),
* the activations autograd saves for backward, and
* on CUDA, the runtime itself (context and library workspaces): a typical constant, not measured.

The activations are found by running one training forward (+ loss) of the real architecture, built on the
**meta device** (no memory, no weights read) with the configured adapters, under ``saved_tensors_hooks``
(:class:`SavedTensorMeter`) that add up the bytes of every saved storage once, leaving out the models' own
parameters and buffers (counted as weights). Under gradient checkpointing each of torch's non-reentrant
checkpoint segments is metered apart (:meth:`SavedTensorMeter.checkpoint_contexts` as its ``context_fn``): the
estimate keeps what lives outside them (their inputs included) plus the largest segment, which backward
recomputes one at a time.

Meta tensors differ from GPU tensors in two ways that matter here; :class:`MetaTrainingMode` makes up for both.
Autocast does not exist for them, so the mode casts the inputs of the ops in the device's autocast lists as
autocast does (:data:`AUTOCAST_OPS`). And scaled-dot-product attention on meta falls back to its math
decomposition, which keeps the L x L attention matrix; GPUs (and CPUs) run fused kernels that keep only q, k,
v, the output and the log-sum-exp, so the mode routes attention to the fused CPU kernel's meta version, which
saves exactly those.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

GIB = 1024**3
# CUDA context plus cuBLAS/cuDNN workspaces, outside PyTorch's allocator: typically 0.3-0.6 GiB
CUDA_RUNTIME_BYTES = 512 * 1024**2
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

# Ops (by name) that autocast runs in the low-precision dtype / in float32, per device: PyTorch's "Autocast
# Op Reference", restricted to what SD UNets, CLIP text encoders and causal LMs call. CUDA runs norms and
# softmax in fp32 (upsampling is on neither list: it keeps its input's dtype); the CPU list keeps them in the
# input's dtype.
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
    parts: dict[str, int] = field(default_factory=dict)  # activations: outside_checkpoints, largest_segment


@dataclass
class MemoryEstimate:
    """An estimate (labelled so wherever it is shown) of the device memory one training process needs.

    Each task's subclass says what its batch is (:meth:`batch_text`) and which dataset setting shrinks it
    (:meth:`size_saving`)."""

    items: list[MemoryItem]
    batch_size: int
    precision: str  # fp32 | fp16 | bf16: what the forward computes in (autocast's dtype, or the weights')
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

    def batch_text(self) -> str:
        raise NotImplementedError

    def size_saving(self) -> str:
        raise NotImplementedError

    def checkpointing_saving(self) -> str | None:
        """The advice to turn gradient checkpointing on, where it is off and the run could use it."""
        return None if self.gradient_checkpointing else "set training.gradient_checkpointing = true"

    def fit_warning(self) -> str | None:
        """A message when the estimate exceeds the visible GPU's memory, naming settings that lower it."""
        if self.gpu is None or self.total_bytes <= self.gpu["total_bytes"]:
            return None
        return (f"the estimated memory need, {gib(self.total_bytes)} GiB, exceeds the {gib(self.gpu['total_bytes'])} "
                f"GiB of {self.gpu['name']}: training will likely run out of memory; {', '.join(self._savings())}")

    def _savings(self) -> list[str]:
        savings = [s for s in [self.checkpointing_saving()] if s is not None]
        if self.precision == "fp32":
            savings.append('set training.mixed_precision = "bf16" (or "fp16")')
        if self.batch_size > 1:
            savings.append("lower training.batch_size (raise training.grad_accum to keep the effective batch)")
        savings.append(self.size_saving())
        if self.optimizer in ("adamw", "prodigy"):
            savings.append('choose training.optimizer = "adamw8bit" or "adafactor"')
        return savings

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "estimate": True, "total_bytes": self.total_bytes, "total_gib": gib(self.total_bytes)}

    def format_lines(self) -> list[str]:
        checkpointing = "on" if self.gradient_checkpointing else "off"
        lines = [f"Memory estimate (an estimate, per training process; {self.batch_text()}, {self.precision}, "
                 f"gradient checkpointing {checkpointing}, {self.optimizer}):"]
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


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's own parameters and buffers (shared ones once, as ``parameters()`` yields them)."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def training_state_items(trainable: list[torch.Tensor], optimizer: str, meter: "SavedTensorMeter", *,
                         batch_text: str, gradient_checkpointing: bool, device_type: str) -> list[MemoryItem]:
    """What every adapter run holds besides the frozen weights: the adapter parameters (as they are), their
    gradients (same dtype), the optimizer state, the activations ``meter`` counted for a batch described by
    ``batch_text``, and on CUDA the runtime."""
    count = sum(p.numel() for p in trainable)
    adapter_bytes = tensor_bytes(trainable)
    dtypes = "/".join(sorted({DTYPE_NAMES.get(p.dtype, str(p.dtype)) for p in trainable}))
    activations = f"saved for backward, {batch_text}"
    if gradient_checkpointing:
        activations += (f"; {size_text(meter.outside_bytes)} kept between checkpoints + "
                        f"{size_text(meter.largest_segment_bytes)} for the largest recomputed block")
    items = [
        MemoryItem("adapter parameters", adapter_bytes, f"{count:,} trainable, {dtypes}"),
        MemoryItem("gradients", adapter_bytes, dtypes),
        MemoryItem("optimizer state", optimizer_state_bytes(optimizer, [p.shape for p in trainable]), optimizer),
        MemoryItem("activations", meter.total, activations,
                   parts={"outside_checkpoints": meter.outside_bytes, "largest_segment": meter.largest_segment_bytes}),
    ]
    if device_type == "cuda":
        items.append(MemoryItem("CUDA runtime", CUDA_RUNTIME_BYTES, "context and library workspaces, typical"))
    return items


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

    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` for torch's non-reentrant checkpoint: the forward metered as one segment, the
        recompute (never run here) as is."""
        return self.segment(), contextlib.nullcontext()

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
class MetaTrainingMode(TorchFunctionMode):
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
    """SDPA as a fused kernel computes and saves it (q, k, v, output, log-sum-exp; no attention matrix). Grouped
    keys and values stay grouped (``enable_gqa``: the fused kernels read them so). A boolean mask becomes an
    additive one in the query's dtype, as SDPA makes it at every call before choosing a kernel (the kernels
    save that copy)."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill_(attn_mask.logical_not(), -math.inf)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)
    return out


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
