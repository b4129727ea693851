"""The identity refiner: a solver's result is kept as it is (``--refine none``)."""

from __future__ import annotations

from ..patterns import Pattern
from ..solvers.base import Gram, SolveResult, SolverOptions
from torch import Tensor


class Options(SolverOptions):
    pass


def refine(dense_weight: Tensor, result: SolveResult, gram: Gram, pattern: Pattern, sparsity: float) -> SolveResult:
    return result
