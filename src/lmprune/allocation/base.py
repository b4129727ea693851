"""The allocation contract: per-matrix target sparsities whose parameter-weighted mean is the target.

An allocator returns an :class:`Allocation` and never prunes. It is a saveable artifact: ``to_json`` /
``from_json`` round-trip it, so one allocation can feed many runs (``--allocation FILE.json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class MatrixAllocation:
    name: str
    block: int
    params: int
    target: float
    metric: float | None = None  # the allocator's per-matrix statistic (α, outlier ratio, ...)


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
        return cls(
            method=d["method"],
            sparsity=float(d["sparsity"]),
            matrices=[MatrixAllocation(**m) for m in d["matrices"]],
            options=d.get("options", {}),
            metric_name=d.get("metric_name"),
            time_s=float(d.get("time_s", 0.0)),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "Allocation":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read allocation file {path}: {e}") from None


def uniform(names_params_blocks: list[tuple[str, int, int]], sparsity: float) -> Allocation:
    """Every matrix gets the target."""
    return Allocation(
        "uniform", sparsity, [MatrixAllocation(n, b, p, sparsity) for n, p, b in names_params_blocks]
    )
