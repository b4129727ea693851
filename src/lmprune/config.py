"""Validated run configuration. Unknown fields are errors, so a typo in a recipe never passes silently."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .patterns import Pattern, PatternError, check_sparsity, parse_pattern
from .solvers import SOLVERS
from .solvers.base import validate_options

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

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, v: str | None) -> str | None:
        if v is not None:
            _parse_blocks(v)  # the syntax and the order of each range; the model's block count comes later
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
        self._check_stage_options()
        return self

    def _check_stage_options(self) -> None:
        """Every stage's options against its ``Options`` model (names, types, ranges), before any model is loaded."""
        spec = SOLVERS[self.solver_name]
        validate_options(spec.load().Options, {**spec.preset, **self.solver_options}, f"solver_options for {spec.name}")
        if self.refine != "none":
            refiner = importlib.import_module(f"lmprune.refiners.{self.refine}")
            validate_options(refiner.Options, self.refine_options, f"refine_options for {self.refine}")
        if self.method in BLOCK_METHODS:
            strategy = importlib.import_module(f"lmprune.strategies.{self.method}")
            validate_options(strategy.StrategyOptions, self.method_options, f"method_options for {self.method}")
        if self.allocation in ALLOCATIONS:
            allocator = importlib.import_module(f"lmprune.allocation.{self.allocation}")
            options = validate_options(allocator.Options, self.allocation_options,
                                       f"allocation_options for {self.allocation}")
            try:
                if hasattr(options, "check_target"):
                    options.check_target(self.pattern_obj.effective_sparsity(self.sparsity))
            except ValueError as e:
                raise ValueError(f"allocation_options for {self.allocation}: {e}") from None
        elif self.allocation_options:
            raise ValueError(f"allocation_options given, but the allocation file {self.allocation} takes none")

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
            if n_blocks < 2:
                raise ConfigError(f"blocks 'first-half' selects no block: the model has {n_blocks} block(s)")
            return list(range(n_blocks // 2))
        out = _parse_blocks(self.blocks)
        bad = sorted(i for i in out if not 0 <= i < n_blocks)
        if bad:
            raise ConfigError(f"blocks {bad} out of range: the model has {n_blocks} blocks")
        return sorted(out)


def _parse_blocks(spec: str) -> set[int]:
    """Block indices of ``'0-14'``, ``'0,3,5'`` or a mix (empty for ``all``/``first-half``, which need the block
    count); a malformed or reversed range is a one-line ConfigError."""
    if spec in ("all", "first-half"):
        return set()
    out: set[int] = set()
    for part in spec.split(","):
        try:
            bounds = [int(x) for x in part.split("-")] if "-" in part else [int(part)] * 2
            a, b = bounds
        except ValueError:
            raise ConfigError(f"blocks must look like '0-14', '0,3,5', 'all' or 'first-half', not {spec!r}") from None
        if b < a:
            raise ConfigError(f"blocks range {part.strip()!r} is reversed and selects no block; write '{b}-{a}'")
        out.update(range(a, b + 1))
    return out


def build_config(**fields: Any) -> PruneConfig:
    """PruneConfig from keyword fields; validation errors become one-line :class:`ConfigError`."""
    try:
        return PruneConfig(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{where}: {msg}" if where and not msg.startswith(where) else msg) from None
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
    except tomllib.TOMLDecodeError as e:  # its message carries the line and column
        raise ConfigError(f"cannot parse recipe {p}: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse recipe {p}: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {p} must be a mapping of options")
    return data


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line from a YAML error: where (1-based line and column) and what."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = " ".join(str(x) for x in (getattr(e, "problem", None), getattr(e, "context", None)) if x)
    what = what or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what
