"""LyCORIS's rule for splitting a dimension into two factors (LoKr Kronecker layout, OFT block geometry).

The WebUIs re-derive nothing from it (they read shapes from the file), but LyCORIS, kohya and our trainer
must agree on it so that the same ``factor`` / ``lora_dim`` gives the same shapes (specs/webui-formats.md §3.3).
"""

from __future__ import annotations

import math


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m <= n`` and ``m * n == dimension``.

    * ``factor > 0`` dividing ``dimension``: the split is ``factor`` and ``dimension // factor``.
    * otherwise: ``m`` is the largest divisor of ``dimension`` that is at most ``sqrt(dimension)`` and at most
      ``factor`` (no bound for ``factor < 0``, i.e. the most square split; ``factor == 0`` gives ``m = 1``).
      This is what LyCORIS's divisor walk (stop when ``m + n`` would grow or ``m`` would pass ``factor``)
      computes.
    """
    if factor > 0 and dimension % factor == 0:
        other = dimension // factor
        return min(factor, other), max(factor, other)
    limit = dimension if factor < 0 else factor
    m = max((d for d in range(1, math.isqrt(dimension) + 1) if dimension % d == 0 and d <= limit), default=1)
    return m, dimension // m
