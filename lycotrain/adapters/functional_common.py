"""Small tensor helpers shared by the LyCORIS-family methods (LoHa, LoKr): conv geometry and row dropout."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


Scale = float | torch.Tensor  # a scalar, or one value per output channel (rank dropout folded in)


def per_row(scale: Scale, ndim: int) -> Scale:
    """Broadcast a per-output-channel scale over a tensor whose first dim is the output channel."""
    return scale.reshape(-1, *[1] * (ndim - 1)) if isinstance(scale, torch.Tensor) else scale


class ConvArgs(NamedTuple):
    """The spatial arguments of a base ``nn.Conv2d`` (groups are always 1 for adapted layers)."""

    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]


def conv_args_of(layer: nn.Linear | nn.Conv2d) -> ConvArgs | None:
    """``None`` for a Linear, the stride/padding/dilation of a Conv2d."""
    if isinstance(layer, nn.Conv2d):
        return ConvArgs(tuple(layer.stride), layer.padding, tuple(layer.dilation))  # type: ignore[arg-type]
    return None


def apply_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 conv: ConvArgs | None) -> torch.Tensor:
    """``x`` through a Linear (``conv is None``) or a Conv2d with the base layer's geometry."""
    if conv is None:
        return F.linear(x, weight, bias)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)


def output_positions(x: torch.Tensor, in_features: int, conv: ConvArgs | None) -> int:
    """Rows of the GEMM the base layer runs on ``x`` (tokens, or batch x output pixels); for cost models."""
    if conv is None:
        return x.numel() // in_features
    return x.shape[0] * x.shape[-2] * x.shape[-1] // (conv.stride[0] * conv.stride[1])


def row_dropout_scale(out_features: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """One keep/drop draw per output channel of delta W for this step, rescaled by 1/(1-p).

    This is LyCORIS's ``rank_dropout`` for LoHa/LoKr (it masks whole rows of delta W, shared by the batch),
    with the expectation-preserving rescale that kohya's LoRA rank dropout also applies.
    """
    keep = (torch.rand(out_features, device=like.device) >= p).to(like.dtype)
    return keep / (1.0 - p)
