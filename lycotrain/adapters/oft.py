"""OFT in the WebUI layout (LyCORIS ``diag-oft``): blocks of output channels rotated by Cayley rotations.

Keys (specs/webui-formats.md §3.4): ``oft_blocks`` (n_blocks, bs, bs) with ``n_blocks * bs = out``,
``alpha`` () = the constraint ratio κ (0 = unconstrained), optional ``rescale`` (out, 1) / (out, 1, 1, 1).

Math (LyCORIS ``functional/diag_oft.py``; A1111 ``network_oft.py`` computes the same at multiplier 1):

    Q_k = B_k - B_kᵀ                                   skew-symmetric blocks
    κ_eff = κ · out;  if κ_eff > 0 and ‖Q‖ > κ_eff:  Q ← Q · κ_eff / ‖Q‖   (one norm over ALL blocks)
    R_k = (I + Q_k)(I - Q_k)⁻¹                         Cayley: orthogonal, R = I when B = 0
    R_m = m·R + (1 - m)·I                              LyCORIS multiplier
    W'_k = s_k ⊙ (R_m,kᵀ W_k)                          W_k = output rows k·bs … (k+1)·bs - 1

Training never builds W' nor a block-diagonal matrix. Output channel o of a Linear *or* of a convolution
depends on filter W[o] only, so rotating the filters of a block equals rotating that block of the output:
the adapter runs the frozen layer without its bias, rotates each block of output channels with one batched
matmul of small blocks that also adds the bias back (cost tokens x out x bs, like a rank-bs/2 LoRA; the
WebUIs rotate the weight, never the bias). Linear outputs are computed transposed, (out, tokens), so the
channel blocks are contiguous rows, as they already are in NCHW conv outputs. For a kxk convolution this
also avoids the full weight-gradient convolution that rotating the weight would cost in the backward pass
(measured: +5 % over the frozen conv step instead of +65 %).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from lycotrain.adapters.base import Adapter, BaseLayer
from lycotrain.adapters.factorization import factorization
from lycotrain.errors import AdapterError

# LyCORIS adds this to the norm before comparing it with the constraint; kept for bit-level agreement.
_NORM_EPS = 1e-8


# ---- pure functions ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _eye(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A shared identity (never written to): saves two allocations per adapter and step."""
    return torch.eye(size, dtype=dtype, device=device)


def oft_block_geometry(out_features: int, block_size: int) -> tuple[int, int]:
    """(block_size, n_blocks) exactly as LyCORIS: ``factorization(out, lora_dim)``, so bs <= n_blocks."""
    return factorization(out_features, block_size)


def _skew_and_inverse(oft_blocks: torch.Tensor, constraint: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The constrained skew blocks Q and (I - Q)⁻¹, in fp32.

    I - Q is never singular (Q skew-symmetric => eigenvalues 1 - iλ), so ``inv_ex`` skips the check and the
    device sync it would cost; the norm test is a clamp rather than a Python branch for the same reason.
    """
    blocks = oft_blocks.float()
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        q = q * torch.clamp(constraint / (torch.linalg.vector_norm(q) + _NORM_EPS), max=1.0)
    eye = _eye(q.shape[-1], q.dtype, q.device)
    return q, torch.linalg.inv_ex(eye - q)[0]


def oft_rotation(oft_blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """Exact Cayley rotations R (n_blocks, bs, bs) in fp32; ``constraint`` is κ_eff (= alpha * out), 0 = none.

    R = (I + Q)(I - Q)⁻¹ = 2 (I - Q)⁻¹ - I because the two factors commute: one batched inverse of small blocks.
    """
    _, inverse = _skew_and_inverse(oft_blocks, constraint)
    eye = _eye(inverse.shape[-1], inverse.dtype, inverse.device)
    return 2.0 * inverse - eye


def oft_rotation_minus_identity(oft_blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """R - I = 2 (I - Q)⁻¹ Q: no cancellation for small rotations, unlike (2 (I - Q)⁻¹ - I) - I (for export)."""
    q, inverse = _skew_and_inverse(oft_blocks, constraint)
    return 2.0 * inverse @ q


def oft_delta(weight: torch.Tensor, oft_blocks: torch.Tensor, rescale: torch.Tensor | None,
              constraint: float = 0.0, multiplier: float = 1.0) -> torch.Tensor:
    """ΔW = s ⊙ (R_mᵀ W) - W in fp32, shaped like ``weight`` (Linear or conv of any kernel size).

    R_m = m·R + (1 - m)·I is LyCORIS' multiplier (s is not interpolated). Written as
    s ⊙ (m (R - I)ᵀ W) + (s - 1) ⊙ W, which keeps full precision for small rotations.
    """
    n_blocks, bs, _ = oft_blocks.shape
    w = weight.float().reshape(n_blocks, bs, -1)
    delta = torch.einsum("knm,kni->kmi", multiplier * oft_rotation_minus_identity(oft_blocks, constraint), w)
    if rescale is not None:
        s = rescale.float().reshape(n_blocks, bs, 1)
        delta = s * delta + (s - 1.0) * w
    return delta.reshape(weight.shape)


def oft_unapply(merged_weight: torch.Tensor, oft_blocks: torch.Tensor, rescale: torch.Tensor | None,
                constraint: float = 0.0, multiplier: float = 1.0) -> torch.Tensor:
    """Invert a merge: W = R_m⁻ᵀ (W' / s) blockwise (fp32), so unmerge needs no stored copy of W.

    R_m is invertible for every m: R has no eigenvalue -1 (Cayley), so m·λ + 1 - m never vanishes.
    """
    n_blocks, bs, _ = oft_blocks.shape
    eye = _eye(bs, torch.float32, oft_blocks.device)
    rot = eye + multiplier * oft_rotation_minus_identity(oft_blocks, constraint)
    w = merged_weight.float().reshape(n_blocks, bs, -1)
    if rescale is not None:
        w = w / rescale.float().reshape(n_blocks, bs, 1)
    return torch.linalg.solve(rot.transpose(-1, -2), w).reshape(merged_weight.shape)


def oft_rotate_channels(out: torch.Tensor, mixing: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """out_k ← M_kᵀ out_k (+ bias) for each block k of channels; ``out`` is (batch, channels, tokens).

    One ``baddbmm`` over (batch · n_blocks) small matrices that reads the activation in place (the channel
    blocks are contiguous rows) and adds the bias in the same pass; no permuted copy, no block-diagonal matrix.
    """
    n_blocks, bs, _ = mixing.shape
    batch = out.shape[0]
    mixing_t = mixing.to(out.dtype).transpose(-1, -2).expand(batch, n_blocks, bs, bs).reshape(-1, bs, bs)
    blocks = out.reshape(batch * n_blocks, bs, -1)
    if bias is None:
        return torch.bmm(mixing_t, blocks).reshape(out.shape)
    bias = bias.reshape(1, n_blocks, bs, 1).expand(batch, n_blocks, bs, 1).reshape(-1, bs, 1)
    return torch.baddbmm(bias, mixing_t, blocks).reshape(out.shape)


# ---- module -----------------------------------------------------------------------------------------
class OFTAdapter(Adapter):
    """LyCORIS diag-OFT on a frozen Linear/Conv2d. ``block_size`` has LyCORIS' ``lora_dim`` meaning."""

    method = "oft"

    def __init__(self, base: BaseLayer, block_size: int = 8, constraint: float = 0.0, rescaled: bool = False, *,
                 multiplier: float = 1.0, module_dropout: float = 0.0) -> None:
        super().__init__(base, multiplier=multiplier, module_dropout=module_dropout)
        if block_size < 1:
            raise AdapterError(f"oft: block_size must be >= 1, got {block_size}")
        if constraint < 0:
            raise AdapterError(f"oft: constraint must be >= 0 (0 = unconstrained), got {constraint}")
        self.block_size, self.block_num = oft_block_geometry(self.out_features, block_size)
        self.register_alpha(constraint)
        self.oft_blocks = nn.Parameter(torch.zeros(self.block_num, self.block_size, self.block_size))
        self.rescale: nn.Parameter | None = None
        if rescaled:
            self.rescale = nn.Parameter(torch.ones(self.out_features, *[1] * (self.base.weight.dim() - 1)))

    @property
    def constraint(self) -> float:
        """κ_eff = alpha · out (LyCORIS ``diag_oft.py``: the file stores the ratio, the math uses it times out)."""
        return self.alpha_value * self.out_features

    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        return oft_delta(self.base.weight, self.oft_blocks, self.rescale, self.constraint, multiplier)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        mixing = oft_rotation(self.oft_blocks, self.constraint)
        if self.multiplier != 1.0:
            eye = _eye(self.block_size, mixing.dtype, mixing.device)
            mixing = self.multiplier * mixing + (1.0 - self.multiplier) * eye  # R_m (LyCORIS)
        if self.rescale is not None:
            # s ⊙ (Rᵀ y): scale column m of each block by s, cheaper than a pass over the activations
            mixing = mixing * self.rescale.reshape(self.block_num, 1, self.block_size)
        weight, bias = self.base.weight, self.base.bias
        if self.is_conv:
            out = self.base_op(x, weight)
            return oft_rotate_channels(out.flatten(2), mixing, bias).reshape(out.shape)
        # Linear: compute the output transposed, (out, tokens), so that channel blocks are contiguous rows
        tokens = x.reshape(-1, x.shape[-1])
        out_t = oft_rotate_channels(torch.mm(weight, tokens.t()).unsqueeze(0), mixing, bias)[0]
        return out_t.t().contiguous().reshape(*x.shape[:-1], self.out_features)

    def unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        # the delta depends on W, so subtracting delta_weight() of the merged weight would be wrong
        return oft_unapply(merged, self.oft_blocks, self.rescale, self.constraint, self.multiplier)

    def hyperparameters(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "constraint": self.alpha_value, "rescaled": self.rescale is not None}
