"""A short name for the configuration a run used, from its manifest: which reference behaviour and which of
lmprune's changes to it.

    sparsellm(sparsegpt, +down refit, +best round)      lmprune's SparseLLM defaults
    sparsellm-paper(sparsegpt)                          the authors' configuration (--method-opt preset=paper)
    sparsellm-paper(alps, rounds 2)                     the same with one option changed
    wanda + alpha(peak_reference)                       AlphaPruning with the reference's x_min candidates
    alps(pcg 10)                                        ALPS with one option away from its preset
    sparsegpt+dsnot                                     a refiner after the solver

Solver and refiner options are named only where they differ from the named solver's (or preset's) defaults;
SparseLLM always names its two additions to the reference (``+down refit``, ``+best round``) when they are on.
Older manifests without the newer option fields get today's defaults for them, which is what those runs did.
"""

from __future__ import annotations

from typing import Any

from ..registry import BLOCK_METHODS, REFINERS, SOLVERS

_PRETTY = {"alpha": "α", "beta": "β", "gamma": "γ", "epsilon": "ε", "pcg_iters": "pcg", "rounds": "rounds",
           "single_round_blocks": "single-round blocks"}
_IGNORED = {"chunk_tokens", "preset", "cache_dir", "device", "pcg_track"}  # speed or bookkeeping, not results
ALPHA_DEFAULTS = {"epsilon": 0.3, "xmin_rule": "peak", "aggregate": "block", "min_sparsity": 0.0,
                  "max_sparsity": 0.99}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _diffs(options: dict[str, Any], defaults: dict[str, Any], skip: set[str] = frozenset()) -> list[str]:
    out = []
    for key, value in options.items():
        if key in _IGNORED or key in skip or key not in defaults:
            continue
        default = defaults[key]
        if isinstance(default, tuple):
            default = list(default)
        if isinstance(value, tuple):
            value = list(value)
        if value != default:
            out.append(f"{_PRETTY.get(key, key)} {_fmt(value)}" if key in _PRETTY else f"{key}={_fmt(value)}")
    return out


def _with(name: str, parts: list[str]) -> str:
    return f"{name}({', '.join(parts)})" if parts else name


def solver_label(name: str, options: dict[str, Any] | None) -> str:
    """``alps(pcg 10)``: the solver name and every option that differs from that name's resolved defaults."""
    try:
        defaults = SOLVERS.resolved(name)
    except ValueError:  # a solver this version no longer has
        return name
    return _with(name, _diffs(options or {}, defaults))


def _refiner_label(name: str, options: dict[str, Any] | None) -> str:
    if not name or name == "none":
        return ""
    try:
        defaults = REFINERS.resolved(name)
    except ValueError:
        return f"+{name}"
    return "+" + _with(name, _diffs(options or {}, defaults))


def _sparsellm_label(inner: str, options: dict[str, Any]) -> str:
    defaults = BLOCK_METHODS.resolved("sparsellm")
    try:  # applies a preset and fills the fields an older manifest lacks
        opts = BLOCK_METHODS.resolved("sparsellm", options)
    except ValueError:  # a field that no longer exists: compare what is there
        opts = {**defaults, **options}
    preset = opts.get("preset")
    if preset:
        reference = BLOCK_METHODS.resolved("sparsellm", {"preset": preset})
        return _with(f"sparsellm-{preset}", [inner] + _diffs(opts, reference))
    parts = [inner]
    if opts.get("refit_down"):
        parts.append("+down refit")
    if opts.get("select") == "best":
        parts.append("+best round")
    return _with("sparsellm", parts + _diffs(opts, defaults, skip={"refit_down", "select"}))


def _allocation_label(manifest: dict[str, Any], config: dict[str, Any]) -> str:
    kind = manifest.get("allocation") or config.get("allocation") or "uniform"
    if isinstance(kind, dict):  # older manifests: {"name": ..., options}
        kind = str(kind.get("name") or kind.get("kind") or "uniform")
    if kind == "uniform":
        return ""
    if kind.endswith(".json"):
        return f" + file({kind.rsplit('/', 1)[-1]})"
    options = dict(config.get("allocation_options") or {})
    detail = (manifest.get("allocation_detail") or {}).get("options") or {}
    if kind == "alpha":
        resolved = {**ALPHA_DEFAULTS, **{k: detail[k] for k in ALPHA_DEFAULTS if k in detail}, **options}
        rest = _diffs(resolved, ALPHA_DEFAULTS, skip={"xmin_rule"})
        return f" + alpha({', '.join([resolved['xmin_rule']] + rest)})"
    return " + " + _with(kind, [f"{k}={_fmt(v)}" for k, v in options.items() if k not in _IGNORED])


def configuration_label(manifest: dict[str, Any]) -> str:
    """The configuration of one run, from its manifest (``lmprune.json`` as a dict)."""
    config = manifest.get("config") or {}
    resolved = manifest.get("resolved_options") or {}
    method = manifest.get("method") or config.get("method") or "?"
    if method == "dense":
        return "dense"
    refine = resolved.get("refiner", config.get("refine", "none"))
    refiner = _refiner_label(refine, resolved.get("refine_options", config.get("refine_options")))
    solver = resolved.get("solver") or (config.get("inner", "sparsegpt") if method == "sparsellm" else method)
    solver_opts = resolved.get("solver_options", config.get("solver_options"))
    inner = solver_label(solver, solver_opts) + refiner
    if method == "sparsellm":
        options = resolved.get("method_options", config.get("method_options")) or {}
        label = _sparsellm_label(inner, options)
    else:
        label = inner
    return label + _allocation_label(manifest, config)
