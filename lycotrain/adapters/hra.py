"""HRA (Householder reflection adaptation; Yuan et al. 2024, PEFT ``tuners/hra``): W' = W H on the input side.

Key: ``hra_u`` (in, r); for a convolution (in·kh·kw, r), the flattened filter axis in PyTorch order.
specs/peft-methods.md §4, specs/webui-formats.md §3.6. No WebUI loads HRA: formats exports it as an exact
rank-r LoRA with :func:`hra_to_lora_factors`.

Math (PEFT ``HRALinear.get_delta_weight``):

    default:     H = Π_{i=1..r} (I - 2 û_i û_iᵀ),  û_i = u_i / ‖u_i‖,   product taken left to right
    apply_gs:    Q = Gram-Schmidt(u_1 … u_r),      H = I - 2 Q Qᵀ
    W' = W H,    ΔW(m) = m · W (H - I)                 (m scales the delta linearly; see below)

Compact WY form (Joffrain et al., "Accumulating Householder transformations, revisited", 2006): with the
*unnormalised* u, G = Uᵀ U and T = strict_upper(G) + diag(G) / 2,

    Π_i (I - 2 u_i u_iᵀ / ‖u_i‖²) = I - U T⁻¹ Uᵀ,

so every HRA transform here is H = I - V T⁻¹ Vᵀ with (V, T) = (U, that T) or (Q, I/2) for Gram-Schmidt.
Training never builds H (in x in) or W'. Both exact forms cost like a rank-r LoRA:
* input side, base(H_m x) = base(x - m V T⁻¹ Vᵀ x), for Linear / 1x1 layers with in <= out;
* output side, W x + up (down x) with down = Vᵀ and up = -m (W V) T⁻¹ (out x r, rebuilt from the frozen W
  each step), for narrowing layers and every kxk conv (a rank-r "LoCon": no weight-gradient convolution).

Multiplier: ``m`` interpolates linearly, H_m = I + m (H - I). It is what the exported LoRA does at strength m
(the WebUIs scale a LoRA delta linearly), so training previews, merge and export agree.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lycotrain.adapters.base import Adapter, BaseLayer
from lycotrain.errors import AdapterError


# ---- pure functions ---------------------------------------------------------------------------------
def hra_orthonormal_basis(u: torch.Tensor) -> torch.Tensor:
    """Q (d x r) with orthonormal columns, span(Q) ⊇ span(u); Gram-Schmidt of the columns up to their signs.

    Reduced QR is Gram-Schmidt done stably: its Q spans the same nested subspaces, so Q Qᵀ (all that HRA uses)
    is identical to PEFT's loop for full-rank u, and still an orthonormal superset basis when u is not.
    """
    return torch.linalg.qr(u, mode="reduced").Q


@functools.lru_cache(maxsize=32)
def _wy_mask(rank: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """1 above the diagonal, 1/2 on it, 0 below: T = mask ⊙ UᵀU in one multiply."""
    return torch.triu(torch.ones(rank, rank, dtype=dtype, device=device)) - 0.5 * torch.eye(rank, dtype=dtype,
                                                                                              device=device)


def hra_factors(u: torch.Tensor, apply_gs: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, T) with H = I - V T⁻¹ Vᵀ exactly as PEFT's H; T is upper triangular (r x r)."""
    if apply_gs:
        q = hra_orthonormal_basis(u)
        return q, 0.5 * torch.eye(q.shape[1], dtype=q.dtype, device=q.device)
    return u, (u.t() @ u) * _wy_mask(u.shape[1], u.dtype, u.device)


def hra_input_map(v: torch.Tensor, t: torch.Tensor, multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with H_m x = x - up (down x): down = Vᵀ (r x d), up = m V T⁻¹ (d x r), for the input side."""
    return v.t(), multiplier * torch.linalg.solve_triangular(t, v, upper=True, left=False)


def hra_output_map(weight_flat: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                   multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) with W H_m = W + up @ down: down = Vᵀ (r x d), up = -m (W V) T⁻¹ (out x r).

    HRA's delta is a rank-r LoRA whose up factor depends on the frozen W; building it costs out x d x r per step.
    """
    up = torch.linalg.solve_triangular(t, weight_flat @ v.to(weight_flat.dtype), upper=True, left=False)
    return v.t(), -multiplier * up


def hra_delta(weight: torch.Tensor, u: torch.Tensor, apply_gs: bool = False, multiplier: float = 1.0) -> torch.Tensor:
    """ΔW = m · W (H - I) = up @ down in fp32, shaped like ``weight`` (conv filters flattened as (out, in·kh·kw))."""
    v, t = hra_factors(u.float(), apply_gs)
    down, up = hra_output_map(weight.float().reshape(weight.shape[0], -1), v, t, multiplier)
    return (up @ down).reshape(weight.shape)


def hra_unapply(merged_weight: torch.Tensor, u: torch.Tensor, apply_gs: bool = False,
                multiplier: float = 1.0) -> torch.Tensor:
    """Invert a merge: W = W' H_m⁻¹ with Woodbury, H_m⁻¹ = I + V (T/m - VᵀV)⁻¹ Vᵀ (small r x r solve).

    H_m = (1 - m) I + m H with H orthogonal, so H_m is well conditioned unless m is near 1/2 (where it can
    be singular: odd r, Gram-Schmidt, or orthogonal u); :meth:`HRAAdapter.merge` refuses that case.
    """
    if multiplier == 0.0:
        return merged_weight.float()
    w = merged_weight.float().reshape(merged_weight.shape[0], -1)
    v, t = hra_factors(u.float(), apply_gs)
    core = torch.linalg.solve(t / multiplier - v.t() @ v, v.t())  # (T/m - VᵀV)⁻¹ Vᵀ
    return (w + (w @ v) @ core).reshape(merged_weight.shape)


def hra_orthogonality(u: torch.Tensor) -> torch.Tensor:
    """‖I - ÛᵀÛ‖_F with column-normalised Û: the HRA authors' regulariser (their ``compute_loss``;
    PEFT has none). Zero when the reflection vectors are orthogonal."""
    u_hat = u / torch.linalg.vector_norm(u, dim=0, keepdim=True)
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    return torch.linalg.matrix_norm(eye - u_hat.t() @ u_hat)


@torch.no_grad()
def hra_to_lora_factors(weight: torch.Tensor, u: torch.Tensor, apply_gs: bool = False,
                        multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-r LoRA of an HRA delta: ΔW = [W (H - I) Q] Qᵀ (specs/webui-formats.md §3.6).

    H - I vanishes on span(u)^⊥ and Q Qᵀ projects onto a space containing span(u), so up @ down = ΔW(m)
    exactly (at alpha = r, scale 1). Returns (up, down) in the LoRA key shapes: Linear (out, r), (r, in);
    conv (out, r, 1, 1), (r, in, kh, kw). Computed in fp64, returned in fp32. Tied to this base ``weight``.
    """
    w = weight.double().reshape(weight.shape[0], -1)
    u64 = u.double()
    q = hra_orthonormal_basis(u64)
    v, t = hra_factors(u64, apply_gs)
    up = -multiplier * (w @ v) @ torch.linalg.solve_triangular(t, v.t() @ q, upper=True)
    down = q.t()
    rank = down.shape[0]
    if weight.dim() == 4:
        return up.reshape(weight.shape[0], rank, 1, 1).float(), down.reshape(rank, *weight.shape[1:]).float()
    return up.float(), down.float()


def hra_symmetric_init(in_features: int, rank: int) -> torch.Tensor:
    """PEFT's init for even r: kaiming-uniform half, each column repeated twice, so H = Π (H_i H_i) = I."""
    half = torch.empty(in_features, rank // 2)
    nn.init.kaiming_uniform_(half, a=math.sqrt(5))
    return torch.repeat_interleave(half, 2, dim=1)


# ---- module -----------------------------------------------------------------------------------------
class HRAAdapter(Adapter):
    """r Householder reflections on the input side of a frozen Linear/Conv2d (PEFT's HRA layout)."""

    method = "hra"

    def __init__(self, base: BaseLayer, rank: int = 8, apply_gs: bool = False, reg_lambda: float = 0.0, *,
                 multiplier: float = 1.0, module_dropout: float = 0.0) -> None:
        super().__init__(base, multiplier=multiplier, module_dropout=module_dropout)
        kh, kw = self.kernel_size
        flat_in = self.in_features * kh * kw
        if not 1 <= rank <= flat_in:
            raise AdapterError(f"hra: rank must be in [1, {flat_in}] for this layer, got {rank}")
        if reg_lambda < 0:
            raise AdapterError(f"hra: reg_lambda must be >= 0, got {reg_lambda}")
        self.rank = int(rank)
        self.apply_gs = bool(apply_gs)
        self.reg_lambda = float(reg_lambda)
        self.hra_u = nn.Parameter(torch.empty(flat_in, self.rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity start (PEFT's symmetric init) when possible. Odd r cannot pair its reflections and
        Gram-Schmidt makes H = I - 2QQᵀ, never I: both get PEFT's plain kaiming init (a non-trivial start)."""
        if self.rank % 2 == 0 and not self.apply_gs:
            with torch.no_grad():
                self.hra_u.copy_(hra_symmetric_init(self.hra_u.shape[0], self.rank))
        else:
            nn.init.kaiming_uniform_(self.hra_u, a=math.sqrt(5))

    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        return hra_delta(self.base.weight, self.hra_u, self.apply_gs, multiplier)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two exact low-rank forms. Input side, base(H_m x): ~3·tokens·in·r (two thin matmuls + passes over x).
        # Output side, W x + up (down x) with up = -m W V T⁻¹: ~tokens·(in + 2·out)·r plus 2·out·in·r to build
        # and differentiate W V. Take the cheaper; kxk convs always use the output side (no weight-gradient conv).
        v, t = hra_factors(self.hra_u, self.apply_gs)
        tokens = x.numel() // self.in_features
        if self.is_pointwise and tokens * (self.in_features - self.out_features) <= self.out_features * self.in_features:
            down, up = hra_input_map(v, t, self.multiplier)
            return self.base(x - self._low_rank(x, down, up, like_base=False))
        weight = self.base.weight
        down, up = hra_output_map(weight.reshape(weight.shape[0], -1), v, t, self.multiplier)
        return self.base(x) + self._low_rank(x, down, up, like_base=True)

    def _low_rank(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, like_base: bool) -> torch.Tensor:
        """up @ (down x). For convs, ``like_base`` applies ``down`` with the base's kernel, stride and padding
        (an output-side term); otherwise as a 1x1 map at the input's resolution (an input-side term)."""
        # contiguous (r, d) / (d', r) factors: F.linear on them is ~2x faster than x @ V on CPU
        down, up = down.to(x.dtype).contiguous(), up.to(x.dtype).contiguous()
        if not self.is_conv:
            return F.linear(F.linear(x, down), up)
        if like_base:
            hidden = self.base_op(x, down.reshape(down.shape[0], *self.base.weight.shape[1:]))
        else:
            hidden = F.conv2d(x, down[:, :, None, None])
        return F.conv2d(hidden, up[:, :, None, None])

    def extra_loss(self) -> torch.Tensor | None:
        if self.reg_lambda == 0.0:
            return None
        return self.reg_lambda * hra_orthogonality(self.hra_u)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged and abs(1.0 - 2.0 * self.multiplier) < 1e-3:
            raise AdapterError(
                f"hra: cannot merge at multiplier {self.multiplier}: near 0.5 the interpolated transform can be "
                "singular, so the merge could not be undone; export with delta_weight() instead")
        super().merge()

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        # the delta depends on W, so subtracting delta_weight() of the merged weight would be wrong
        return hra_unapply(merged, self.hra_u, self.apply_gs, self.multiplier)

    def hyperparameters(self) -> dict[str, Any]:
        return {"rank": self.rank, "apply_gs": self.apply_gs, "reg_lambda": self.reg_lambda}
