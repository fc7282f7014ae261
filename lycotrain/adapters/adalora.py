"""AdaLoRA: LoRA in SVD form, delta W = B diag(E) A * alpha / (ranknum + 1e-5), with a rank allocator that
prunes the least important singular triplets on a cubic budget schedule (specs/peft-methods.md §1).

Names and semantics follow PEFT so saved folders load there: ``lora_A`` (r, in) = P, ``lora_E`` (r, 1) = the
singular values, ``lora_B`` (out, r) = Q, and ``ranknum`` = init_r forever (pruning zeroes E; the scale
stays ``alpha / init_r`` even after the tensors are physically pruned on save).

:class:`RankAllocator` is bit-compatible with PEFT's: same importance (|p * grad| smoothed by beta1,
uncertainty smoothed by beta2, triplet score = s(E) + mean s(A) + mean s(B)), same schedule, same
``kthvalue`` threshold with ``<=``. It works on the adapters directly, with fused ``torch._foreach`` updates,
so its cost per step is a few vector ops instead of a Python loop over the model's parameters.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lycotrain.adapters.base import Adapter
from lycotrain.errors import AdapterError

RANKNUM_EPS = 1e-5  # PEFT adds it to ranknum; it matters for matches below 1e-6


# ---- pure functions ---------------------------------------------------------------------------------
def svd_delta(lora_a: torch.Tensor, lora_e: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """delta W = B @ (A * E) * scale, shape (out, in), fp32."""
    return (lora_b.float() @ (lora_a.float() * lora_e.float())) * scale


def orthogonality_penalty(lora_as: list[torch.Tensor], lora_bs: list[torch.Tensor]) -> torch.Tensor:
    """Mean over all matrices of ||A A^T - I||_F (rows of each A) and ||B^T B - I||_F (columns of each B).

    Matrices of equal shape are stacked so each group costs one batched matmul, not one per module."""
    groups: dict[torch.Size, list[torch.Tensor]] = {}
    for matrix in list(lora_as) + [b.T for b in lora_bs]:  # B^T B = (B^T)(B^T)^T
        groups.setdefault(matrix.shape, []).append(matrix)
    total = lora_as[0].new_zeros(())
    for shape, matrices in groups.items():
        stacked = torch.stack(matrices)
        gram = stacked @ stacked.transpose(1, 2)
        eye = torch.eye(shape[0], dtype=gram.dtype, device=gram.device)
        total = total + torch.linalg.matrix_norm(gram - eye).sum()
    return total / (len(lora_as) + len(lora_bs))


def budget_schedule(step: int, *, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int,
                    delta_t: int) -> tuple[int, bool]:
    """(budget, mask now?) at ``step``: warm-up, cubic decrease from init to target, then fixed (PEFT rule)."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    budget = int((init_budget - target_budget) * (remaining ** 3) + target_budget)
    return budget, step % delta_t == 0


# ---- module -----------------------------------------------------------------------------------------
class AdaLoRAAdapter(Adapter):
    """SVD-form LoRA on a Linear layer. ``rank`` is the current width (init_r while training; the kept rank
    after a pruned folder is loaded); ``init_r`` fixes the scale ``alpha / init_r`` like PEFT's ``ranknum``."""

    method = "adalora"

    def __init__(self, base: nn.Linear, rank: int = 12, alpha: float = 8.0, *, init_r: int | None = None,
                 dropout: float = 0.0, multiplier: float = 1.0) -> None:
        super().__init__(base, multiplier=multiplier)
        if self.is_conv:
            raise AdapterError("adalora: only Linear layers are supported")
        if rank < 0:
            raise AdapterError(f"adalora: rank must be >= 0, got {rank}")
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, dtype=base.weight.dtype))
        self.lora_E = nn.Parameter(torch.empty(self.rank, 1, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, self.rank, dtype=base.weight.dtype))
        self.register_buffer("ranknum", torch.tensor([float(init_r if init_r is not None else rank)]))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PEFT's init: A, B ~ N(0, 0.02), E = 0, so the output starts equal to the base output."""
        nn.init.zeros_(self.lora_E)
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    @property
    def init_r(self) -> int:
        return int(self.ranknum.item())

    @property
    def scaling(self) -> float:
        """PEFT's numerator: lora_alpha, or init_r when alpha <= 0; divided by ranknum + 1e-5 in forward."""
        return self.alpha if self.alpha > 0 else float(self.init_r)

    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        scale = multiplier * self.scaling / (float(self.ranknum) + RANKNUM_EPS)
        return svd_delta(self.lora_A, self.lora_E, self.lora_B, scale)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.training and self.dropout > 0:
            x = F.dropout(x, p=self.dropout)
        # the operation order of PEFT's SVDLinear, so the two agree to float round-off
        update = (x @ (self.lora_A * self.lora_E).T @ self.lora_B.T) * self.scaling / (self.ranknum + RANKNUM_EPS)
        return result + update * self.multiplier

    def hyperparameters(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "init_r": self.init_r}


def orthogonal_regularizer(adapters: list[AdaLoRAAdapter]) -> torch.Tensor:
    """PEFT's regulariser over every adapter (pruned triplets included), to add times orth_reg_weight."""
    return orthogonality_penalty([a.lora_A for a in adapters], [a.lora_B for a in adapters])


# ---- rank allocator -----------------------------------------------------------------------------------
class RankAllocator:
    """Importance tracking, budget schedule and masking over named AdaLoRA adapters.

    Call :meth:`step` once per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``
    (the training task does this itself). ``rank_pattern`` maps adapter name -> list of kept ranks (bools).
    """

    def __init__(self, adapters: dict[str, AdaLoRAAdapter], *, target_r: int, total_step: int = 0, tinit: int = 0,
                 tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85) -> None:
        if not adapters:
            raise AdapterError("adalora: no adapted modules to allocate ranks over")
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise AdapterError(f"adalora: beta1 and beta2 must lie in (0, 1), got {beta1}, {beta2}")
        self.names = sorted(adapters)
        self.adapters = [adapters[n] for n in self.names]
        self.target_r, self.tinit, self.tfinal, self.delta_t = int(target_r), int(tinit), int(tfinal), int(delta_t)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.init_budget = sum(a.rank for a in self.adapters)
        self.target_budget = self.target_r * len(self.adapters)
        self.total_step = 0  # 0: not known yet (the training task sets it from the data before the first step)
        if total_step:
            self.set_total_step(total_step)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.budget = self.init_budget
        self.reset_importance()

    def set_total_step(self, total_step: int) -> None:
        if total_step <= 0:
            raise AdapterError(f"adalora: total_step must be > 0, got {total_step}")
        if self.tinit >= total_step - self.tfinal:
            raise AdapterError(f"adalora: tinit ({self.tinit}) must be below total steps ({total_step}) minus tfinal "
                               f"({self.tfinal}); lower tinit/tfinal or train longer")
        if self.tfinal > 0 and self.target_budget >= self.init_budget:
            raise AdapterError(f"adalora: target_r ({self.target_r}) must be below init_r when tfinal > 0 "
                               "(there is nothing to prune)")
        self.total_step = int(total_step)

    def reset_importance(self) -> None:
        self._ema_ipt: list[torch.Tensor] | None = None
        self._ema_unc: list[torch.Tensor] | None = None

    def _params(self) -> list[nn.Parameter]:
        return [p for a in self.adapters for p in (a.lora_A, a.lora_E, a.lora_B)]

    @torch.no_grad()
    def update_importance(self) -> None:
        """ipt = |p * grad|; ema_ipt and ema_unc updated exactly as PEFT (same ops, same order)."""
        params = self._params()
        grads = []
        for p in params:
            if p.grad is None:
                raise AdapterError("adalora: a parameter has no gradient when the allocator runs; it must run after "
                                   "backward and optimizer.step() and before zero_grad()")
            grads.append(p.grad)
        ipt = torch._foreach_mul(params, grads)
        torch._foreach_abs_(ipt)
        if self._ema_ipt is None:
            self._ema_ipt = [torch.zeros_like(p) for p in params]
            self._ema_unc = [torch.zeros_like(p) for p in params]
        ema_ipt = torch._foreach_add(torch._foreach_mul(self._ema_ipt, self.beta1),
                                     torch._foreach_mul(ipt, 1 - self.beta1))
        deviation = torch._foreach_sub(ipt, ema_ipt)
        torch._foreach_abs_(deviation)
        ema_unc = torch._foreach_add(torch._foreach_mul(self._ema_unc, self.beta2),
                                     torch._foreach_mul(deviation, 1 - self.beta2))
        self._ema_ipt, self._ema_unc = ema_ipt, ema_unc

    def triplet_scores(self) -> list[torch.Tensor]:
        """Per adapter, the score of each rank: s(E)_i + mean_j s(A)_ij + mean_k s(B)_ki."""
        if self._ema_ipt is None:
            raise AdapterError("adalora: no importance yet; the allocator must see at least one gradient")
        scores = torch._foreach_mul(self._ema_ipt, self._ema_unc)
        out = []
        for i in range(len(self.adapters)):
            score_a, score_e, score_b = scores[3 * i: 3 * i + 3]
            ab = torch.cat([score_a.mean(dim=1, keepdim=True), score_b.mean(dim=0).view(-1, 1)], dim=1)
            out.append(score_e.view(-1) + ab.sum(dim=1).view(-1))
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        scores = self.triplet_scores()
        threshold = torch.kthvalue(torch.cat(scores), k=self.init_budget - budget)[0].item()
        pattern = {}
        for name, adapter, score in zip(self.names, self.adapters, scores):
            pruned = score.view(-1, 1) <= threshold
            adapter.lora_E.masked_fill_(pruned, 0.0)
            pattern[name] = (~pruned).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self) -> None:
        """Zero the singular values of pruned ranks (they received gradients since the last mask)."""
        if self.rank_pattern is None:
            return
        for name, adapter in zip(self.names, self.adapters):
            keep = torch.tensor(self.rank_pattern[name], device=adapter.lora_E.device).view(-1, 1)
            adapter.lora_E.masked_fill_(~keep, 0.0)

    def step(self, step: int) -> int:
        """PEFT's ``update_and_allocate(step)``; returns the budget in force after this step."""
        if not self.total_step:
            raise AdapterError("adalora: the total number of steps is not set (set_total_step)")
        final_start = self.total_step - self.tfinal
        if step < final_start:
            self.update_importance()
            self.budget, mask_now = budget_schedule(step, **self._schedule())
            if mask_now:
                self.rank_pattern = self.mask_to_budget(self.budget)
        elif step == final_start:
            self.budget = self.target_budget
            self.rank_pattern = self.mask_to_budget(self.budget)
            self.reset_importance()
        else:
            self.budget = self.target_budget
            self.apply_pattern()
        return self.budget

    def _schedule(self) -> dict[str, int]:
        return dict(init_budget=self.init_budget, target_budget=self.target_budget, tinit=self.tinit,
                    tfinal=self.tfinal, total_step=self.total_step, delta_t=self.delta_t)

    def ranks(self) -> dict[str, int]:
        """Kept rank per adapter (init rank where nothing was pruned yet)."""
        if self.rank_pattern is None:
            return {n: a.rank for n, a in zip(self.names, self.adapters)}
        return {n: int(sum(self.rank_pattern[n])) for n in self.names}

    # ---- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"rank_pattern": self.rank_pattern, "budget": self.budget, "total_step": self.total_step,
                "ema_ipt": self._ema_ipt, "ema_unc": self._ema_unc}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rank_pattern = state["rank_pattern"]
        self.budget = state["budget"]
        self.total_step = state["total_step"]
        self._ema_ipt, self._ema_unc = state["ema_ipt"], state["ema_unc"]
