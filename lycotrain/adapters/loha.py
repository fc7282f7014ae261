"""LoHa: delta W = (alpha / r) * (W1 ⊙ W2), each Wk a rank-r product (or a Tucker product for kxk convs).

Keys (specs/webui-formats.md §3.2):

=========================  ==========================  =========================
key                        Linear / conv (flattened)   conv kxk Tucker
=========================  ==========================  =========================
``hada_w1_a``/``w2_a``     (out, r)                    (r, out)  (transposed!)
``hada_w1_b``/``w2_b``     (r, in*kh*kw)               (r, in)
``hada_t1``/``hada_t2``    --                          (r, r, kh, kw)
``alpha``                  ()                          ()
=========================  ==========================  =========================

Training never stores ``W1 ⊙ W2``. Two exact paths, chosen per call by a cost estimate (``prefer_merged``):

* *factored* (Khatri-Rao): ``W1 ⊙ W2 = P Q`` with ``P[o, (j,k)] = W1a[o,j] W2a[o,k]`` (out x r^2) and
  ``Q[(j,k), i] = W1b[j,i] W2b[k,i]`` (r^2 x in); a Tucker pair adds the core ``T1 ⊗ T2`` (r^2 x r^2 x kh x kw).
  Costs ~3 * tokens * r^2 * (in + out): best when r^2 is small against the layer width.
* *merged*: one op with ``W + delta W`` (it replaces the base op) whose backward rebuilds W1 and W2 from the
  factors; only the input and the factors are saved. Costs one weight-gradient GEMM (tokens * out * in) plus
  a few passes over out x in tensors: best for narrow layers with many tokens, or r^2 large against the width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lycotrain.adapters.base import Adapter, BaseLayer, scale_from_alpha
from lycotrain.adapters.functional_common import (ConvArgs, Scale, apply_weight, conv_args_of, output_positions,
                                                  per_row, row_dropout_scale)
from lycotrain.errors import AdapterError


# ---- pure functions ---------------------------------------------------------------------------------
def hada_factor(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None,
                weight_shape: torch.Size) -> torch.Tensor:
    """One Hadamard factor Wk in the base weight's shape (fp32): ``a @ b``, or the Tucker product."""
    if t is None:
        return (a.float() @ b.float()).reshape(weight_shape)
    return torch.einsum("ijyx,jq,ip->pqyx", t.float(), b.float(), a.float())


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
               t1: torch.Tensor | None, t2: torch.Tensor | None, scale: Scale,
               weight_shape: torch.Size) -> torch.Tensor:
    """delta W = scale * (W1 ⊙ W2), shaped like the base weight (fp32)."""
    delta = hada_factor(w1a, w1b, t1, weight_shape) * hada_factor(w2a, w2b, t2, weight_shape)
    return delta * per_row(scale, delta.dim())


def khatri_rao_factors(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                       t1: torch.Tensor | None, t2: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(P, core, Q)`` with ``W1 ⊙ W2 = P [core] Q``: P (out, r^2), Q (r^2, in[*kh*kw]), core (r^2, r^2, kh, kw)."""
    a1, a2 = (w1a, w2a) if t1 is None else (w1a.T, w2a.T)  # Tucker stores w?_a as (r, out)
    p = (a1[:, :, None] * a2[:, None, :]).flatten(1)
    q = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)
    if t1 is None or t2 is None:
        return p, None, q
    r2 = p.shape[1]
    core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(r2, r2, *t1.shape[2:])
    return p, core, q


def loha_factored_forward(x: torch.Tensor, base_out: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor,
                          w2a: torch.Tensor, w2b: torch.Tensor, t1: torch.Tensor | None, t2: torch.Tensor | None,
                          scale: Scale, conv: ConvArgs | None, kernel: tuple[int, int]) -> torch.Tensor:
    """``base_out`` + delta W applied to ``x`` through the Khatri-Rao factors; never forms an out x in matrix.

    The scale is folded into P and the add into the last matmul (addmm / baddbmm): one pass fewer over the
    output, which on a CPU costs about as much as the thin r^2 matmuls themselves.
    """
    p, core, q = khatri_rao_factors(w1a, w1b, w2a, w2b, t1, t2)
    p = p * per_row(scale, 2)
    r2 = p.shape[1]
    if conv is None:
        h = F.linear(x, q).reshape(-1, r2)
        return torch.addmm(base_out.reshape(-1, p.shape[0]), h, p.T).reshape(base_out.shape)
    if core is None:
        h = apply_weight(x, q.reshape(r2, -1, *kernel), None, conv)
    else:
        h = apply_weight(F.conv2d(x, q[:, :, None, None]), core, None, conv)
    n = x.shape[0]
    out = torch.baddbmm(base_out.reshape(n, p.shape[0], -1), p.expand(n, -1, -1), h.reshape(n, r2, -1))
    return out.reshape(base_out.shape)


def _weight_and_input_grads(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            conv: ConvArgs | None, need_input: bool
                            ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Gradients of ``apply_weight(x, weight)`` w.r.t. its input (if needed) and its weight."""
    if conv is None:
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        return (grad_out @ weight if need_input else None), grad_w
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0], 1,
        [need_input, True, False])
    return grad_x, grad_w


def _merge(weight: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scale: Scale) -> torch.Tensor:
    """W + scale * (W1 ⊙ W2) in one pass over the weight (fp32)."""
    if isinstance(scale, torch.Tensor):
        return torch.addcmul(weight.float(), w1 * per_row(scale, w1.dim()), w2)
    return torch.addcmul(weight.float(), w1, w2, value=scale)


class _MergedLoHa(torch.autograd.Function):
    """``apply_weight(x, W + delta W)`` saving only x and the factors; backward rebuilds W1 and W2.

    The Hadamard product's backward is written out (dW1 = s G ⊙ W2, dW2 = s G ⊙ W1 with G the weight
    gradient), so autograd only differentiates the two small factor products: fewer passes over
    out x in tensors, which is what this path costs on top of the base layer.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: Scale,
                conv: ConvArgs | None, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                w2b: torch.Tensor, t1: torch.Tensor | None, t2: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            w1 = hada_factor(w1a, w1b, t1, weight.shape)
            merged = _merge(weight, w1, hada_factor(w2a, w2b, t2, weight.shape), scale).to(x.dtype)
        ctx.save_for_backward(x, weight, w1a, w1b, w2a, w2b, t1, t2)
        ctx.scale, ctx.conv = scale, conv
        return apply_weight(x, merged, bias, conv)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, *saved = ctx.saved_tensors
        factors = [None if f is None else f.detach().requires_grad_() for f in saved]
        w1a, w1b, w2a, w2b, t1, t2 = factors
        with torch.enable_grad():
            w1 = hada_factor(w1a, w1b, t1, weight.shape)
            w2 = hada_factor(w2a, w2b, t2, weight.shape)
        # under autocast grad_out has the autocast dtype, not x's: compute in grad_out's, return in the inputs'
        dtype = grad_out.dtype
        merged = _merge(weight, w1.detach(), w2.detach(), ctx.scale).to(dtype)
        grad_x, grad_w = _weight_and_input_grads(grad_out, x.to(dtype), merged, ctx.conv, ctx.needs_input_grad[0])
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        grad_delta = grad_w.float() * per_row(ctx.scale, grad_w.dim())
        trainable = [f for f in factors if f is not None]
        factor_grads = iter(torch.autograd.grad([w1, w2], trainable,
                                                [grad_delta * w2.detach(), grad_delta * w1.detach()]))
        grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3)) if ctx.conv else grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
            grad_bias = grad_bias.to(weight.dtype)
        grad_weight = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return (grad_x, grad_weight, grad_bias, None, None,
                *[None if f is None else next(factor_grads) for f in factors])


def loha_merged_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: Scale,
                        conv: ConvArgs | None, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                        w2b: torch.Tensor, t1: torch.Tensor | None, t2: torch.Tensor | None) -> torch.Tensor:
    """Base output plus delta W's, as one op with ``W + delta W`` (exact; saves only x and the factors)."""
    return _MergedLoHa.apply(x, weight, bias, scale, conv, w1a, w1b, w2a, w2b, t1, t2)


def prefer_merged(positions: int, out_features: int, in_features: int, kernel_numel: int, rank: int,
                  tucker: bool) -> bool:
    """Flop estimate (forward + backward) of the extra work of each path; True when merging is cheaper."""
    r2 = rank * rank
    if tucker:
        factored = 3 * positions * r2 * (in_features + r2 * kernel_numel + out_features)
    else:
        factored = 3 * positions * r2 * (in_features * kernel_numel + out_features)
    weight_numel = out_features * in_features * kernel_numel
    # weight-gradient GEMM, rebuilding W1 and W2 (forward and backward), and ~a dozen memory-bound passes
    # (and fresh allocations) of out x in tensors, together worth ~250 multiply-adds per element on a CPU
    merged = (positions + 8 * rank + 250) * weight_numel
    return merged < factored


# ---- module -----------------------------------------------------------------------------------------
class LoHaAdapter(Adapter):
    method = "loha"

    def __init__(self, base: BaseLayer, rank: int = 8, alpha: float | None = None, *, use_tucker: bool = True,
                 rank_dropout: float = 0.0, multiplier: float = 1.0, module_dropout: float = 0.0) -> None:
        super().__init__(base, multiplier=multiplier, module_dropout=module_dropout)
        if rank < 1:
            raise AdapterError(f"loha: rank must be >= 1, got {rank}")
        if not 0.0 <= rank_dropout < 1.0:
            raise AdapterError(f"loha: rank_dropout must be in [0, 1), got {rank_dropout}")
        self.rank = int(rank)
        self.rank_dropout_p = float(rank_dropout)
        self.use_tucker = bool(use_tucker) and not self.is_pointwise
        # "auto" picks the cheaper exact path per call; tests pin "factored" or "merged"
        self.forward_path = "auto"
        self.register_alpha(alpha if alpha else rank)
        self._build_parameters()
        self.reset_parameters()

    def _build_parameters(self) -> None:
        out, r = self.out_features, self.rank
        kh, kw = self.kernel_size
        if self.use_tucker:
            a_shape, b_shape = (r, out), (r, self.in_features)
            self.hada_t1 = nn.Parameter(torch.empty(r, r, kh, kw))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, kh, kw))
        else:
            a_shape, b_shape = (out, r), (r, self.in_features * kh * kw)
            self.hada_t1 = self.hada_t2 = None
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape))
        self.hada_w2_a = nn.Parameter(torch.empty(a_shape))
        self.hada_w2_b = nn.Parameter(torch.empty(b_shape))

    def reset_parameters(self) -> None:
        """LyCORIS's initialisation: w2_a = 0 makes delta W = 0 while every other factor gets a gradient."""
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        if self.use_tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)

    @property
    def scale(self) -> float:
        return scale_from_alpha(self.alpha_value, self.rank)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                               torch.Tensor | None, torch.Tensor | None]:
        """``(w1_a, w1_b, w2_a, w2_b, t1, t2)`` as the pure functions take them."""
        return self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.hada_t1, self.hada_t2

    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        return loha_delta(*self.factors(), multiplier * self.scale, self.base.weight.shape)

    def _merged_is_cheaper(self, x: torch.Tensor) -> bool:
        if self.forward_path != "auto":
            return self.forward_path == "merged"
        positions = output_positions(x, self.in_features, conv_args_of(self.base))
        kh, kw = self.kernel_size
        return prefer_merged(positions, self.out_features, self.in_features, kh * kw, self.rank, self.use_tucker)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale: Scale = self.multiplier * self.scale
        if self.training and self.rank_dropout_p > 0:
            scale = scale * row_dropout_scale(self.out_features, self.rank_dropout_p, x)
        conv = conv_args_of(self.base)
        if self._merged_is_cheaper(x):
            return loha_merged_forward(x, self.base.weight, self.base.bias, scale, conv, *self.factors())
        return loha_factored_forward(x, self.base(x), *self.factors(), scale, conv, self.kernel_size)

    def hyperparameters(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha_value, "use_tucker": self.use_tucker}
