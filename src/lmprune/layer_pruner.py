"""The layer pruner: what one matrix goes through -- solver, then refiner -- at the run's pattern and targets.

It is the one object a block strategy solves with, so the pattern travels on one track: the pruner solves with
it and verifies with it (or with the comparison group a solver reports having used instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

from .patterns import Pattern, PatternCheck
from .registry import REFINERS, SOLVERS
from .solvers.base import Gram, SolveResult


@dataclass(frozen=True)
class LayerPruner:
    """``solve`` → ``refine`` on one matrix.

    ``targets`` maps full matrix names to target sparsities (the allocation); ``solver_options`` and
    ``refine_options`` are validated already (:meth:`build`).
    """

    pattern: Pattern
    targets: dict[str, float]
    solve_fn: Callable[..., SolveResult]
    refine_fn: Callable[..., SolveResult]
    solver_options: dict[str, Any] = field(default_factory=dict)
    refine_options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, solver: str, refiner: str, pattern: Pattern, targets: dict[str, float],
              options: dict[str, dict[str, Any]]) -> "LayerPruner":
        """From registry names; ``options`` holds ``solver_options`` and ``refine_options`` as resolved."""
        return cls(pattern, targets, SOLVERS.get(solver).function(), REFINERS.get(refiner).function(),
                   options.get("solver_options", {}), options.get("refine_options", {}))

    def solve(self, weight: Tensor, gram: Gram, target: float) -> SolveResult:
        result = self.solve_fn(weight, gram, self.pattern, target, **self.solver_options)
        return self.refine_fn(weight, result, gram, self.pattern, target, **self.refine_options)

    def verify(self, weight: Tensor, target: float, result: SolveResult) -> PatternCheck:
        """Does ``weight`` satisfy the pattern the solver used at ``target``? A failing check's ``detail`` names
        the pattern."""
        pattern = result.pattern or self.pattern
        check = pattern.verify(weight, pattern.effective_sparsity(target))
        if not check.ok:
            return PatternCheck(False, check.achieved_sparsity, f"{pattern.spec}: {check.detail}")
        return check
