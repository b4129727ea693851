"""The running sum ``H = Σ_windows xᵀx`` of one input's Gram matrix, in float64, lower triangle only.

``H`` is symmetric, so only its lower triangle is summed: row panels of :data:`GRAM_ROWS` rows, panel ``[lo, hi)``
holding columns ``[0, hi)``. That is about half the float64 memory and half the multiply-adds of the full
matrix. Each window's panel product is computed in float32 and added in float64: a sum of float32 terms is exact
in float64 unless they span more than 2²⁹ in magnitude, so the total does not depend on the order windows (and
ranks) are added in, and one process and N ranks reach the same bits. :meth:`GramSum.rounded` rounds once to a
full, exactly symmetric float32 matrix (the upper triangle mirrored from the lower).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: rows of the lower triangle per panel (bounds the float32 product of one window to ``rows x in``)
GRAM_ROWS = 512


def panel_bounds(d: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + GRAM_ROWS, d)) for lo in range(0, d, GRAM_ROWS)]


def lower_words(d: int) -> int:
    """Entries a :class:`GramSum` of ``d`` inputs holds (about ``d²/2``)."""
    return sum((hi - lo) * hi for lo, hi in panel_bounds(d))


class GramSum:
    """``Σ xᵀx`` over the windows added, kept as float64 lower-triangle row panels (module doc)."""

    def __init__(self, d: int, device: torch.device | str = "cpu"):
        self.d = d
        self.panels = [torch.zeros(hi - lo, hi, dtype=torch.float64, device=device) for lo, hi in panel_bounds(d)]

    def add_(self, x: Tensor) -> None:
        """Add one window's ``xᵀx`` (``x``: tokens x d, float32)."""
        for (lo, hi), panel in zip(panel_bounds(self.d), self.panels):
            panel.add_(x[:, lo:hi].T @ x[:, :hi])

    def rounded(self) -> Tensor:
        """The full ``d x d`` float32 matrix; the float64 panels are released as they are copied."""
        h = torch.empty(self.d, self.d, dtype=torch.float32, device=self.panels[0].device if self.panels else "cpu")
        for lo, hi in panel_bounds(self.d):
            panel = self.panels.pop(0)
            h[lo:hi, :hi].copy_(panel)
            h[:lo, lo:hi].copy_(panel[:, :lo].T)
            del panel
        return h


def add_outer_(h: Tensor, a: Tensor, rows: int = GRAM_ROWS) -> Tensor:
    """``h += aᵀa`` (``a``: tokens x n float32, ``h``: n x n of any float dtype), ``rows`` rows of ``h`` at a time,
    so that the float32 product is never a whole ``n x n`` matrix beside ``h`` (LLaMA-3-70B's ``d_ff``: 3 GiB).
    Each panel's rows are those of the one full product (the rows of a product do not depend on how many are
    computed together on this machine's BLAS; a test pins it)."""
    for lo in range(0, a.shape[1], rows):
        h[lo:lo + rows].add_(a[:, lo:lo + rows].T @ a)
    return h
