"""Validated run configuration. Unknown fields are errors, so a typo in a recipe never passes silently."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .patterns import Pattern, PatternError, check_sparsity, parse_pattern
from .errors import ConfigError, yaml_problem
from .registry import ALLOCATORS, BLOCK_METHODS, REFINERS, SOLVERS, block_method_of, method_names


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
    method_options: dict[str, Any] = Field(default_factory=dict)  # options of the block method
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
        choices = {"method": method_names(), "inner": SOLVERS.names(), "refine": REFINERS.names()}[info.field_name]
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
        if self.allocation not in ALLOCATORS and not self.allocation.endswith(".json"):
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATORS)} or a .json file, "
                             f"not {self.allocation!r}")
        self._check_stage_options()
        return self

    def _check_stage_options(self) -> None:
        """Every stage's options against its ``Options`` model (names, types, ranges), before any model is loaded."""
        SOLVERS.options(self.solver_name, self.solver_options)
        REFINERS.options(self.refine, self.refine_options)
        BLOCK_METHODS.options(self.block_method, self.block_method_options)
        if self.allocation in ALLOCATORS:
            options = ALLOCATORS.options(self.allocation, self.allocation_options)
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
    def block_method(self) -> str:
        """The block method the run prunes with (``layerwise`` for a per-matrix method)."""
        return block_method_of(self.method)

    @property
    def block_method_options(self) -> dict[str, Any]:
        if self.block_method == "layerwise":
            return {"sequential": self.sequential, **self.method_options}
        return self.method_options

    @property
    def solver_name(self) -> str:
        return self.method if block_method_of(self.method) == "layerwise" else self.inner

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


#: Fields that say where and how a run computes, not what it computes: runs differing only in them are the same run.
RUN_PLACE_FIELDS = ("device", "offload_activations", "offload_dir", "calib_batch_size", "data_dir")


class EvalRequest(BaseModel):
    """What to evaluate after (and, with ``dense``, before) pruning; every cap is reported beside its figure."""

    model_config = ConfigDict(extra="forbid")

    #: Perplexity datasets (``wikitext2``, ``ptb``, ``c4`` or a file).
    datasets: list[str] = Field(default_factory=list)
    #: Cap on perplexity windows per dataset.
    windows: int | None = Field(None, ge=1)
    #: Perplexity window length (default: the calibration window length).
    seqlen: int | None = Field(None, ge=2)
    #: Also evaluate the dense model first.
    dense: bool = False
    #: Zero-shot tasks (lm-evaluation-harness).
    tasks: list[str] = Field(default_factory=list)
    #: Documents per zero-shot task.
    limit: int | None = Field(None, ge=1)
    #: Perplexity windows per forward pass.
    ppl_batch_size: int = Field(1, ge=1)
    #: Zero-shot batch size.
    task_batch_size: int = Field(8, ge=1)

    def perplexity_only(self) -> "EvalRequest":
        return self.model_copy(update={"tasks": []})


class Job(BaseModel):
    """One ``lmprune prune`` command: the model, the configuration, the run directory and how to run."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: str
    out: Path
    config: PruneConfig
    evaluation: EvalRequest = Field(default_factory=EvalRequest)
    #: Precision the model is loaded and propagated in ("auto": as saved); solves are float32 whatever it is.
    dtype: str = "float32"
    #: Precision the model is saved in ("original": the model's own).
    save_dtype: str = "original"
    #: Read and write one block at a time from safetensors shards.
    stream: bool = False
    overwrite: bool = False
    #: None: resume an interrupted run when there is one; True: require one; False: discard it.
    resume: bool | None = None
    trust_remote_code: bool = False
    trust_pickle: bool = False
    #: A declared structure (blocks, matrices, groups, FFN) replacing discovery's.
    adapter: Path | None = None
    memory_check: bool = True
    progress: bool = True
    invocation: dict[str, Any] | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What an interrupted run must share with this one to be resumed by it."""
        cfg = self.config.model_dump()
        for key in RUN_PLACE_FIELDS:
            cfg.pop(key, None)
        return {"model": self.model, **cfg, "dtype": self.dtype, **({"stream": True} if self.stream else {}),
                **({"adapter": str(self.adapter)} if self.adapter else {})}


def build_eval(**fields: Any) -> EvalRequest:
    """EvalRequest from keyword fields (None values dropped); errors become one-line :class:`ConfigError`."""
    try:
        return EvalRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from None


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
        raise ConfigError(f"cannot parse recipe {p}: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {p} must be a mapping of options")
    return data
