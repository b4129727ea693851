"""Magnitude pruning: keep the largest |W_ij| within the pattern's comparison group.

Objective: none beyond ``max Σ_kept |W_ij|`` -- the calibration inputs are ignored (the Gram argument is
accepted for the common signature). The surviving weights are left unchanged. A weight holding NaN or Inf is
refused.
"""

from __future__ import annotations

from torch import Tensor

from ..patterns import Pattern
from .base import Gram, SolveResult, SolverOptions, check_finite, keep_largest


class Options(SolverOptions):
    pass


def solve(weight: Tensor, gram: Gram | None, pattern: Pattern, sparsity: float) -> SolveResult:
    check_finite("magnitude", weight)
    return keep_largest(weight, pattern, sparsity)
