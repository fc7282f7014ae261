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


def face_splitting(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``K[(j, k), n] = u[j, n] * v[k, n]`` for u (r1, n), v (r2, n): the column-wise Kronecker product.

    Built with the long axis n innermost, so the broadcast multiply runs over contiguous memory.
    """
    return (u[:, None, :] * v[None, :, :]).reshape(-1, u.shape[-1])


def face_splitting_grads(grad: torch.Tensor, u: torch.Tensor, v: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`face_splitting` w.r.t. u and v, given the gradient of K."""
    grad = grad.view(u.shape[0], v.shape[0], -1)
    return (grad * v[None]).sum(1), (grad * u[:, None]).sum(0)


def khatri_rao_factors(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                       t1: torch.Tensor | None, t2: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(P, core, Q)`` with ``W1 ⊙ W2 = P [core] Q``: P (out, r^2), Q (r^2, in[*kh*kw]), core (r^2, r^2, kh, kw).

    P is returned as the transpose of a contiguous (r^2, out) tensor.
    """
    a1, a2 = (w1a.T, w2a.T) if t1 is None else (w1a, w2a)  # Tucker stores w?_a as (r, out)
    p = face_splitting(a1, a2).T
    q = face_splitting(w1b, w2b)
    if t1 is None or t2 is None:
        return p, None, q
    r2 = p.shape[1]
    core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(r2, r2, *t1.shape[2:])
    return p, core, q


class _KhatriRaoLinear(torch.autograd.Function):
    """``F.linear(x, W, b) + s * (x Qᵀ) Pᵀ`` as one autograd node whose backward is written out.

    The same function as autograd over the Khatri-Rao factors, but one node instead of about ten: on a CPU the
    per-op cost of those small ops and their backward nodes is as large as the thin r^2 matmuls themselves.
    Saves x, the rank-r^2 activation ``x Qᵀ`` and the factors.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: Scale,
                w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        out = F.linear(tokens, weight, bias)  # under autocast: the autocast dtype, which the rest follows
        p, _, q = khatri_rao_factors(w1a, w1b, w2a, w2b, None, None)
        row_scale = scale if isinstance(scale, torch.Tensor) else None
        alpha = 1.0 if row_scale is not None else float(scale)
        if row_scale is not None:
            p = p * row_scale[:, None]
        tokens, p, q = tokens.to(out.dtype), p.to(out.dtype), q.to(out.dtype)
        hidden = torch.mm(tokens, q.T)
        out.addmm_(hidden, p.T, alpha=alpha)
        ctx.save_for_backward(tokens, weight, hidden, p, q, w1a, w1b, w2a, w2b, row_scale)
        ctx.alpha, ctx.x_shape, ctx.x_dtype = alpha, x.shape, x.dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        tokens, weight, hidden, p, q, w1a, w1b, w2a, w2b, row_scale = ctx.saved_tensors
        alpha = ctx.alpha
        grad = grad_out.reshape(-1, p.shape[0]).to(p.dtype)
        grad_hidden = torch.mm(grad, p)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad, weight.to(grad.dtype)).addmm_(grad_hidden, q, alpha=alpha)
            grad_x = grad_x.reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad.T, tokens).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).to(weight.dtype)
        # P's gradient as (r^2, out), the layout P was built in (see khatri_rao_factors)
        grad_p_t = torch.mm(hidden.T, grad).float().mul_(alpha)
        if row_scale is not None:
            grad_p_t.mul_(row_scale)
        grad_q = torch.mm(grad_hidden.T, tokens).float().mul_(alpha)
        grad_w1a, grad_w2a = (g.T for g in face_splitting_grads(grad_p_t, w1a.T, w2a.T))
        grad_w1b, grad_w2b = face_splitting_grads(grad_q, w1b, w2b)
        return grad_x, grad_weight, grad_bias, None, grad_w1a, grad_w1b, grad_w2a, grad_w2b


def loha_factored_forward(x: torch.Tensor, base: BaseLayer, w1a: torch.Tensor, w1b: torch.Tensor,
                          w2a: torch.Tensor, w2b: torch.Tensor, t1: torch.Tensor | None, t2: torch.Tensor | None,
                          scale: Scale, kernel: tuple[int, int]) -> torch.Tensor:
    """Base output + delta W applied to ``x`` through the Khatri-Rao factors; never forms an out x in matrix.

    For a convolution, the scale is folded into P and the add into the last matmul (baddbmm): one pass fewer
    over the output, which on a CPU costs about as much as the thin r^2 matmuls themselves.
    """
    conv = conv_args_of(base)
    if conv is None:
        return _KhatriRaoLinear.apply(x, base.weight, base.bias, scale, w1a, w1b, w2a, w2b)
    p, core, q = khatri_rao_factors(w1a, w1b, w2a, w2b, t1, t2)
    p = p * per_row(scale, 2)
    r2 = p.shape[1]
    if core is None:
        h = apply_weight(x, q.reshape(r2, -1, *kernel), None, conv)
    else:
        h = apply_weight(F.conv2d(x, q[:, :, None, None]), core, None, conv)
    base_out = base(x)
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


def hada_factor_grads(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`hada_factor` w.r.t. ``(a, b, t)`` given the gradient of the factor (fp32)."""
    if t is None:
        grad = grad.reshape(a.shape[0], -1)
        return grad @ b.T, a.T @ grad, None
    return (torch.einsum("pqyx,ijyx,jq->ip", grad, t, b), torch.einsum("pqyx,ijyx,ip->jq", grad, t, a),
            torch.einsum("pqyx,jq,ip->ijyx", grad, b, a))


class _MergedLoHa(torch.autograd.Function):
    """``apply_weight(x, W + delta W)`` saving only x and the factors; backward rebuilds W1 and W2.

    The backward is written out (dW1 = s G ⊙ W2, dW2 = s G ⊙ W1 with G the weight gradient, then the factor
    products' own gradients), which costs the weight-gradient GEMM plus a few passes over out x in tensors.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: Scale,
                conv: ConvArgs | None, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                w2b: torch.Tensor, t1: torch.Tensor | None, t2: torch.Tensor | None) -> torch.Tensor:
        w1 = hada_factor(w1a, w1b, t1, weight.shape)
        merged = _merge(weight, w1, hada_factor(w2a, w2b, t2, weight.shape), scale).to(x.dtype)
        ctx.save_for_backward(x, weight, w1a, w1b, w2a, w2b, t1, t2)
        ctx.scale, ctx.conv = scale, conv
        return apply_weight(x, merged, bias, conv)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, w1a, w1b, w2a, w2b, t1, t2 = ctx.saved_tensors
        scale = ctx.scale
        w1 = hada_factor(w1a, w1b, t1, weight.shape)
        w2 = hada_factor(w2a, w2b, t2, weight.shape)
        # under autocast grad_out has the autocast dtype, not x's: compute in grad_out's, return in the inputs'
        dtype = grad_out.dtype
        merged = _merge(weight, w1, w2, scale).to(dtype)
        grad_x, grad_w = _weight_and_input_grads(grad_out, x.to(dtype), merged, ctx.conv, ctx.needs_input_grad[0])
        grad_x = None if grad_x is None else grad_x.to(x.dtype)
        grad_delta = grad_w.float()
        if isinstance(scale, torch.Tensor):
            grad_delta = grad_delta * per_row(scale, grad_delta.dim())
            scale = 1.0
        # in place: W1 and W2 are not needed once they have become G ⊙ W1 (= dW2 / s) and G ⊙ W2 (= dW1 / s)
        grads_1 = hada_factor_grads(w2.mul_(grad_delta), w1a, w1b, t1)
        grads_2 = hada_factor_grads(w1.mul_(grad_delta), w2a, w2b, t2)
        grad_w1a, grad_w1b, grad_t1, grad_w2a, grad_w2b, grad_t2 = (
            None if g is None else g.mul_(scale) for g in (*grads_1, *grads_2))
        grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3)) if ctx.conv else grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
            grad_bias = grad_bias.to(weight.dtype)
        grad_weight = grad_w.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return (grad_x, grad_weight, grad_bias, None, None, grad_w1a, grad_w1b, grad_w2a, grad_w2b, grad_t1, grad_t2)


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
        return loha_factored_forward(x, self.base, *self.factors(), scale, self.kernel_size)

    def hyperparameters(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha_value, "use_tucker": self.use_tucker}
