"""Per-matrix solvers: pure tensor functions ``solve(W, gram, pattern, sparsity, **options)``, one module each.
Their names, presets and options models are registered in :mod:`lmprune.registry`."""

from __future__ import annotations

from ..registry import SOLVERS, Plugin
from .base import Gram, SolveFn, SolveResult, SolverOptions, reconstruction_error


def get_solver(name: str) -> Plugin:
    """The registered solver ``name`` (``.function()`` is its solve function); unknown names are a one-line
    error listing the choices."""
    return SOLVERS.get(name)


__all__ = ["Gram", "SolveFn", "SolveResult", "SolverOptions", "SOLVERS", "get_solver", "reconstruction_error"]
