"""Checks every image adapter must pass, shared by the per-method test files."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lycotrain.adapters.base import Adapter

RTOL = ATOL = 1e-5


def input_for(layer: nn.Module, batch: int = 2, size: int = 6) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(batch, 3, layer.in_features)
    return torch.randn(batch, layer.in_channels, size, size)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """Close relative to the largest magnitude of ``expected`` (what "1e-5 relative" means here)."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"relative error {err:.2e} > {rtol:.0e}"


def randomize(adapter: Adapter, std: float = 0.5) -> None:
    """Give every adapter parameter a non-zero value so delta W != 0."""
    with torch.no_grad():
        for p in adapter.adapter_parameters():
            p.normal_(std=std)


def merged_reference(adapter: Adapter, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """The base op with W + delta W: what every loader computes after merging."""
    weight = adapter.base.weight + adapter.delta_weight(multiplier)
    return adapter.base_op(x, weight, adapter.base.bias)


def check_rank_dropout(adapter: Adapter, x: torch.Tensor) -> None:
    """kohya rank dropout on a method whose delta has no rank axis (LoHa, LoKr): in training each output row of the
    delta is dropped or doubled (one draw per row, shared by all samples); eval mode is the merged layer."""
    with torch.no_grad():
        base, full = adapter.base(x), merged_reference(adapter, x)
        adapter.train()
        ratio = (adapter(x) - base) / (full - base)
        adapter.eval()
        assert_rel_close(adapter(x), full)
    ratio = ratio.movedim(1, -1) if adapter.is_conv else ratio
    per_row = ratio.reshape(-1, ratio.shape[-1])
    assert torch.allclose(per_row, per_row[:1].expand_as(per_row), atol=1e-3)
    assert set(per_row[0].round(decimals=3).tolist()) <= {0.0, 2.0}


def check_adapter_contract(adapter: Adapter, x: torch.Tensor) -> None:
    """Forward == merged reference; gradients only on adapter parameters; merge/unmerge; multiplier."""
    base_weight = adapter.base.weight.detach().clone()
    randomize(adapter)
    out = adapter(x)
    assert_rel_close(out, merged_reference(adapter, x))

    adapter.zero_grad(set_to_none=True)
    out.square().sum().backward()
    assert adapter.base.weight.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.adapter_parameters())

    with torch.no_grad():
        base_out = adapter.base(x)
        adapter.multiplier = 0.5
        half = adapter(x)
        adapter.multiplier = 1.0
        assert_rel_close(half - base_out, (out - base_out) * 0.5, rtol=1e-4)
        adapter.merge()
        assert_rel_close(adapter(x), out)
        adapter.unmerge()
        torch.testing.assert_close(adapter.base.weight, base_weight, rtol=0, atol=1e-6)


def check_identity_at_init(adapter: Adapter, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert torch.equal(adapter(x), adapter.base(x))
        assert adapter.delta_weight().abs().max() == 0


def check_learns(student: Adapter, teacher: Adapter, x: torch.Tensor, steps: int = 150, lr: float = 0.05) -> None:
    """From its zero-change init, ``student`` fits the output of a randomised ``teacher`` of the same shape:
    the training loss must fall clearly (an adapter that is not in the graph cannot pass)."""
    randomize(teacher, std=0.3)
    with torch.no_grad():
        target = teacher(x)
    optimizer = torch.optim.Adam(student.adapter_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(student(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], f"loss {losses[0]:.4g} -> {losses[-1]:.4g}"


def check_matches_peft(adapter: Adapter, fresh_base: nn.Module, peft_layers: Any, config: Any,
                       copy_into: Callable[[Adapter, nn.Module, str], None]) -> None:
    """peft's layer of the same method (``peft_layers.Linear``/``Conv2d``), given our parameters, computes the
    same delta weight and forward."""
    fresh_base.load_state_dict(adapter.base.state_dict())
    cls = peft_layers.Linear if isinstance(fresh_base, nn.Linear) else peft_layers.Conv2d
    theirs = cls(fresh_base, "default", config=config, r=adapter.rank, alpha=float(adapter.alpha))
    copy_into(adapter, theirs, "default")
    x = input_for(adapter.base)
    with torch.no_grad():
        assert_rel_close(adapter.delta_weight(), theirs.get_delta_weight("default"))
        assert_rel_close(adapter(x), theirs(x))
