"""PNG of an allocation: the allocator's metric (top) and the target sparsity (bottom) per decoder block; an
allocation without a metric (uniform, or a file without one) gets the sparsity panel alone."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .base import Allocation  # noqa: E402


def block_profile(allocation: Allocation) -> dict[int, tuple[float | None, float]]:
    """Per block: mean metric over its matrices (None if absent) and parameter-weighted mean target."""
    metric: dict[int, list[float]] = defaultdict(list)
    weighted: dict[int, float] = defaultdict(float)
    params: dict[int, int] = defaultdict(int)
    for m in allocation.matrices:
        if m.metric is not None:
            metric[m.block].append(m.metric)
        weighted[m.block] += m.params * m.target
        params[m.block] += m.params
    return {
        b: (sum(metric[b]) / len(metric[b]) if metric[b] else None, weighted[b] / params[b]) for b in sorted(params)
    }


def plot_allocation(allocation: Allocation, path: str | Path) -> Path:
    """Write the plot to ``path`` and return it."""
    profile = block_profile(allocation)
    blocks = list(profile)
    with_metric = [b for b in blocks if profile[b][0] is not None]
    if with_metric:
        fig, (ax_metric, ax_sparsity) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
        ax_metric.plot(with_metric, [profile[b][0] for b in with_metric], "o-", color="tab:blue")
        ax_metric.set_ylabel(allocation.metric_name or "metric")
        ax_metric.grid(alpha=0.3)
    else:  # nothing to show above the sparsities
        fig, ax_sparsity = plt.subplots(1, 1, figsize=(8, 3.5))

    ax_sparsity.plot(blocks, [profile[b][1] for b in blocks], "s-", color="tab:red", label="block (param-weighted)")
    distinct = {(m.block, m.target) for m in allocation.matrices}
    if len(distinct) > len(blocks):  # targets differ inside a block: show the matrices too
        ax_sparsity.scatter(
            [m.block for m in allocation.matrices], [m.target for m in allocation.matrices],
            s=8, color="tab:gray", alpha=0.6, label="matrix",
        )
    ax_sparsity.axhline(allocation.sparsity, color="black", ls="--", lw=1, label=f"target {allocation.sparsity:g}")
    ax_sparsity.set_xlabel("decoder block")
    ax_sparsity.set_ylabel("target sparsity")
    ax_sparsity.legend(fontsize=8)
    ax_sparsity.grid(alpha=0.3)

    extra = ", ".join(f"{k}={allocation.options[k]}" for k in ("epsilon", "lam", "M") if k in allocation.options)
    fig.suptitle(f"{allocation.method} allocation, target sparsity {allocation.sparsity:.0%}"
                 + (f" ({extra})" if extra else ""))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
