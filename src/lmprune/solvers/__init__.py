"""Per-matrix solvers, by name. Each entry is a pure tensor function plus its validated options."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .base import Gram, SolveFn, SolveResult, SolverOptions, reconstruction_error


@dataclass(frozen=True)
class SolverSpec:
    name: str
    module: str
    preset: dict[str, Any] = field(default_factory=dict)
    summary: str = ""

    def load(self):
        return importlib.import_module(f"{__name__}.{self.module}")

    def options(self, overrides: dict[str, Any] | None = None) -> SolverOptions:
        """Validated options: the preset's, then the user's overrides."""
        return self.load().Options(**{**self.preset, **(overrides or {})})

    def solve_fn(self) -> SolveFn:
        return self.load().solve


SOLVERS: dict[str, SolverSpec] = {
    s.name: s
    for s in [
        SolverSpec("magnitude", "magnitude", summary="keep the largest |W| (no calibration data)"),
        SolverSpec("wanda", "wanda", summary="keep the largest |W|·‖X‖ per output row, no update"),
        SolverSpec("sparsegpt", "sparsegpt", summary="OBS reconstruction, adaptive mask per 128 columns"),
        SolverSpec("alps", "alps", summary="ADMM with ρ schedule on the scaled layer error, then PCG on the support"),
        SolverSpec(
            "alps-fast",
            "alps",
            preset={"rho0": 0.3, "schedule": False, "max_iter": 3, "pcg_iters": 2},
            summary="ALPS early-stopped: 3 ADMM steps at fixed ρ=0.3, then 2 PCG steps (about SparseGPT's time)",
        ),
        SolverSpec(
            "alps-paper",
            "alps",
            preset={"pcg_iters": 10},
            summary="ALPS as the authors run it: 10 PCG steps (lmprune's alps: 3); float32 ridge inverses kept",
        ),
    ]
}


def register(spec: SolverSpec) -> None:
    SOLVERS[spec.name] = spec


def get_solver(name: str) -> SolverSpec:
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose from {', '.join(sorted(SOLVERS))}") from None


__all__ = ["Gram", "SolveResult", "SolverOptions", "SolverSpec", "SOLVERS", "get_solver", "register", "reconstruction_error"]
