"""PNG plots of pruning runs (matplotlib, Agg backend: no display needed).

- perplexity against target sparsity, one curve per method (log scale), one panel per dataset;
- mean zero-shot accuracy against target sparsity, one curve per method;
- per block of one run: achieved sparsity, and the reconstruction error of each matrix kind (log scale).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .runs import Run, common_tasks, load_run, zeroshot_average  # noqa: E402

_BLOCK = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _series(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        if not r.is_dense:
            groups[r.series].append(r)
    return {k: sorted(v, key=lambda r: r.sparsity) for k, v in sorted(groups.items())}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_perplexity_vs_sparsity(runs: list[Run], path: Path) -> Path | None:
    """One panel per dataset: perplexity (log) against target sparsity per method; dense as a dashed line."""
    datasets = sorted({d for r in runs for d in r.perplexity})
    if not datasets:
        return None
    dense = [r for r in runs if r.is_dense]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.6 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        start = [(0.0, r.perplexity[dataset]) for r in dense[:1] if dataset in r.perplexity]
        for name, members in _series(runs).items():
            points = [(100 * r.sparsity, r.perplexity[dataset]) for r in members if dataset in r.perplexity]
            if points:
                points = start + points
                ax.plot(*zip(*points), marker="o", label=name)
        for r in dense:
            if dataset in r.perplexity:
                ax.axhline(r.perplexity[dataset], color="k", ls="--", lw=1, label=f"dense ({r.name})")
        ax.set_yscale("log")
        ax.set_xlabel("target sparsity (%)")
        ax.set_ylabel(f"{dataset} perplexity")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_zeroshot_vs_sparsity(runs: list[Run], tasks: list[str], path: Path) -> Path | None:
    """Mean zero-shot acc over ``tasks`` against target sparsity per method; dense as a dashed line."""
    if not tasks:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    dense = [(0.0, 100 * a) for r in runs if r.is_dense and (a := zeroshot_average(r, tasks)) is not None]
    for name, members in _series(runs).items():
        points = [(100 * r.sparsity, 100 * a) for r in members if (a := zeroshot_average(r, tasks)) is not None]
        if points:
            points = dense[:1] + points
            ax.plot(*zip(*points), marker="o", label=name)
    for r in runs:
        if r.is_dense and (a := zeroshot_average(r, tasks)) is not None:
            ax.axhline(100 * a, color="k", ls="--", lw=1, label=f"dense ({r.name})")
    ax.set_xlabel("target sparsity (%)")
    ax.set_ylabel(f"mean zero-shot acc (%), {len(tasks)} tasks")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def block_stats(layers: list[dict]) -> tuple[list[int], list[float], dict[str, dict[int, float]]]:
    """Per block: sparsity weighted by matrix size, and the rel_error of each matrix kind (last name part).

    ``layers`` are the manifest's entries (``name``, ``shape``, ``sparsity``, ``rel_error``); entries whose
    name holds no block number are left out.
    """
    zeros: dict[int, float] = defaultdict(float)
    sizes: dict[int, float] = defaultdict(float)
    errors: dict[str, dict[int, float]] = defaultdict(dict)
    for layer in layers:
        match = _BLOCK.search(str(layer.get("name", "")))
        if match is None or layer.get("sparsity") is None:
            continue
        block = int(match.group(1))
        shape = layer.get("shape") or []
        size = float(shape[0] * shape[1]) if len(shape) == 2 else 1.0
        zeros[block] += float(layer["sparsity"]) * size
        sizes[block] += size
        if layer.get("rel_error") is not None:
            errors[str(layer["name"]).rsplit(".", 1)[-1]][block] = float(layer["rel_error"])
    blocks = sorted(sizes)
    return blocks, [zeros[b] / sizes[b] for b in blocks], dict(errors)


def plot_layers(run: Run, path: Path, title: str | None = None) -> Path | None:
    """Achieved sparsity per block (bars, target as a line) and reconstruction error per matrix kind (log).
    ``title`` names the run in the title (default: its directory name)."""
    blocks, sparsity, errors = block_stats(run.layers)
    if not blocks:
        return None
    rows = 2 if errors else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 2.8 * rows), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.bar(blocks, [100 * s for s in sparsity], color="tab:blue", alpha=0.8)
    ax.axhline(100 * run.sparsity, color="k", ls="--", lw=1, label="target")
    ax.set_ylabel("achieved sparsity (%)")
    ax.set_title(f"{title or run.name}: {run.series} at {100 * run.sparsity:.0f}%")
    ax.legend(fontsize=7)
    if errors:
        ax = axes[1][0]
        for kind, per_block in sorted(errors.items()):
            xs = sorted(per_block)
            ax.plot(xs, [max(per_block[b], 1e-12) for b in xs], marker=".", label=kind)
        ax.set_yscale("log")
        ax.set_ylabel("rel. reconstruction error")
        ax.legend(fontsize=7, ncol=4)
    axes[-1][0].set_xlabel("block")
    axes[-1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def comparison_plots(runs: list[Run], out_dir: Path) -> list[tuple[str, Path]]:
    """All plots of a comparison into ``out_dir``: ``(title, path)`` for each written PNG."""
    out_dir = Path(out_dir)
    written = []
    ppl = plot_perplexity_vs_sparsity(runs, out_dir / "perplexity_vs_sparsity.png")
    if ppl:
        written.append(("perplexity vs sparsity", ppl))
    zs = plot_zeroshot_vs_sparsity(runs, common_tasks(runs), out_dir / "zeroshot_vs_sparsity.png")
    if zs:
        written.append(("zero-shot average vs sparsity", zs))
    for r in runs:
        if r.is_dense:
            continue
        png = plot_layers(r, out_dir / f"layers_{re.sub(r'[^A-Za-z0-9_.-]+', '_', r.name)}.png")
        if png:
            written.append((f"per-block sparsity and error: {r.name}", png))
    return written


def plot_run(run_dir: Path, out: Path | None = None, *, title: str | None = None) -> Path | None:
    """The per-block plot of one run directory, written to ``out`` (default ``RUN_DIR/layers.png``).

    ``title`` names the run in the plot's title instead of the directory's name (a run plotted while it is
    still staged in ``.NAME.partial`` passes its final name)."""
    run_dir = Path(run_dir)
    return plot_layers(load_run(run_dir), Path(out) if out else run_dir / "layers.png", title)
