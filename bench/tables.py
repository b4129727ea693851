"""Markdown (and JSON-lines) tables of finished runs, read through the report's run reader
(``lmprune.report.runs``): the tables of ``bench/RESULTS.md``.

    python bench/tables.py bench/out/cpu70/*/                       # runs: perplexity, time split, peak RSS
    python bench/tables.py --sort --seed 0 bench/out/issue4/*/       # rows by blocks, setting, method; seed 0 only
    python bench/tables.py --view seeds --pair sparsegpt:sparsegpt+dsnot bench/out/issue4/*/
    python bench/tables.py --view device bench/out/h200/grid.jsonl   # the in-process grid's rows (GPU tables)
    python bench/tables.py --view allocation bench/out/allocation/*/  # uniform / OWL / alpha with pivots
    python bench/tables.py --jsonl rows.jsonl bench/out/issue4/*/    # also write the runs as JSON lines
    python bench/tables.py --replot bench/results/zeroshot/comparison.csv   # redraw a comparison's plots

Inputs are run directories (others, such as a ``compare/`` folder, are skipped) and JSON-lines files: the rows
``bench/grid.py --in-process`` appends, the rows ``--jsonl`` writes, and the raw rows of the earlier bench
scripts kept in ``bench/results/``.

Views: ``runs`` (default) one row per run with the pruning wall time split into solver and the rest;
``seeds`` the perplexity of every calibration seed of a (method, blocks, setting) cell with its max/min, and with
``--pair BASE:OTHER`` the change OTHER makes to BASE on each shared seed (the seed-spread / paired-difference
view); ``device`` the whole-model GPU table (mean layer error, peak GPU memory, device); ``allocation`` the
allocation grid with one WikiText-2 pivot per method.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from lmprune.report.runs import Run, is_finished, load_run, run_from_manifest

METHOD_ORDER = ("magnitude", "wanda", "wanda+dsnot", "sparsegpt", "sparsegpt+dsnot", "sparsellm(sparsegpt)",
                "sparsellm(alps-fast)", "sparsellm(alps)", "alps-fast", "alps")
RESUMED_NOTE = ("\\* resumed from a checkpoint by an lmprune that counted only the resuming process's time: the wall "
                "time shown is the sum of the per-block times over both processes (the few seconds of setup before "
                "block 0 are missing); its peak RSS is the resuming process's.")


# --- reading --------------------------------------------------------------------------------------------------

def _legacy(row: dict[str, Any]) -> dict[str, Any]:
    """A raw row of the earlier bench scripts in the manifest's spelling (what ``run_from_manifest`` reads)."""
    row = dict(row)
    if "ppl" in row:  # bench/allocation.py
        row.update(perplexity=row.pop("ppl"), achieved_sparsity=row.pop("achieved"),
                   allocation_time_s=row.pop("alloc_s"), allocation_options=row.pop("options") or {},
                   calib_seqlen=row.pop("seqlen"))
    if "wall_s" in row:  # bench/runs_table.py --jsonl
        row["calib_seqlen"] = row.pop("seqlen", None)
        if row.get("wall_from_block_times"):  # resumed by an older lmprune: the wall time is the per-block sum
            row.update(block_times_s=[row["wall_s"]], resumed_from_block=row.get("resumed_from_block") or 1)
            row.pop("time_this_process_s", None)
    return row


def _row_name(row: dict[str, Any], index: int) -> str:
    return str(row.get("name") or row.get("run") or row.get("key") or f"row {index}")


def read_jsonl(path: Path) -> list[Run]:
    runs = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            row = json.loads(line)
            runs.append(run_from_manifest(_legacy(row), path.parent / _row_name(row, i)))
    return runs


def read_inputs(paths: list[str]) -> list[Run]:
    """Runs of run directories and JSON-lines files, in the order given; other paths are skipped (on stderr)."""
    runs: list[Run] = []
    for text in paths:
        path = Path(text)
        if path.is_file() and path.name.endswith(".jsonl"):
            runs += read_jsonl(path)
        elif is_finished(path):
            runs.append(load_run(path))
        else:
            print(f"skipped {path}: not a finished run directory or a .jsonl file", file=sys.stderr)
    return runs


def record(run: Run) -> dict[str, Any]:
    """A run as one JSON line that reads back into the same table row (per-matrix records left out)."""
    keep = {k: v for k, v in run.manifest.items() if k not in ("layers", "resolved_options")}
    return {**keep, "name": run.name, "mean_rel_error": run.mean_rel_error}


# --- views ----------------------------------------------------------------------------------------------------

def _fmt1(value: float | None) -> str:
    return f"{value:.1f}" if isinstance(value, (int, float)) else "–"


def sort_key(run: Run) -> tuple:
    """Blocks, then unstructured sparsity before N:M, then the methods from the weakest baseline up."""
    label = run.method_label
    order = METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER)
    return run.blocks, run.is_nm, run.sparsity, order, label


def datasets_of(runs: list[Run]) -> list[str]:
    datasets: list[str] = []
    for r in runs:
        datasets += [d for d in r.perplexity if d not in datasets]
    return datasets


def runs_view(runs: list[Run]) -> list[str]:
    """One row per run: perplexity per dataset, pruning wall time, its solver part and the rest, peak RSS."""
    datasets = datasets_of(runs)
    with_blocks = any(r.blocks != "all" for r in runs)
    lines = ["| method | allocation |" + (" blocks |" if with_blocks else "") + " setting |"
             + "".join(f" {d} ppl |" for d in datasets) + " prune wall s | of which solver s | the rest s | peak RSS MiB |",
             "|" + "---|" * (7 + with_blocks + len(datasets))]
    for r in runs:
        lead = "".join(f" {r.perplexity[d]:.1f} |" if d in r.perplexity else " – |" for d in datasets)
        blocks = f" {r.blocks_label} |" if with_blocks else ""
        if r.is_dense:
            lines.append("| dense | – |" + blocks + " – |" + lead + " – | – | – | – |")
            continue
        wall, resumed = r.wall_time
        mark = "\\*" if resumed else ""
        rest = f"{wall - r.solver_time_s:.1f}{mark}" if wall is not None and r.solver_time_s is not None else "–"
        lines.append(f"| {r.method_label} | {r.allocation} |{blocks} {r.setting} |" + lead
                     + f" {_fmt1(wall)}{mark} | {_fmt1(r.solver_time_s)} | {rest} | {_fmt1(r.peak_rss_mb)} |")
    if any(r.wall_time[1] for r in runs if not r.is_dense):
        lines += ["", RESUMED_NOTE]
    return lines


Cells = dict[tuple[str, str, str], dict[int, dict[str, float]]]  # (method, blocks, setting) → seed → perplexities


def by_seed(runs: list[Run]) -> Cells:
    cells: Cells = defaultdict(dict)
    for r in runs:
        if r.is_dense:
            continue
        key = (r.method_label, r.blocks_label, r.setting)
        if r.seed in cells[key]:
            raise SystemExit(f"{r.path}: a second run of {key} with seed {r.seed}")
        cells[key][r.seed] = r.perplexity
    return cells


def spread_view(cells: Cells, datasets: list[str]) -> list[str]:
    """Every cell run under more than one seed: the perplexity of each seed and max/min per dataset."""
    lines = ["| method | blocks | setting | seeds |" + "".join(f" {d} by seed | max/min |" for d in datasets),
             "|" + "---|" * (4 + 2 * len(datasets))]
    for (label, blocks, setting), seeds_ppl in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if len(seeds_ppl) < 2:
            continue
        seeds = sorted(seeds_ppl)
        row = f"| {label} | {blocks} | {setting} | {', '.join(map(str, seeds))} |"
        for d in datasets:
            values = [seeds_ppl[s][d] for s in seeds if d in seeds_ppl[s]]
            row += f" {' / '.join(f'{v:.1f}' for v in values)} | {max(values) / min(values):.2f} |"
        lines.append(row)
    return lines


def paired_view(cells: Cells, datasets: list[str], pairs: list[tuple[str, str]]) -> list[str]:
    """Per pair and setting: the change OTHER makes to BASE on each shared seed, and in how many (seed, dataset)
    cases OTHER is lower."""
    lines = ["| base → other | blocks | setting | seeds |" + "".join(f" {d} change by seed |" for d in datasets)
             + " lower in |", "|" + "---|" * (5 + len(datasets))]
    for base, other in pairs:
        for (label, blocks, setting), base_runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if label != base or (other, blocks, setting) not in cells:
                continue
            other_runs = cells[(other, blocks, setting)]
            seeds = sorted(set(base_runs) & set(other_runs))
            if not seeds:
                continue
            row, lower, total = f"| {base} → {other} | {blocks} | {setting} | {', '.join(map(str, seeds))} |", 0, 0
            for d in datasets:
                changes = [other_runs[s][d] / base_runs[s][d] - 1 for s in seeds
                           if d in base_runs[s] and d in other_runs[s]]
                lower += sum(c < 0 for c in changes)
                total += len(changes)
                row += f" {' / '.join(f'{c:+.0%}' for c in changes)} |"
            lines.append(row + f" {lower}/{total} |")
    return lines


def _device_order(run: Run) -> tuple:
    """Dense first, then by blocks, allocation (uniform first), setting (sparsity, then N:M) and method."""
    methods = ["magnitude", "wanda", "sparsegpt", "alps-fast", "alps", "sparsellm"]
    setting = (1, 0.0) if run.is_nm else (0, -1.0 if run.is_dense else run.sparsity)
    base = run.base_method
    return (not run.is_dense, run.blocks, "" if run.allocation == "uniform" else run.allocation, setting,
            methods.index(base) if base in methods else len(methods), run.method_label)


def device_view(runs: list[Run]) -> list[str]:
    """The whole-model table of the in-process (GPU) grid: perplexity, mean layer error, times, peak GPU memory."""
    runs = sorted(runs, key=_device_order)
    datasets = next((list(r.perplexity) for r in runs if r.perplexity), [])
    head = ("| method | allocation | blocks | setting | " + " | ".join(datasets)
            + " | mean layer rel. error | prune s | of which solver s | peak GPU MiB | device |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        lead = f"| {r.method_label} | {r.allocation} | {r.blocks} | {r.setting} | "
        if r.manifest.get("error"):
            lines.append(lead + f"failed: {r.manifest['error'][:80]} |")
            continue
        ppl = " | ".join(f"{r.perplexity[d]:.2f}" for d in datasets)
        err = f"{r.mean_rel_error:.4f}" if r.mean_rel_error is not None else "–"
        mem = f"{r.peak_cuda_mb:.0f}" if r.peak_cuda_mb else "–"
        device = r.device or ("cuda" if r.peak_cuda_mb else "cpu")
        lines.append(lead + f"{ppl} | {err} | {_fmt1(r.time_s)} | {_fmt1(r.solver_time_s)} | {mem} | {device} |")
    return lines


ALLOCATIONS = ("uniform", "owl", "alpha")
ALLOC_DATASETS = ("wikitext2", "ptb", "c4")


def _fmt_ppl(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"


def _allocation_order(run: Run) -> tuple:
    alloc = ALLOCATIONS.index(run.allocation) if run.allocation in ALLOCATIONS else len(ALLOCATIONS)
    return alloc, run.allocation, run.allocation_options.get("epsilon") or 0.0


def allocation_view(runs: list[Run]) -> list[str]:
    """Every run with WikiText-2/PTB/C4 perplexity, achieved sparsity, the allocation's own time and the pruning
    time; then one WikiText-2 pivot per method (rows: sparsity, columns: allocation)."""
    methods = list(dict.fromkeys(r.method_label for r in runs))
    runs = sorted(runs, key=lambda r: (methods.index(r.method_label), r.sparsity, _allocation_order(r)))
    lines = ["| method | sparsity | allocation | " + " | ".join(ALLOC_DATASETS) + " | achieved | alloc s | prune s |",
             "|---|---|---|" + "---|" * (len(ALLOC_DATASETS) + 3)]
    for r in runs:
        lines.append(f"| {r.method_label} | {r.sparsity:.0%} | {r.allocation_label} | "
                     + " | ".join(_fmt_ppl(r.perplexity.get(d)) for d in ALLOC_DATASETS)
                     + f" | {_fmt_ppl(r.achieved_sparsity, 4)} | {_fmt_ppl(r.allocation_time_s, 1)} | "
                     f"{_fmt_ppl(r.time_s, 0)} |")
    if not runs:
        return ["no finished runs"]
    settings = lambda attr: ", ".join(map(str, sorted({getattr(r, attr) for r in runs}, key=str)))  # noqa: E731
    lines.append(f"\nPerplexity over the first {settings('eval_windows')} windows of {settings('seqlen')} tokens; "
                 f"calibration {settings('nsamples')} × {settings('calib_seqlen')}; seed {settings('seed')}.")
    columns = list(dict.fromkeys(r.allocation_label for r in sorted(runs, key=_allocation_order)))
    for method in methods:
        lines += [f"\n**{method}**, WikiText-2 perplexity\n", "| sparsity | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for s in sorted({r.sparsity for r in runs}):
            row = {r.allocation_label: r for r in runs if r.method_label == method and r.sparsity == s}
            lines.append(f"| {s:.0%} | " + " | ".join(
                _fmt_ppl(row[c].perplexity.get("wikitext2")) if c in row else "–" for c in columns) + " |")
    return lines


# --- command line ---------------------------------------------------------------------------------------------

def replot(csv_path: Path, out: Path | None) -> None:
    """Redraw a comparison's plots from its ``comparison.csv`` (when rows were added after the run directories it
    was made from are gone)."""
    from lmprune.report.compare import read_csv
    from lmprune.report.plots import plot_perplexity_vs_sparsity, plot_zeroshot_vs_sparsity
    from lmprune.report.runs import common_tasks

    runs = read_csv(csv_path)
    out = out or csv_path.parent
    print(plot_perplexity_vs_sparsity(runs, out / "perplexity_vs_sparsity.png"))
    print(plot_zeroshot_vs_sparsity(runs, common_tasks(runs), out / "zeroshot_vs_sparsity.png"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="run directories and .jsonl files")
    p.add_argument("--view", choices=("runs", "seeds", "device", "allocation"), default="runs")
    p.add_argument("--sort", action="store_true", help="runs view: rows by blocks, setting, method")
    p.add_argument("--seed", type=int, action="append", help="only runs of this calibration seed (repeatable)")
    p.add_argument("--pair", action="append", default=[], metavar="BASE:OTHER",
                   help="seeds view: the change OTHER makes to BASE on each shared seed (repeatable)")
    p.add_argument("--jsonl", type=Path, help="also write the runs, one JSON line each, to this file")
    p.add_argument("--replot", type=Path, metavar="CSV", help="redraw the plots of a comparison.csv and exit")
    p.add_argument("--out", type=Path, help="--replot: directory of the PNGs (default: beside the CSV)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        replot(args.replot, args.out)
        return 0
    runs = read_inputs(args.inputs)
    if args.seed is not None:
        runs = [r for r in runs if r.seed in args.seed]
    if args.sort:
        runs = sorted(runs, key=sort_key)
    if args.jsonl:
        args.jsonl.write_text("".join(json.dumps(record(r)) + "\n" for r in runs))
    if args.view == "runs":
        lines = runs_view(runs)
    elif args.view == "seeds":
        cells, datasets = by_seed(runs), datasets_of(runs)
        pairs = [tuple(p.split(":", 1)) for p in args.pair]
        lines = spread_view(cells, datasets) + (["", *paired_view(cells, datasets, pairs)] if pairs else [])
    elif args.view == "device":
        lines = device_view(runs)
    else:
        lines = allocation_view(runs)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
