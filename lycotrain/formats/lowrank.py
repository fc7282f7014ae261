"""Low-rank factorisation of a weight delta by SVD: the shared core of HRA/OFT -> LoRA export, ``extract`` and
``resize``. A delta ``(out, in[, kh, kw])`` becomes LoRA factors ``up (out, r[, 1, 1])`` and
``down (r, in[, kh, kw])`` with ``up @ down ~= delta`` and ``alpha = r`` (scale 1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lycotrain.errors import FormatError


@dataclass
class LowRank:
    up: torch.Tensor
    down: torch.Tensor
    rank: int
    max_abs_error: float  # max |delta - up @ down|
    rel_error: float  # ||delta - up @ down||_F / ||delta||_F (0 for a zero delta)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The kohya LoRA keys of this factorisation (``alpha = rank``: no extra scale)."""
        return {"lora_up.weight": self.up, "lora_down.weight": self.down, "alpha": torch.tensor(float(self.rank))}


def choose_rank(singular_values: torch.Tensor, rank: int | None, energy: float | None) -> int:
    """``rank`` as given, or the smallest rank keeping ``energy`` (0..1] of sum(s^2); at least 1."""
    if rank is not None and energy is not None:
        raise FormatError("give a rank or an energy threshold, not both")
    if rank is not None:
        if rank < 1:
            raise FormatError(f"rank must be >= 1, got {rank}")
        return min(rank, singular_values.numel())
    if energy is None:
        raise FormatError("give a rank or an energy threshold")
    if not 0.0 < energy <= 1.0:
        raise FormatError(f"energy threshold must be in (0, 1], got {energy}")
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    kept = torch.cumsum(power, 0) / total
    return min(int(torch.searchsorted(kept, torch.tensor(energy, dtype=kept.dtype) - 1e-12)) + 1,
               singular_values.numel())


def lora_from_delta(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> LowRank:
    """Best rank-``r`` LoRA of ``delta`` (Eckart-Young), computed in fp64 and returned in fp32.

    The singular values are split evenly between ``up`` and ``down`` so that both stay in fp16 range.
    """
    shape = delta.shape
    flat = delta.detach().double().reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    r = choose_rank(s, rank, energy)
    root = s[:r].sqrt()
    up, down = u[:, :r] * root, root[:, None] * vh[:r]
    residual = flat - up @ down
    norm = float(flat.norm())
    conv = len(shape) == 4
    return LowRank(
        up=(up.reshape(shape[0], r, 1, 1) if conv else up).float(),
        down=(down.reshape(r, *shape[1:]) if conv else down).float(),
        rank=r,
        max_abs_error=float(residual.abs().max()) if residual.numel() else 0.0,
        rel_error=float(residual.norm()) / norm if norm > 0 else 0.0,
    )
