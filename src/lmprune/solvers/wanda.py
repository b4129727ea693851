"""Wanda (Sun et al., 2023): prune by |W_ij| · ‖X_j‖₂, without any weight update.

The score is the first-order estimate of the output change from removing W_ij given inputs X (tokens x in):
``S_ij = |W_ij| · ‖X_{:,j}‖₂``, with ‖X_j‖² = H_jj. The paper compares scores within each **output row**,
so ``unstructured`` is treated here as ``unstructured:row`` unless ``per_row=False``.
"""

from __future__ import annotations

from torch import Tensor

from ..patterns import Pattern, Unstructured
from .base import Gram, SolveResult, SolverOptions, screen_inputs


class Options(SolverOptions):
    per_row: bool = True


def scores(weight: Tensor, gram: Gram) -> Tensor:
    """Wanda saliency |W| · ‖X_j‖₂ (out x in, float32)."""
    return weight.abs().float() * gram.column_norms().float().unsqueeze(0)


def solve(weight: Tensor, gram: Gram, pattern: Pattern, sparsity: float, per_row: bool = True) -> SolveResult:
    if per_row and isinstance(pattern, Unstructured):
        pattern = Unstructured("row")
    zero = screen_inputs("wanda", weight, gram, pattern, sparsity)
    if zero is not None:
        zero.stats["comparison_group"], zero.pattern = pattern.spec, pattern
        return zero
    mask = pattern.keep_mask(scores(weight, gram), sparsity)
    return SolveResult(weight * mask, mask, {"comparison_group": pattern.spec}, pattern)
