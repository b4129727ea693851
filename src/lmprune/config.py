"""Validated run configuration. Unknown fields are errors, so a typo in a recipe never passes silently."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .patterns import Pattern, PatternError, check_sparsity, parse_pattern
from .solvers import SOLVERS

#: Methods that run as a block strategy around an inner per-matrix solver.
BLOCK_METHODS = ("sparsellm",)
REFINERS = ("none", "dsnot")
ALLOCATIONS = ("uniform", "owl", "alpha")


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the problem."""


def method_names() -> list[str]:
    return sorted(SOLVERS) + list(BLOCK_METHODS)


class PruneConfig(BaseModel):
    """Everything that determines a pruning run (and therefore goes into the manifest)."""

    model_config = ConfigDict(extra="forbid")

    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    allocation: str = "uniform"
    allocation_options: dict[str, Any] = Field(default_factory=dict)
    refine: str = "none"
    refine_options: dict[str, Any] = Field(default_factory=dict)
    solver_options: dict[str, Any] = Field(default_factory=dict)
    inner: str = "sparsegpt"  # per-matrix solver used inside block methods
    method_options: dict[str, Any] = Field(default_factory=dict)  # options of a block method (SparseLLM)
    calib: str = "c4"
    nsamples: int = Field(128, ge=1)
    seqlen: int | None = Field(None, ge=2)
    seed: int = 0
    device: str = "cpu"
    blocks: str | None = None  # "0-14", "0,3,5", "first-half"; None = all
    sequential: bool = False
    data_dir: str | None = None
    #: Keep the calibration activations on the CPU and move one window at a time to ``device`` (same weights,
    #: less device memory, more host-device traffic).
    offload_activations: bool = False
    #: Keep the calibration activations in files in this folder (a temporary subfolder, removed afterwards), one
    #: window in memory at a time: host memory no longer grows with nsamples x seqlen; same weights.
    offload_dir: str | None = None
    #: Calibration windows per forward pass through a block: faster on a GPU, same result up to float rounding.
    calib_batch_size: int = Field(1, ge=1)

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float) -> float:
        return check_sparsity(v)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        return parse_pattern(v).spec

    @field_validator("method", "inner", "refine")
    @classmethod
    def _known_name(cls, v: str, info) -> str:
        choices = {"method": method_names(), "inner": sorted(SOLVERS), "refine": list(REFINERS)}[info.field_name]
        if v not in choices:
            what = {"method": "method", "inner": "inner solver", "refine": "refiner"}[info.field_name]
            raise ValueError(f"unknown {what} {v!r}; choose from {', '.join(choices)}")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not (v == "cpu" or v.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda[:N], not {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "PruneConfig":
        pattern = self.pattern_obj
        if self.allocation != "uniform" and not pattern.allocatable:
            raise ValueError(
                f"pattern {pattern.spec} fixes the sparsity of every matrix ({pattern.effective_sparsity(0):.2f}); "
                f"--allocation {self.allocation} cannot apply, use uniform"
            )
        if self.allocation not in ALLOCATIONS and not self.allocation.endswith(".json"):
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)} or a .json file, not {self.allocation!r}")
        return self

    @property
    def pattern_obj(self) -> Pattern:
        return parse_pattern(self.pattern)

    @property
    def solver_name(self) -> str:
        return self.inner if self.method in BLOCK_METHODS else self.method

    def block_indices(self, n_blocks: int) -> list[int]:
        """Which blocks to prune, parsed from ``blocks``."""
        if self.blocks is None or self.blocks == "all":
            return list(range(n_blocks))
        if self.blocks == "first-half":
            return list(range(n_blocks // 2))
        out: set[int] = set()
        try:
            for part in self.blocks.split(","):
                if "-" in part:
                    a, b = part.split("-")
                    out.update(range(int(a), int(b) + 1))
                else:
                    out.add(int(part))
        except ValueError:
            raise ConfigError(f"blocks must look like '0-14', '0,3,5', 'all' or 'first-half', not {self.blocks!r}") from None
        bad = [i for i in out if not 0 <= i < n_blocks]
        if bad:
            raise ConfigError(f"blocks {bad} out of range: the model has {n_blocks} blocks")
        return sorted(out)


def build_config(**fields: Any) -> PruneConfig:
    """PruneConfig from keyword fields; validation errors become one-line :class:`ConfigError`."""
    try:
        return PruneConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {msg}" if where else msg) from None
    except PatternError as e:
        raise ConfigError(str(e)) from None


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A run given as a TOML or YAML file: ``model``, ``out``, ``eval`` plus any PruneConfig field."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    text = p.read_text()
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse recipe {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {p} must be a mapping of options")
    return data
