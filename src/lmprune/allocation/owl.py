"""OWL (Yin et al., ICML 2024): outlier-weighted layer-wise sparsity, one ratio per decoder block.

For block ``b``, the Wanda scores ``A = |W_ij| · ‖X_j‖₂`` of all its matrices form one population; its outlier
ratio is ``D_b = 100 · #{A > M · mean(A)} / #A`` (percent). More outliers → less pruning:

    d_b = 2λ (D_b − min D) / (max D − min D)
    s_b = clip(c − d_b, lo, hi),   c such that Σ_ℓ n_ℓ s_{b(ℓ)} = S Σ_ℓ n_ℓ

so the sparsities span about ``S ± λ``. Deviations from the reference: the mean is weighted by parameters
(the reference averages blocks unweighted, which is the same only when all blocks have equal size), and the
ratios are clamped into ``[min_sparsity, max_sparsity]`` with ``c`` re-solved so the target still holds
exactly (the reference floors densities without renormalising).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Mapping, Sequence

from pydantic import Field
from torch import Tensor

from ..solvers.base import validate_options
from .base import Allocation, ClampedOptions, MatrixAllocation, MatrixInfo, fit_weighted_mean


class Options(ClampedOptions):
    """OWL's options (``--alloc-opt``), with their valid ranges."""

    #: outlier threshold: a score counts as an outlier above ``M`` times its block's mean score
    M: float = Field(5.0, gt=0)
    #: half-width of the sparsity spread across blocks (targets span about ``S ± lam``)
    lam: float = Field(0.08, ge=0)



def _scores(m: MatrixInfo, norms: Tensor) -> Tensor:
    w = m.weight.detach().float()
    if norms.ndim != 1 or norms.numel() != w.shape[1]:
        raise ValueError(f"input norms of {m.name} have shape {tuple(norms.shape)}, expected ({w.shape[1]},)")
    return w.abs() * norms.to(device=w.device, dtype=w.dtype).unsqueeze(0)


def outlier_ratios(
    matrices: Sequence[MatrixInfo], input_norms: Mapping[str, Tensor], M: float = 5.0
) -> dict[int, float]:
    """Per-block outlier ratio (percent) of the Wanda scores pooled over the block's matrices."""
    missing = [m.name for m in matrices if m.name not in input_norms]
    if missing:
        raise KeyError(f"no input norms for {len(missing)} matrices, e.g. {missing[:3]}")
    total: dict[int, float] = defaultdict(float)
    count: dict[int, int] = defaultdict(int)
    for m in matrices:  # first pass: the block mean of the scores
        total[m.block] += float(_scores(m, input_norms[m.name]).double().sum())
        count[m.block] += m.params
    above: dict[int, int] = defaultdict(int)
    for m in matrices:  # second pass: how many exceed M x that mean
        threshold = M * total[m.block] / count[m.block]
        above[m.block] += int((_scores(m, input_norms[m.name]) > threshold).sum())
    return {b: 100.0 * above[b] / count[b] for b in sorted(count)}


def allocate(
    matrices: Sequence[MatrixInfo],
    input_norms: Mapping[str, Tensor],
    sparsity: float,
    M: float = 5.0,
    lam: float = 0.08,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.99,
) -> Allocation:
    """OWL targets: one sparsity per block, parameter-weighted mean ``sparsity``.

    ``input_norms[name]`` is ``‖X_j‖₂`` per input feature of that matrix (``sqrt(diag H)``).
    """
    start = time.perf_counter()
    if not matrices:
        raise ValueError("no matrices to allocate")
    opt = validate_options(Options, {"M": M, "lam": lam, "min_sparsity": min_sparsity, "max_sparsity": max_sparsity},
                           "owl allocation")
    opt.check_target(sparsity)

    ratio = outlier_ratios(matrices, input_norms, M)
    lo_d, hi_d = min(ratio.values()), max(ratio.values())
    spread = {b: (2 * lam * (d - lo_d) / (hi_d - lo_d) if hi_d > lo_d else 0.0) for b, d in ratio.items()}
    targets = fit_weighted_mean(
        [-spread[m.block] for m in matrices],
        [1.0] * len(matrices),
        [m.params for m in matrices],
        sparsity,
        min_sparsity,
        max_sparsity,
    )
    return Allocation(
        method="owl",
        sparsity=sparsity,
        matrices=[
            MatrixAllocation(m.name, m.block, m.params, t, ratio[m.block]) for m, t in zip(matrices, targets)
        ],
        options={
            "M": M,
            "lam": lam,
            "min_sparsity": min_sparsity,
            "max_sparsity": max_sparsity,
            "clamped": sum(t <= min_sparsity or t >= max_sparsity for t in targets),
            "block_outlier_ratio": {str(b): d for b, d in ratio.items()},
        },
        metric_name="outlier_ratio_pct",
        time_s=time.perf_counter() - start,
    )
