"""The allocation contract: per-matrix target sparsities whose parameter-weighted mean is the target.

An allocator returns an :class:`Allocation` and never prunes. It is a saveable artifact: ``to_json`` /
``from_json`` round-trip it, so one allocation can feed many runs (``--allocation FILE.json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import Field, model_validator
from torch import Tensor

from ..solvers.base import StageOptions


class ClampedOptions(StageOptions):
    """Options of an allocator that clamps every target into ``[min_sparsity, max_sparsity]``."""

    min_sparsity: float = Field(0.0, ge=0, lt=1)
    max_sparsity: float = Field(0.99, ge=0, lt=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ClampedOptions":
        if self.min_sparsity > self.max_sparsity:
            raise ValueError(f"min_sparsity {self.min_sparsity} is above max_sparsity {self.max_sparsity}")
        return self

    def check_target(self, sparsity: float) -> None:
        """The target must lie in ``[min_sparsity, max_sparsity]``, or no allocation reaches it."""
        if not self.min_sparsity <= sparsity <= self.max_sparsity:
            raise ValueError(f"need 0 <= min_sparsity <= sparsity <= max_sparsity < 1, got "
                             f"{self.min_sparsity}, {sparsity}, {self.max_sparsity}")


@dataclass
class MatrixInfo:
    """One prunable matrix as an allocator sees it: its name, decoder block index and weight."""

    name: str
    block: int
    weight: Tensor

    @property
    def params(self) -> int:
        return self.weight.numel()


@dataclass
class MatrixAllocation:
    name: str
    block: int
    params: int
    target: float
    metric: float | None = None  # the allocator's per-matrix statistic (α, outlier ratio, ...)
    achieved: float | None = None  # filled in after pruning


@dataclass
class Allocation:
    method: str
    sparsity: float
    matrices: list[MatrixAllocation]
    options: dict[str, Any] = field(default_factory=dict)
    metric_name: str | None = None
    time_s: float = 0.0

    @property
    def targets(self) -> dict[str, float]:
        return {m.name: m.target for m in self.matrices}

    def weighted_mean(self) -> float:
        total = sum(m.params for m in self.matrices)
        return sum(m.params * m.target for m in self.matrices) / total

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "metric_name": self.metric_name,
            "options": self.options,
            "time_s": self.time_s,
            "weighted_mean_sparsity": self.weighted_mean(),
            "matrices": [asdict(m) for m in self.matrices],
        }

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Allocation":
        """The inverse of :meth:`to_dict`; a one-line ``ValueError`` saying what is missing or malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"an allocation is a JSON object with {', '.join(_REQUIRED)}, not a {type(d).__name__}")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"no {', '.join(repr(k) for k in missing)} key (an allocation needs "
                             f"{', '.join(_REQUIRED)}; 'matrices' lists {{{', '.join(_MATRIX_REQUIRED)}}} per matrix)")
        if not isinstance(d["matrices"], list):
            raise ValueError(f"'matrices' must be a list of {{{', '.join(_MATRIX_REQUIRED)}}}, "
                             f"not a {type(d['matrices']).__name__}")
        matrices = []
        for i, m in enumerate(d["matrices"]):
            lacking = [k for k in _MATRIX_REQUIRED if k not in m] if isinstance(m, dict) else list(_MATRIX_REQUIRED)
            if lacking:
                raise ValueError(f"matrices[{i}] has no {', '.join(repr(k) for k in lacking)}")
            try:
                matrices.append(MatrixAllocation(**m))
            except TypeError as e:  # a key MatrixAllocation does not know
                raise ValueError(f"matrices[{i}]: {e}") from None
        numbers = {}
        for key, default in (("sparsity", None), ("time_s", 0.0)):
            try:
                numbers[key] = float(d.get(key, default))
            except (TypeError, ValueError):
                raise ValueError(f"{key!r} must be a number, not {d.get(key)!r}") from None
        return cls(
            method=d["method"],
            sparsity=numbers["sparsity"],
            matrices=matrices,
            options=d.get("options", {}),
            metric_name=d.get("metric_name"),
            time_s=numbers["time_s"],
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "Allocation":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:  # ValueError includes JSONDecodeError and UnicodeDecodeError
            raise ValueError(f"cannot read allocation file {path}: {_first_line(e)}") from None


_REQUIRED = ("method", "sparsity", "matrices")
_MATRIX_REQUIRED = ("name", "block", "params", "target")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def uniform(names_params_blocks: list[tuple[str, int, int]], sparsity: float) -> Allocation:
    """Every matrix gets the target."""
    return Allocation(
        "uniform", sparsity, [MatrixAllocation(n, b, p, sparsity) for n, p, b in names_params_blocks]
    )


def fit_weighted_mean(
    offset: Sequence[float],
    slope: Sequence[float],
    params: Sequence[int],
    target: float,
    lo: float = 0.0,
    hi: float = 0.99,
) -> list[float]:
    """Solve ``Σ n_ℓ clip(a_ℓ + b_ℓ t, lo, hi) = target · Σ n_ℓ`` for ``t`` exactly; return the clipped values.

    ``b_ℓ ≥ 0``: a pure rescaling is ``a = 0, b = r`` (t is AlphaPruning's η), a pure shift is ``a = base,
    b = 1`` (OWL). The left side is continuous, non-decreasing and piecewise linear in ``t``; the solution is
    found on the linear piece that brackets the target, so clamped entries hand their excess to the free ones
    ("water-filling") and the parameter-weighted mean holds to float64 rounding.
    """
    a = torch.as_tensor(offset, dtype=torch.float64)
    b = torch.as_tensor(slope, dtype=torch.float64)
    n = torch.as_tensor(params, dtype=torch.float64)
    if not (a.shape == b.shape == n.shape) or a.ndim != 1 or a.numel() == 0:
        raise ValueError("offset, slope and params must be non-empty and of equal length")
    if bool((b < 0).any()) or bool((n <= 0).any()):
        raise ValueError("slopes must be >= 0 and parameter counts > 0")
    if not lo <= target <= hi:
        raise ValueError(f"target sparsity {target} is outside the allowed range [{lo}, {hi}]")
    total = target * n.sum()

    def mean_at(t: Tensor) -> Tensor:  # t: (k,) -> Σ n clip(a + b t) for each t
        return (n * (a + b * t[:, None]).clamp(lo, hi)).sum(1)

    moving = b > 0
    fixed_sum = (n[~moving] * a[~moving].clamp(lo, hi)).sum()
    reach_lo = fixed_sum + lo * n[moving].sum()
    reach_hi = fixed_sum + hi * n[moving].sum()
    tol = 1e-12 * n.sum()
    if total < reach_lo - tol or total > reach_hi + tol:
        raise ValueError(
            f"no allocation reaches mean {target}: achievable [{reach_lo / n.sum():.6f}, {reach_hi / n.sum():.6f}]"
        )
    if not bool(moving.any()):
        return a.clamp(lo, hi).tolist()

    am, bm = a[moving], b[moving]
    knots = torch.unique(torch.cat([(lo - am) / bm, (hi - am) / bm]))
    values = mean_at(knots)
    k = int(torch.searchsorted(values, total.reshape(1)).item())
    k = min(max(k, 1), knots.numel() - 1) if knots.numel() > 1 else 0
    # on [knots[k-1], knots[k]] the clamped set is fixed: solve the linear equation for the free entries
    mid = (knots[k - 1] + knots[k]) / 2 if knots.numel() > 1 else knots[0]
    y = a + b * mid
    free = moving & (y > lo) & (y < hi)
    clamped_sum = (n[~free] * y[~free].clamp(lo, hi)).sum()
    if bool(free.any()):
        t = (total - clamped_sum - (n[free] * a[free]).sum()) / (n[free] * b[free]).sum()
    else:
        t = mid
    return (a + b * t).clamp(lo, hi).tolist()
