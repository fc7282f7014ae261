"""The adapter shell shared by every image method.

An adapter wraps one frozen ``nn.Linear`` or ``nn.Conv2d`` (the *base layer*) and adds a trainable
change to it. Each method file supplies pure tensor functions (the math, testable without a model) and a
subclass of :class:`Adapter` that only holds parameters and calls those functions.

Conventions every method follows (the formats layer relies on them):

* Parameter and buffer names are the kohya/LyCORIS key suffixes (``lora_down.weight``, ``hada_w1_a``,
  ``lokr_w1``, ``oft_blocks``, ``alpha`` ...), so ``adapter.adapter_state_dict()`` is exactly what a
  WebUI file stores for this module (``alpha`` included as a 0-d tensor).
* ``delta_weight(m)`` is the exact change of the base weight at multiplier ``m`` in fp32, shaped like
  the base weight. It is for export, merging and tests; training never calls it when a cheaper
  low-rank or block path exists.
* ``forward`` during training uses that cheaper path (``adapted_forward``).
* At initialisation the output equals the base layer's output.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lycotrain.errors import AdapterError

BaseLayer = nn.Linear | nn.Conv2d


class Adapter(nn.Module):
    """A frozen base layer plus a trainable change. Subclasses implement the method's math."""

    method: ClassVar[str] = ""

    def __init__(self, base: BaseLayer, *, multiplier: float = 1.0, module_dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise AdapterError(f"{self.method}: cannot wrap {type(base).__name__}; only Linear and Conv2d")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise AdapterError(f"{self.method}: grouped convolutions (groups={base.groups}) are not supported")
        if not 0.0 <= module_dropout < 1.0:
            raise AdapterError(f"module_dropout must be in [0, 1), got {module_dropout}")
        base.requires_grad_(False)
        self.base = base
        self.multiplier = float(multiplier)
        self.module_dropout = float(module_dropout)
        self.merged = False

    # ---- geometry of the base layer -------------------------------------------------------------
    @property
    def is_conv(self) -> bool:
        return isinstance(self.base, nn.Conv2d)

    @property
    def out_features(self) -> int:
        return self.base.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[1]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.base.kernel_size) if self.is_conv else (1, 1)  # type: ignore[return-value]

    @property
    def is_pointwise(self) -> bool:
        """Linear, or a 1x1 convolution: both act on channels only."""
        return self.kernel_size == (1, 1)

    def base_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Apply ``weight`` the way the base layer applies its own (same stride, padding, dilation)."""
        if self.is_conv:
            conv: nn.Conv2d = self.base  # type: ignore[assignment]
            return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return F.linear(x, weight, bias)

    # ---- what each method implements ---------------------------------------------------------------
    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        """Exact fp32 change of the base weight at ``multiplier``; shaped like the base weight."""
        raise NotImplementedError

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the adapter's effect at ``self.multiplier``, without a d_out x d_in matrix."""
        raise NotImplementedError

    def extra_loss(self) -> torch.Tensor | None:
        """A regulariser this method adds to the training loss (HRA orthogonality), or None."""
        return None

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this adapter's shape (rank, factor, ...)."""
        return {}

    # ---- the per-module ``alpha`` of the file format -----------------------------------------------
    def register_alpha(self, value: float) -> None:
        """Store ``alpha`` as the 0-d buffer the file format wants, and as a Python float for the hot path.

        Reading a tensor with ``float()`` in every forward would force a device sync per layer on a GPU, so
        the float is cached and refreshed whenever a state dict is loaded.
        """
        # the fp32-rounded value, as it reads back from a file (rounded on the CPU: the model may be on meta)
        self.alpha_value = float(torch.tensor(float(value), dtype=torch.float32, device="cpu"))
        self.register_buffer("alpha", torch.tensor(self.alpha_value))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        alpha = getattr(self, "alpha", None)
        if isinstance(alpha, torch.Tensor) and not alpha.is_meta:
            self.alpha_value = float(self.alpha)

    # ---- shared behaviour -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.multiplier == 0.0:
            return self.base(x)
        if self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout:
            return self.base(x)
        return self.adapted_forward(x)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's own tensors (no ``base.`` keys), named as in a kohya/LyCORIS file."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight (for inference or export); ``unmerge`` undoes it."""
        if self.merged:
            return
        weight = self.base.weight
        weight.copy_((weight.float() + self.delta_weight(self.multiplier)).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.merged = False
        weight = self.base.weight
        weight.copy_(self.unmerged_weight(weight).to(weight.dtype))

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        """The base weight before ``merge``. Methods whose delta depends on W (OFT, HRA) invert instead."""
        return merged.float() - self.delta_weight(self.multiplier)

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.hyperparameters().items())
        return f"method={self.method}, {params}, multiplier={self.multiplier}"


def scale_from_alpha(alpha: float | None, rank: int) -> float:
    """kohya/LyCORIS rule: alpha None or 0 means alpha = rank (scale 1)."""
    if alpha is None or alpha == 0:
        return 1.0
    return float(alpha) / rank


def rank_dropout_mask(rank: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """Per-sample rank dropout (LyCORIS): drop whole rank components, rescale the kept ones."""
    keep = (torch.rand(like.shape[0], rank, device=like.device) >= p).to(like.dtype)
    return keep / (1.0 - p)
