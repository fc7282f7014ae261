"""X-LoRA: a mixture of frozen LoRA experts gated per token by a small classifier (specs/peft-methods.md §2).

Pass 1 runs the model with every expert off (PEFT's ``scaling_pass_value`` = 0) under ``no_grad``; the
classifier reads its last hidden states and gives scalings (bs, T, n_layers, n_experts) (softmax over experts
with a temperature, optional top-k); pass 2 runs the model again with

    y = base(x) + sum_e  B_e A_e (x * s_e) * alpha_e / r_e

in every adapted linear layer (``layer_index`` picks its slice of the scalings). Only the classifier trains.

A per-token scalar commutes with A_e, so the experts of one layer are concatenated into one (sum r, in)
matrix and one (out, sum r) matrix: two matmuls per layer for any number of experts (PEFT runs two per
expert), and pass 1 skips the expert path entirely.

Expert dropout (each expert's own ``lora_dropout``, PEFT: B_e A_e dropout_e(x * s_e)) gives every expert its
own input, so in training with any expert dropout > 0 the A matmul runs per expert (B stays shared). The masks
are drawn like PEFT's, one per expert with dropout > 0, in expert order, shaped like the layer input, in both
passes (PEFT's scaling pass runs the experts with zero scalings and draws them too), so a seeded run consumes
the RNG as PEFT's does.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lycotrain.errors import AdapterError


# ---- pure functions ---------------------------------------------------------------------------------
def expert_scalings(logits: torch.Tensor, n_layers: int, n_experts: int, *, layerwise: bool,
                    enable_softmax: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """Classifier logits (bs, T, n_out) -> scalings (bs, T, n_layers, n_experts), layer-major like PEFT."""
    bs, length, _ = logits.shape
    if not layerwise:
        logits = logits[:, :, None, :].expand(bs, length, n_layers, n_experts)
    scalings = logits.reshape(bs, length, n_layers, n_experts)
    if enable_softmax:
        scalings = torch.softmax(scalings / temperature, dim=-1)
    return scalings


def top_k_scalings(scalings: torch.Tensor, k: int, softmax_top_k: bool = False) -> torch.Tensor:
    """Keep the k largest scalings per token, zero the rest (no renormalisation unless ``softmax_top_k``)."""
    _, indices = torch.topk(scalings, k=k, dim=-1)
    mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, indices, True)
    kept = scalings * mask.to(scalings.dtype)
    if softmax_top_k:
        nonzero = kept != 0
        kept = torch.softmax(kept.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    return kept


def mixed_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, rank_scale: torch.Tensor,
               rank_expert: torch.Tensor, scalings: torch.Tensor, *, expert_ranks: Sequence[int] = (),
               expert_dropout: Sequence[float] = ()) -> torch.Tensor:
    """sum_e B_e A_e dropout_e(x * s_e) * scale_e with the experts' ranks concatenated.

    lora_a (R, in), lora_b (out, R), rank_scale (R,) = alpha_e / r_e per rank, rank_expert (R,) = the expert
    of each rank, scalings (bs, T, n_experts). Without ``expert_dropout`` (no dropout: eval, or all p = 0) one
    A matmul serves every expert. With it (p per expert, in rank order, ``expert_ranks`` their ranks) each
    expert's A reads its own dropped input, one mask per expert with p > 0 drawn in order; dropout_e(x * s_e)
    = dropout_e(x) * s_e with the same mask, so s_e still scales the rank activations."""
    per_rank = (scalings.index_select(-1, rank_expert) * rank_scale).to(x.dtype)
    if expert_dropout:
        down = torch.cat([F.linear(F.dropout(x, p) if p > 0 else x, a)
                          for a, p in zip(lora_a.split(list(expert_ranks)), expert_dropout)], dim=-1)
    else:
        down = F.linear(x, lora_a)
    return F.linear(down * per_rank, lora_b)


# ---- modules ----------------------------------------------------------------------------------------
class ScalingState:
    """Shared by the classifier wrapper and every layer: the scalings of the current pass (None = experts off)."""

    def __init__(self) -> None:
        self.scalings: torch.Tensor | None = None


class LoRAExpert(NamedTuple):
    """One frozen expert in one layer: lora_A (r, in), lora_B (out, r), alpha / r and its ``lora_dropout``."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    dropout: float = 0.0


class XLoRALinear(nn.Module):
    """A frozen Linear plus frozen LoRA experts mixed by the current scalings."""

    method = "xlora"

    def __init__(self, base: nn.Linear, experts: dict[int, LoRAExpert], layer_index: int, state: ScalingState, *,
                 top_k: int = 0, softmax_top_k: bool = False, global_scale: float = 1.0) -> None:
        """``experts`` maps expert index -> its tensors, scale and dropout (the experts absent here are left out)."""
        super().__init__()
        if not experts:
            raise AdapterError("xlora: a layer needs at least one expert")
        base.requires_grad_(False)
        self.base = base
        self.layer_index = int(layer_index)
        self.state = state
        self.top_k = int(top_k)
        self.softmax_top_k = bool(softmax_top_k)
        order = sorted(experts)
        dtype = base.weight.dtype
        self.register_buffer("lora_A", torch.cat([experts[e].lora_a for e in order]).to(dtype))
        self.register_buffer("lora_B", torch.cat([experts[e].lora_b for e in order], dim=1).to(dtype))
        self.expert_ranks = [experts[e].lora_a.shape[0] for e in order]
        self.expert_dropout = [float(experts[e].dropout) for e in order]
        self.register_buffer("rank_scale", torch.cat(
            [torch.full((r,), experts[e].scale * global_scale) for e, r in zip(order, self.expert_ranks)]).to(dtype))
        self.register_buffer("rank_expert", torch.cat(
            [torch.full((r,), e, dtype=torch.long) for e, r in zip(order, self.expert_ranks)]))

    @property
    def drops_experts(self) -> bool:
        """Whether a forward now applies expert dropout (training, and some expert's p > 0)."""
        return self.training and any(p > 0 for p in self.expert_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        scalings = self.state.scalings
        dropping = self.drops_experts
        if scalings is None:
            if dropping:  # PEFT's scaling pass draws (and wastes) these masks: draw them too, to stay in step
                for p in self.expert_dropout:
                    if p > 0:
                        F.dropout(x, p)
            return result
        scalings = scalings[:, :, self.layer_index, :]
        if self.top_k:
            scalings = top_k_scalings(scalings, self.top_k, self.softmax_top_k)
        return result + mixed_lora(x, self.lora_A, self.lora_B, self.rank_scale, self.rank_expert, scalings,
                                   expert_ranks=self.expert_ranks,
                                   expert_dropout=self.expert_dropout if dropping else ())


def build_classifier(hidden_size: int, n_out: int, depth: int = 1, size: int = 2048,
                     dropout: float = 0.2) -> nn.Sequential:
    """PEFT's classifier layout (so ``layers.{i}`` keys match): Linear, or Linear-ReLU-[Dropout] ... Linear."""
    if depth < 1:
        raise AdapterError(f"xlora: classifier depth must be >= 1, got {depth}")
    if depth == 1:
        return nn.Sequential(nn.Linear(hidden_size, n_out))
    layers: list[nn.Module] = []
    width = hidden_size
    for _ in range(depth - 1):
        layers += [nn.Linear(width, size), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        width = size
    return nn.Sequential(*layers, nn.Linear(width, n_out))


class XLoRAClassifier(nn.Module):
    """Hidden states (bs, T, hidden) -> scalings (bs, T, n_layers, n_experts)."""

    def __init__(self, hidden_size: int, n_experts: int, n_layers: int, *, layerwise: bool = False, depth: int = 1,
                 size: int = 2048, dropout: float = 0.2, temperature: float = 1.0,
                 enable_softmax: bool = True) -> None:
        super().__init__()
        if n_experts < 2:
            raise AdapterError(f"xlora: needs two or more experts, got {n_experts}")
        if temperature <= 0:
            raise AdapterError(f"xlora: softmax temperature must be > 0, got {temperature}")
        if not 0.0 <= dropout < 1.0:
            raise AdapterError(f"xlora: classifier dropout must lie in [0, 1), got {dropout}")
        self.n_experts, self.n_layers = int(n_experts), int(n_layers)
        self.layerwise, self.temperature, self.enable_softmax = bool(layerwise), float(temperature), enable_softmax
        n_out = n_experts * n_layers if layerwise else n_experts
        self.layers = build_classifier(hidden_size, n_out, depth, size, dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden)
        return expert_scalings(logits, self.n_layers, self.n_experts, layerwise=self.layerwise,
                               enable_softmax=self.enable_softmax, temperature=self.temperature)


class XLoRAModel(nn.Module):
    """A causal LM whose adapted layers are :class:`XLoRALinear`, run as the two X-LoRA passes."""

    def __init__(self, model: nn.Module, classifier: XLoRAClassifier, state: ScalingState) -> None:
        super().__init__()
        self.model = model
        self.classifier = classifier
        self.state = state
        self.latest_scalings: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        kwargs.pop("use_cache", None)
        self.state.scalings = None
        with torch.no_grad():  # the decoder alone: pass 1 needs its last hidden states, not logits or a loss
            decoder = getattr(self.model, self.model.base_model_prefix)
            first = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
        hidden = first.last_hidden_state.to(next(self.classifier.parameters()).dtype)
        scalings = self.classifier(hidden)
        self.latest_scalings = scalings.detach()
        self.state.scalings = scalings
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        finally:
            self.state.scalings = None
