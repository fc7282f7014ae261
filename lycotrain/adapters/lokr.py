"""LoKr: delta W = s * kron(W1, W2), W1 (a, c) small, W2 (b, d[, kh, kw]) optionally low rank.

Keys (specs/webui-formats.md §3.3): ``lokr_w1`` (a, c) or ``lokr_w1_a`` (a, r) + ``lokr_w1_b`` (r, c);
``lokr_w2`` (b, d[, kh, kw]) or ``lokr_w2_a`` (b, r) + ``lokr_w2_b`` (r, d*kh*kw) -- always 2-D: the WebUIs
reject a 4-D ``lokr_w2_b`` and ComfyUI/Forge fail on ``lokr_t2``, so this module never makes a Tucker core.

Layout (LyCORIS): ``a, b = factorization(out, factor)``, ``c, d = factorization(in, factor)``. W1 is decomposed
only with ``decompose_both`` and ``rank < max(a, c) / 2``; W2 is full when ``rank >= max(b, d) / 2`` or with
``full_matrix``. Scale ``s = alpha / rank``, except when both factors are full: then ``s = 1`` and the stored
``alpha`` is the rank, which is what LyCORIS stores and what A1111/ComfyUI compute from such a file.

Training uses the Kronecker "vec trick": with x split as (c, d), ``kron(W1, W2) x = vec(W1 X W2^T)``, i.e. W2
on the d axis (a matmul, or a conv on groups of d channels) and W1 on the c axis; kron(W1, W2) is never built.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lycotrain.adapters.base import Adapter, BaseLayer, scale_from_alpha
from lycotrain.adapters.factorization import factorization
from lycotrain.adapters.functional_common import (ConvArgs, Scale, apply_weight, conv_args_of, per_row,
                                                  row_dropout_scale)
from lycotrain.errors import AdapterError


# ---- pure functions ---------------------------------------------------------------------------------
class LoKrLayout(NamedTuple):
    """``out = a * b``, ``in = c * d``; which factors are stored full."""

    a: int
    b: int
    c: int
    d: int
    w1_full: bool
    w2_full: bool


def lokr_layout(out_features: int, in_features: int, rank: int, factor: int = -1, *,
                decompose_both: bool = False, full_matrix: bool = False) -> LoKrLayout:
    """LyCORIS's factor shapes and full-versus-decomposed rules (specs/webui-formats.md §3.3)."""
    a, b = factorization(out_features, factor)
    c, d = factorization(in_features, factor)
    w1_full = full_matrix or not (decompose_both and rank < max(a, c) / 2)
    w2_full = full_matrix or rank >= max(b, d) / 2
    return LoKrLayout(a, b, c, d, w1_full, w2_full)


def lokr_w1(w1: torch.Tensor | None, w1a: torch.Tensor | None, w1b: torch.Tensor | None) -> torch.Tensor:
    """W1 (a, c): stored full, or ``w1_a @ w1_b``."""
    return w1 if w1 is not None else w1a @ w1b  # type: ignore[operator]


def lokr_w2(w2: torch.Tensor | None, w2a: torch.Tensor | None, w2b: torch.Tensor | None,
            kernel: tuple[int, int] | None) -> torch.Tensor:
    """W2 (b, d) for a Linear, (b, d, kh, kw) for a conv: stored full, or ``w2_a @ w2_b`` reshaped."""
    if w2 is not None:
        return w2
    full = w2a @ w2b  # type: ignore[operator]
    return full if kernel is None else full.reshape(full.shape[0], -1, *kernel)


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: Scale, weight_shape: torch.Size) -> torch.Tensor:
    """delta W = scale * kron(W1, W2) in the base weight's shape (fp32). For export, merging and tests."""
    w1 = w1.float()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    delta = torch.kron(w1, w2.float().contiguous()).reshape(weight_shape)
    return delta * per_row(scale, delta.dim())


def _w2_cost(layout: LoKrLayout, rank: int, kernel_numel: int) -> int:
    """Multiply-adds per position of applying W2 (full or low rank) to one group of d channels."""
    if layout.w2_full:
        return layout.b * layout.d * kernel_numel
    return rank * (layout.d * kernel_numel + layout.b)


def w1_first(layout: LoKrLayout, rank: int, kernel_numel: int, stride_area: int = 1) -> bool:
    """Conv layers: whether mixing the c groups with W1 before the W2 convolution costs fewer multiply-adds."""
    a, b, c, d = layout.a, layout.b, layout.c, layout.d
    w2 = _w2_cost(layout, rank, kernel_numel)
    after = c * w2 + a * c * b  # per output position
    before = a * c * d * stride_area + a * w2
    return before < after


def lokr_forward(x: torch.Tensor, base_out: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor | None,
                 w2a: torch.Tensor | None, w2b: torch.Tensor | None, scale: Scale, layout: LoKrLayout,
                 conv: ConvArgs | None, kernel: tuple[int, int]) -> torch.Tensor:
    """``base_out + scale * kron(W1, W2) x`` with the vec trick (W2 full, or as ``w2_a``, ``w2_b``).

    With x split per sample as X (c, d): W2 acts on d (a matmul, or a conv over c groups of d channels), then
    W1 mixes the c groups. The scale is folded into the small W1 and the add into the last matmul (baddbmm):
    on a CPU every pass over an activation-sized tensor costs about as much as these thin matmuls.
    """
    if isinstance(scale, torch.Tensor):  # one scale per output channel (rank dropout): scale the delta itself
        delta = lokr_forward(x, torch.zeros_like(base_out), w1, w2, w2a, w2b, 1.0, layout, conv, kernel)
        return base_out + delta * (scale if conv is None else scale.reshape(-1, 1, 1))
    a, b, c, d = layout.a, layout.b, layout.c, layout.d
    w1 = w1 * scale
    if conv is None:
        groups = x.reshape(-1, c, d)
        z = F.linear(groups, w2) if w2 is not None else F.linear(F.linear(groups, w2b), w2a)  # (m, c, b)
        out = torch.baddbmm(base_out.reshape(-1, a, b), w1.expand(z.shape[0], a, c), z)
        return out.reshape(base_out.shape)

    rank = 0 if w2b is None else w2b.shape[0]

    def apply_w2(h: torch.Tensor) -> torch.Tensor:  # (n, d, H, W) -> (n, b, H', W')
        if w2 is not None:
            return apply_weight(h, w2, None, conv)
        h = apply_weight(h, w2b.reshape(rank, d, *kernel), None, conv)  # type: ignore[union-attr]
        return F.conv2d(h, w2a[:, :, None, None])  # type: ignore[index]

    n, _, height, width = x.shape
    if w1_first(layout, rank, kernel[0] * kernel[1], conv.stride[0] * conv.stride[1]):
        mixed = torch.matmul(w1, x.reshape(n, c, d * height * width))  # (n, a, d*H*W)
        return base_out + apply_w2(mixed.reshape(n * a, d, height, width)).reshape(base_out.shape)
    z = apply_w2(x.reshape(n * c, d, height, width))  # (n*c, b, H', W')
    out = torch.baddbmm(base_out.reshape(n, a, -1), w1.expand(n, a, c), z.reshape(n, c, -1))
    return out.reshape(base_out.shape)


# ---- module -----------------------------------------------------------------------------------------
class LoKrAdapter(Adapter):
    method = "lokr"

    def __init__(self, base: BaseLayer, rank: int = 8, alpha: float | None = None, *, factor: int = -1,
                 decompose_both: bool = False, full_matrix: bool = False, rank_dropout: float = 0.0,
                 multiplier: float = 1.0, module_dropout: float = 0.0) -> None:
        super().__init__(base, multiplier=multiplier, module_dropout=module_dropout)
        if rank < 1:
            raise AdapterError(f"lokr: rank must be >= 1, got {rank}")
        if factor == 0 or factor < -1:
            raise AdapterError(f"lokr: factor must be -1 (most square split) or a positive integer, got {factor}")
        if not 0.0 <= rank_dropout < 1.0:
            raise AdapterError(f"lokr: rank_dropout must be in [0, 1), got {rank_dropout}")
        self.rank = int(rank)
        self.factor = int(factor)
        self.decompose_both = bool(decompose_both)
        self.full_matrix = bool(full_matrix)
        self.rank_dropout_p = float(rank_dropout)
        self.layout = lokr_layout(self.out_features, self.in_features, self.rank, self.factor,
                                  decompose_both=self.decompose_both, full_matrix=self.full_matrix)
        both_full = self.layout.w1_full and self.layout.w2_full
        # LyCORIS: both factors full => alpha := rank (scale 1); the WebUIs then ignore alpha as well
        self.register_alpha(rank if both_full or not alpha else alpha)
        self._build_parameters()
        self.reset_parameters()

    def _build_parameters(self) -> None:
        a, b, c, d, w1_full, w2_full = self.layout
        r = self.rank
        kernel = self.kernel_size if self.is_conv else ()
        kernel_numel = self.kernel_size[0] * self.kernel_size[1]
        self.lokr_w1 = nn.Parameter(torch.empty(a, c)) if w1_full else None
        self.lokr_w1_a = None if w1_full else nn.Parameter(torch.empty(a, r))
        self.lokr_w1_b = None if w1_full else nn.Parameter(torch.empty(r, c))
        self.lokr_w2 = nn.Parameter(torch.empty(b, d, *kernel)) if w2_full else None
        self.lokr_w2_a = None if w2_full else nn.Parameter(torch.empty(b, r))
        self.lokr_w2_b = None if w2_full else nn.Parameter(torch.empty(r, d * kernel_numel))

    def reset_parameters(self) -> None:
        """LyCORIS's initialisation: the W2 side starts at zero (w2, or w2_b), so delta W = 0."""
        for p in (self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b, self.lokr_w2_a):
            if p is not None:
                nn.init.kaiming_uniform_(p, a=5 ** 0.5)
        nn.init.zeros_(self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_b)

    @property
    def scale(self) -> float:
        """The effective scale of kron(W1, W2): alpha / rank, or 1 when both factors are stored full."""
        if self.layout.w1_full and self.layout.w2_full:
            return 1.0
        return scale_from_alpha(self.alpha_value, self.rank)

    def w1(self) -> torch.Tensor:
        return lokr_w1(self.lokr_w1, self.lokr_w1_a, self.lokr_w1_b)

    def w2(self) -> torch.Tensor:
        return lokr_w2(self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b, self.kernel_size if self.is_conv else None)

    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        return lokr_delta(self.w1(), self.w2(), multiplier * self.scale, self.base.weight.shape)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale: Scale = self.multiplier * self.scale
        if self.training and self.rank_dropout_p > 0:
            scale = scale * row_dropout_scale(self.out_features, self.rank_dropout_p, x)
        return lokr_forward(x, self.base(x), self.w1(), self.lokr_w2, self.lokr_w2_a, self.lokr_w2_b, scale,
                            self.layout, conv_args_of(self.base), self.kernel_size)

    def hyperparameters(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha_value, "factor": self.factor,
                "decompose_both": self.decompose_both, "full_matrix": self.full_matrix}
