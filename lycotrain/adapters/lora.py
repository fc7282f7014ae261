"""LoRA / LoCon: delta W = (alpha / r) * up @ down, with a Tucker core (``lora_mid``) for kxk convolutions.

Keys (specs/webui-formats.md §3.1): ``lora_down.weight`` (r, in[, kh, kw]), ``lora_mid.weight``
(r, r, kh, kw; Tucker only), ``lora_up.weight`` (out, r[, 1, 1]), ``alpha`` ().
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lycotrain.adapters.base import Adapter, BaseLayer, scale_from_alpha
from lycotrain.errors import AdapterError

DROPOUT_PLACES = ("down", "input")  # where ``dropout`` acts; see LoRAAdapter.__init__


# ---- pure functions ---------------------------------------------------------------------------------
def lora_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, scale: float,
               weight_shape: torch.Size) -> torch.Tensor:
    """delta W = scale * up @ [mid] @ down, reshaped to the base weight shape (fp32)."""
    rank = down.shape[0]
    up2 = up.float().reshape(up.shape[0], rank)
    if mid is None:
        delta = up2 @ down.float().reshape(rank, -1)
    else:
        down2 = down.float().reshape(rank, -1)
        delta = torch.einsum("abyx,oa,bi->oiyx", mid.float(), up2, down2)
    return (scale * delta).reshape(weight_shape)


def rank_dropout(lx: torch.Tensor, p: float) -> torch.Tensor:
    """Drop whole rank components per sample (kohya ``rank_dropout``); keeps the expectation."""
    rank_dim = 1 if lx.dim() == 4 else lx.dim() - 1
    shape = [lx.shape[0]] + [1] * (lx.dim() - 1)
    shape[rank_dim] = lx.shape[rank_dim]
    keep = (torch.rand(shape, device=lx.device) >= p).to(lx.dtype)
    return lx * keep / (1.0 - p)


# ---- module -----------------------------------------------------------------------------------------
class LoRAAdapter(Adapter):
    method = "lora"

    def __init__(self, base: BaseLayer, rank: int = 8, alpha: float | None = None, *, use_tucker: bool = True,
                 dropout: float = 0.0, dropout_on: str = "down", rank_dropout: float = 0.0,
                 multiplier: float = 1.0, module_dropout: float = 0.0) -> None:
        """``dropout_on`` says where ``dropout`` acts: "down" drops the rank activations after lora_down (kohya's
        neuron dropout, what image LoRA trainers do); "input" drops the layer input before lora_down (PEFT's
        ``lora_dropout``: lora_B(lora_A(dropout(x))), what a PEFT adapter_config.json promises)."""
        super().__init__(base, multiplier=multiplier, module_dropout=module_dropout)
        if rank < 1:
            raise AdapterError(f"lora: rank must be >= 1, got {rank}")
        if dropout_on not in DROPOUT_PLACES:
            raise AdapterError(f"lora: dropout_on must be one of {', '.join(DROPOUT_PLACES)}, got {dropout_on!r}")
        self.rank = int(rank)
        self.dropout = float(dropout)
        self.dropout_on = dropout_on
        self.rank_dropout_p = float(rank_dropout)
        self.use_tucker = bool(use_tucker) and not self.is_pointwise
        self.register_alpha(alpha if alpha else rank)
        self._build_layers()
        self.reset_parameters()

    def _build_layers(self) -> None:
        if not self.is_conv:
            self.lora_down = nn.Linear(self.in_features, self.rank, bias=False)
            self.lora_up = nn.Linear(self.rank, self.out_features, bias=False)
            self.lora_mid = None
            return
        conv: nn.Conv2d = self.base  # type: ignore[assignment]
        spatial = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
        if self.use_tucker:
            self.lora_down = nn.Conv2d(self.in_features, self.rank, 1, bias=False)
            self.lora_mid = nn.Conv2d(self.rank, self.rank, conv.kernel_size, bias=False, **spatial)
        else:
            self.lora_down = nn.Conv2d(self.in_features, self.rank, conv.kernel_size, bias=False, **spatial)
            self.lora_mid = None
        self.lora_up = nn.Conv2d(self.rank, self.out_features, 1, bias=False)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.lora_mid is not None:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    @property
    def scale(self) -> float:
        return scale_from_alpha(self.alpha_value, self.rank)

    def delta_weight(self, multiplier: float = 1.0) -> torch.Tensor:
        mid = None if self.lora_mid is None else self.lora_mid.weight
        return lora_delta(self.lora_up.weight, self.lora_down.weight, mid, multiplier * self.scale,
                          self.base.weight.shape)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        dropping = self.training and self.dropout > 0
        lx = self.lora_down(F.dropout(x, p=self.dropout) if dropping and self.dropout_on == "input" else x)
        if self.lora_mid is not None:
            lx = self.lora_mid(lx)
        if dropping and self.dropout_on == "down":
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout_p > 0:
            lx = rank_dropout(lx, self.rank_dropout_p)
        return self.base(x) + self.lora_up(lx) * (self.multiplier * self.scale)

    def hyperparameters(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha_value, "use_tucker": self.use_tucker}
