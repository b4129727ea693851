"""Layer-wise sparsity allocation: per-matrix targets whose parameter-weighted mean is the target.

Allocators (registered in :data:`lmprune.registry.ALLOCATORS`) never prune; the engine hands their targets to a solver. What each needs:

- ``uniform``: nothing (``uniform.allocate(matrices, sparsity)``);
- ``alpha``: the weights only (``alpha.allocate(matrices, sparsity, epsilon=...)``), AlphaPruning;
- ``owl``: the weights and per-input activation norms ``‖X_j‖₂`` from a dense calibration pass
  (``owl.allocate(matrices, input_norms, sparsity, M=..., lam=...)``).

A saved allocation (``Allocation.to_json``) is reused with :func:`load_allocation_file`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .base import Allocation, MatrixAllocation, MatrixInfo, fit_weighted_mean


def load_allocation_file(path: str | Path, expected_names: Iterable[str]) -> Allocation:
    """Read ``FILE.json`` and check it covers exactly ``expected_names`` with targets in ``[0, 1)``."""
    allocation = Allocation.from_json(path)
    expected = list(expected_names)
    names = [m.name for m in allocation.matrices]
    problems = []
    dup = sorted({n for n in names if names.count(n) > 1})
    unknown = sorted(set(names) - set(expected))
    missing = [n for n in expected if n not in set(names)]
    bad = [f"{m.name}={m.target}" for m in allocation.matrices if not 0.0 <= float(m.target) < 1.0]
    for label, items in (("duplicate", dup), ("unknown", unknown), ("missing", missing), ("out of [0,1)", bad)):
        if items:
            problems.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
    if problems:
        raise ValueError(f"allocation file {path}: " + "; ".join(problems))
    return allocation


def check_weighted_mean(allocation: Allocation, target: float, tol: float = 1e-6) -> float:
    """The deviation of the parameter-weighted mean target from ``target``; raises if above ``tol``."""
    deviation = abs(allocation.weighted_mean() - target)
    if deviation > tol:
        raise ValueError(
            f"allocation {allocation.method!r} has weighted mean {allocation.weighted_mean():.8f}, "
            f"target {target} (deviation {deviation:.2e} > {tol:.0e})"
        )
    return deviation


__all__ = [
    "Allocation",
    "MatrixAllocation",
    "MatrixInfo",
    "check_weighted_mean",
    "fit_weighted_mean",
    "load_allocation_file",
]
