"""Uniform allocation: every matrix gets the target sparsity (also the only allocation for N:M patterns)."""

from __future__ import annotations

import time
from typing import Sequence

from ..solvers.base import StageOptions
from .base import Allocation, MatrixInfo, uniform


class Options(StageOptions):
    """Uniform allocation takes no options."""


def allocate(matrices: Sequence[MatrixInfo], sparsity: float) -> Allocation:
    start = time.perf_counter()
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    result = uniform([(m.name, m.params, m.block) for m in matrices], sparsity)
    result.time_s = time.perf_counter() - start
    return result
