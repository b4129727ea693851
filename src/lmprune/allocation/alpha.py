"""AlphaPruning (Lu et al., NeurIPS 2024): per-layer sparsity from the heavy-tail exponent α of each ESD.

For every prunable matrix, α is the Hill exponent of the tail of the eigenvalues of ``WᵀW`` (see
:mod:`.hill`). A heavier tail (smaller α) marks a better-trained matrix, which is pruned less. With the
metric ``q_ℓ`` (α of the matrix, or the mean α of its block) and the target ``S``:

    r_ℓ = 1 − ε + 2ε (q_ℓ − min q) / (max q − min q)
    s_ℓ = clip(η r_ℓ, lo, hi),   η such that Σ n_ℓ s_ℓ = S Σ n_ℓ     (n_ℓ = parameters of matrix ℓ)

Deviation from the reference: the reference stops at ``s_ℓ = η r_ℓ`` with ``η = S Σn / Σ n r``, which can
exceed 1 at high ``S`` and large ε (and then crashes the pruner). Here every ratio is clamped into
``[min_sparsity, max_sparsity]`` and η is re-solved with the clamped matrices fixed (water-filling), so the
parameter-weighted mean still equals the target exactly. Without clamping both give the same numbers.

The reference configuration is ``xmin_rule="peak_reference"`` (the authors' x_min candidates, see :mod:`.hill`)
with the defaults ``aggregate="block"``; the clamping stays, since a sparsity above 1 cannot be pruned. lmprune's
default ``xmin_rule="peak"`` differs from it; run labels say which (``alpha(peak)`` / ``alpha(peak_reference)``).

``aggregate``: ``"block"`` (the reference default: mean α of the block's matrices, broadcast to each),
``"matrix"`` (each matrix its own α) or ``"block_median"`` (an addition: the median is not dragged by one
matrix whose KS-chosen tail has only a handful of eigenvalues and an extreme α — on SmolLM2-135M single
v_proj/o_proj fits reach α = 16–18 and would otherwise send their whole block to the maximum sparsity).

Default ε = 0.3, chosen by measurement (``bench/allocation.py``, bench/RESULTS.md): on SmolLM2-135M at 70%,
ε ∈ {0.1, 0.2, 0.3} with Wanda and SparseGPT, the lowest geometric-mean C4 perplexity came from 0.3.

The SVDs are the whole cost: they run on each weight's device (or ``device``) and, given ``cache_dir``, the
fits are stored per matrix in ``{cache_dir}/alpha-{model_hash}.json`` and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from pydantic import ConfigDict, Field, field_validator

from ..solvers.base import validate_options
from .base import Allocation, ClampedOptions, MatrixAllocation, MatrixInfo, fit_weighted_mean
from .hill import XMIN_RULES, PowerLawFit, matrix_alpha

AGGREGATES = ("block", "matrix", "block_median")
_SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Options(ClampedOptions):
    """AlphaPruning's options (``--alloc-opt``), with their valid ranges."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    epsilon: float = Field(0.3, ge=0, lt=1)
    xmin_rule: str = "peak"
    aggregate: str = "block"
    cache_dir: str | Path | None = None
    model_hash: str | None = None
    device: str | torch.device | None = None
    #: dtype of the SVDs (``float32`` or ``float64``)
    dtype: torch.dtype = torch.float32

    @field_validator("xmin_rule")
    @classmethod
    def _xmin_rule(cls, v: str) -> str:
        if v not in XMIN_RULES:
            raise ValueError(f"unknown xmin rule {v!r}; choose from {', '.join(XMIN_RULES)}")
        return v

    @field_validator("aggregate")
    @classmethod
    def _aggregate(cls, v: str) -> str:
        if v not in AGGREGATES:
            raise ValueError(f"unknown aggregate {v!r}; choose from {', '.join(AGGREGATES)}")
        return v

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v):
        if isinstance(v, str) and v.removeprefix("torch.") in _SVD_DTYPES:
            return _SVD_DTYPES[v.removeprefix("torch.")]
        if v not in _SVD_DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(_SVD_DTYPES)}, not {v!r}")
        return v



def weights_hash(matrices: Sequence[MatrixInfo]) -> str:
    """A cheap fingerprint of a set of weights: names, shapes, sums and a strided sample of every matrix."""
    h = hashlib.sha256()
    for m in matrices:
        w = m.weight.detach()
        flat = w.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
        h.update(f"{m.name}|{m.block}|{tuple(w.shape)}|{w.dtype}|{float(flat.double().sum()):.10e}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _cache_path(cache_dir: str | Path, model_hash: str) -> Path:
    return Path(cache_dir).expanduser() / f"alpha-{model_hash}.json"


def _read_cache(path: Path, key: str) -> dict[str, dict]:
    try:
        return json.loads(path.read_text()).get("fits", {}).get(key, {})
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def _write_cache(path: Path, model_hash: str, key: str, fits: dict[str, dict]) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        data = {}
    data.setdefault("fits", {}).setdefault(key, {}).update(fits)
    data["model_hash"] = model_hash
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def compute_alphas(
    matrices: Sequence[MatrixInfo],
    xmin_rule: str = "peak",
    cache_dir: str | Path | None = None,
    model_hash: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, PowerLawFit], dict[str, float]]:
    """Power-law fit of every matrix's ESD, from the cache where possible; also returns timing stats."""
    if xmin_rule not in XMIN_RULES:
        raise ValueError(f"unknown xmin rule {xmin_rule!r}; choose from {', '.join(XMIN_RULES)}")
    key = f"{xmin_rule}/{str(dtype).removeprefix('torch.')}"
    path = None
    cached: dict[str, dict] = {}
    if cache_dir is not None:
        model_hash = model_hash or weights_hash(matrices)
        path = _cache_path(cache_dir, model_hash)
        cached = _read_cache(path, key)

    fits: dict[str, PowerLawFit] = {}
    fresh: dict[str, dict] = {}
    t0 = time.perf_counter()
    for m in matrices:
        entry = cached.get(m.name)
        if entry is not None and entry.get("shape") == list(m.weight.shape):
            fits[m.name] = PowerLawFit(**{k: entry[k] for k in ("alpha", "xmin", "ks", "n_tail", "n_eigs")})
            continue
        w = m.weight if device is None else m.weight.to(device)
        fit = matrix_alpha(w, xmin_rule, dtype)
        fits[m.name] = fit
        fresh[m.name] = {**fit.__dict__, "shape": list(m.weight.shape)}
    svd_s = time.perf_counter() - t0
    if path is not None and fresh:
        _write_cache(path, model_hash, key, fresh)
    return fits, {"svd_time_s": svd_s, "cached": len(matrices) - len(fresh), "computed": len(fresh)}


def alpha_ratios(metric: Sequence[float], epsilon: float) -> list[float]:
    """Linear map of the metric onto ``[1 − ε, 1 + ε]`` (largest metric → ``1 + ε``)."""
    q = torch.as_tensor(metric, dtype=torch.float64)
    span = float(q.max() - q.min())
    if span == 0.0:
        return [1.0] * q.numel()
    return ((q - q.min()) / span * (2 * epsilon) + (1 - epsilon)).tolist()


def allocate(matrices: Sequence[MatrixInfo], sparsity: float, fits: dict[str, PowerLawFit] | None = None,
             **options) -> Allocation:
    """AlphaPruning targets: per-matrix sparsities with parameter-weighted mean ``sparsity``; ``options`` are
    :class:`Options` (ε, the x_min rule, the aggregation, the clamp, the SVD cache and device). ``fits``: the
    power-law fits computed already (spread over ranks by the pipeline), else they are computed here."""
    start = time.perf_counter()
    if not matrices:
        raise ValueError("no matrices to allocate")
    opt = validate_options(Options, options, "alpha allocation")
    opt.check_target(sparsity)
    epsilon, aggregate, min_sparsity, max_sparsity = opt.epsilon, opt.aggregate, opt.min_sparsity, opt.max_sparsity
    xmin_rule = opt.xmin_rule

    if fits is None:
        fits, stats = compute_alphas(matrices, xmin_rule, opt.cache_dir, opt.model_hash, opt.device, opt.dtype)
    else:
        stats = {"svd_time_s": 0.0, "cached": 0, "computed": len(fits), "spread_over_ranks": True}
    by_block: dict[int, list[float]] = defaultdict(list)
    for m in matrices:
        by_block[m.block].append(fits[m.name].alpha)
    if aggregate == "block_median":
        block_alpha = {b: statistics.median(v) for b, v in sorted(by_block.items())}
    else:
        block_alpha = {b: sum(v) / len(v) for b, v in sorted(by_block.items())}
    metric = [fits[m.name].alpha if aggregate == "matrix" else block_alpha[m.block] for m in matrices]

    ratios = alpha_ratios(metric, epsilon)
    params = [m.params for m in matrices]
    targets = fit_weighted_mean([0.0] * len(ratios), ratios, params, sparsity, min_sparsity, max_sparsity)
    n_clamped = sum(t <= min_sparsity or t >= max_sparsity for t in targets)

    return Allocation(
        method="alpha",
        sparsity=sparsity,
        matrices=[
            MatrixAllocation(m.name, m.block, m.params, t, fits[m.name].alpha)
            for m, t in zip(matrices, targets)
        ],
        options={
            "epsilon": epsilon,
            "xmin_rule": xmin_rule,
            "aggregate": aggregate,
            "min_sparsity": min_sparsity,
            "max_sparsity": max_sparsity,
            "clamped": n_clamped,
            "block_alpha": {str(b): a for b, a in block_alpha.items()},
            "fits": {n: {k: v for k, v in f.__dict__.items()} for n, f in fits.items()},
            **stats,
        },
        metric_name="alpha",
        time_s=time.perf_counter() - start,
    )
