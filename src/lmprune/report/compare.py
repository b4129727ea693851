"""One table (Markdown and CSV) and plots comparing pruning runs, read from their ``lmprune.json`` manifests.

A row per run: method, allocation, pattern, target and achieved sparsity, perplexity per dataset, zero-shot
accuracy per task and its average, pruning time and peak memory. The dense model comes first: the run passed
as ``dense``, or any run whose method is "dense" or whose target sparsity is 0; failing both, a row made from the
``dense_perplexity`` that ``lmprune prune --eval-dense`` records in a run's manifest (perplexity only, see
:func:`dense_from_manifests`).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from .runs import MANIFEST, ZEROSHOT_SIDECAR, ZS_METRICS, Run, common_tasks, load_run, zeroshot_average

__all__ = ["MANIFEST", "ZEROSHOT_SIDECAR", "Run", "common_tasks", "compare_runs", "dense_from_manifests",
           "load_run", "markdown_table", "order_runs", "read_csv", "table_rows", "write_csv", "zeroshot_average"]


def _settings(r: Run) -> str:
    return f"{r.eval_windows} windows × {r.seqlen} tokens"


def dense_from_manifests(runs: list[Run]) -> tuple[Run | None, str | None]:
    """A perplexity-only dense row from the runs' ``dense_perplexity`` (``prune --eval-dense``), and a note.

    Those figures were taken with the run's own evaluation settings (windows cap, seqlen) on the model it
    pruned (sha256 and dtype). Runs agreeing on all of these share one dense row. When they fall into several
    groups, the group whose settings match the most runs of the table is used and the others are named in the
    note; on a tie there is no dense row, and the note says why. ``(None, None)`` when no run carries any.
    """
    groups: dict[tuple, list[Run]] = {}
    for r in sorted(runs, key=lambda r: r.name):
        if r.dense_perplexity:
            groups.setdefault((r.model, r.eval_windows, r.seqlen), []).append(r)
    if not groups:
        return None, None
    matching = {key: sum((r.model, r.eval_windows, r.seqlen) == key for r in runs if r.perplexity) for key in groups}
    best = max(matching.values())
    chosen = [key for key, n in matching.items() if n == best]
    describe = lambda key: f"{_settings(groups[key][0])} (runs {', '.join(r.name for r in groups[key])})"  # noqa: E731
    if len(chosen) > 1:
        return None, ("No dense row: the runs' `--eval-dense` perplexities were taken with different settings or "
                      "models, none matching more runs than the others: " + "; ".join(map(describe, groups))
                      + ". Pass a dense run directory to compare against.")
    key = chosen[0]
    sources = groups[key]
    perplexity: dict[str, float] = {}
    for r in sources:
        for ds, v in r.dense_perplexity.items():
            perplexity.setdefault(ds, v)
    dense = Run(name="dense (--eval-dense)", path=sources[0].path, method="dense", allocation="-", pattern="-",
                sparsity=0.0, achieved_sparsity=None, perplexity=perplexity, eval_windows=key[1], seqlen=key[2],
                zeroshot={}, zeroshot_limit=None, time_s=None, peak_rss_mb=None)
    note = (f"Dense row: perplexity only, measured before pruning by `lmprune prune --eval-dense` in run(s) "
            f"{', '.join(r.name for r in sources)} ({_settings(sources[0])}).")
    spread = [ds for ds in perplexity
              if len({round(r.dense_perplexity[ds], 6) for r in sources if ds in r.dense_perplexity}) > 1]
    if spread:
        note += f" Their figures differ slightly for {', '.join(spread)}; the first run's are shown."
    others = [k for k in groups if k != key]
    if others:
        note += (" Not used, as they were taken with other settings or on another model: "
                 + "; ".join(map(describe, others)) + ".")
    return dense, note


def order_runs(runs: list[Run], dense: Run | None = None) -> list[Run]:
    """Dense first, then by method, allocation, pattern and sparsity."""
    rest = [r for r in runs if r is not dense]
    key = lambda r: (not r.is_dense, r.method, r.allocation, r.pattern, r.sparsity, r.name)  # noqa: E731
    return ([dense] if dense is not None else []) + sorted(rest, key=key)


def _columns(runs: list[Run]) -> tuple[list[str], list[str], dict[str, list[str]]]:
    datasets = sorted({d for r in runs for d in r.perplexity})
    tasks = list(dict.fromkeys(t for r in runs for t in r.zeroshot))
    metrics = {t: [m for m in ZS_METRICS if any(m in r.zeroshot.get(t, {}) for r in runs)] for t in tasks}
    return datasets, tasks, metrics


def _configuration(r: Run) -> str:
    """What the run computed, named as ``lmprune.json``'s ``configuration`` names it (``sparsellm(sparsegpt, +down
    refit, +best round)``, ``wanda + alpha(peak_reference)``); the method alone for a dense row."""
    return r.method if r.is_dense else r.label


def table_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One flat record per run (the CSV rows): raw numbers, blanks where a run lacks a value."""
    datasets, tasks, metrics = _columns(runs)
    avg_tasks = common_tasks(runs)
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run": r.name, "configuration": _configuration(r), "method": r.method, "allocation": r.allocation,
            "pattern": r.pattern,
            "sparsity": r.sparsity, "achieved_sparsity": r.achieved_sparsity,
        }
        row.update({f"ppl_{d}": r.perplexity.get(d) for d in datasets})
        for t in tasks:
            row.update({f"{t}_{m}": r.zeroshot.get(t, {}).get(m) for m in metrics[t]})
        row["zeroshot_avg_acc"] = zeroshot_average(r, avg_tasks)
        row.update({"time_s": r.time_s, "peak_rss_mb": r.peak_rss_mb, "eval_windows": r.eval_windows,
                    "seqlen": r.seqlen, "zeroshot_limit": r.zeroshot_limit, "path": str(r.path)})
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return path


def _zeroshot_column(key: str) -> tuple[str, str] | None:
    """(task, metric) for a CSV column written by :func:`table_rows` from a zero-shot score, else None."""
    if key.startswith("ppl_") or key == "zeroshot_avg_acc":
        return None
    for metric in sorted(ZS_METRICS, key=len, reverse=True):  # "acc_norm" before "acc"
        if key.endswith(f"_{metric}"):
            return key[: -len(metric) - 1], metric
    return None


def read_csv(path: Path) -> list[Run]:
    """The runs of a ``comparison.csv`` written by :func:`write_csv` (per-layer records are not in the CSV), so a
    comparison can be redrawn or extended after the run directories it was made from are gone."""
    runs = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            zeroshot: dict[str, dict[str, float]] = {}
            for key, text in row.items():
                if (col := _zeroshot_column(key)) and (v := _number_text(text)) is not None:
                    zeroshot.setdefault(col[0], {})[col[1]] = v
            runs.append(Run(
                name=row["run"], path=Path(row.get("path") or row["run"]), method=row["method"],
                allocation=row["allocation"], pattern=row["pattern"], sparsity=_number_text(row["sparsity"]) or 0.0,
                achieved_sparsity=_number_text(row["achieved_sparsity"]),
                perplexity={k[4:]: v for k, x in row.items()
                            if k.startswith("ppl_") and (v := _number_text(x)) is not None},
                eval_windows=_int_text(row.get("eval_windows")), seqlen=_int_text(row.get("seqlen")),
                zeroshot=zeroshot, zeroshot_limit=_int_text(row.get("zeroshot_limit")), time_s=_number_text(row.get("time_s")),
                peak_rss_mb=_number_text(row.get("peak_rss_mb")), refiner=row["method"].partition("+")[2] or "none",
            ))
    return runs


def _int_text(text: str | None) -> int | str | None:
    """A count column back as the int it was written from; other text (e.g. "mixed") as it is."""
    return int(text) if text and text.isdigit() else (text or None)


def _number_text(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _fmt(value: float | None, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "ppl":
        return f"{value:.2f}" if value < 1e4 else f"{value:.3g}"
    if kind == "int":
        return f"{value:.0f}"
    return f"{value:.1f}"


def markdown_table(runs: list[Run]) -> str:
    """The comparison as a Markdown table (accuracies and sparsities in %)."""
    datasets, tasks, metrics = _columns(runs)
    avg_tasks = common_tasks(runs)
    header = ["run", "configuration", "allocation", "pattern", "sparsity %", "achieved %"]
    header += [f"{d} ppl" for d in datasets]
    header += [f"{t} {'/'.join('ppl' if m == 'perplexity' else m for m in metrics[t])}" for t in tasks]
    header += ["zero-shot avg acc"] if avg_tasks else []
    header += ["time s", "peak RSS MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["--:"] * (len(header) - 4)) + "|"]
    for r in runs:
        cells = [r.name, _configuration(r), r.allocation, r.pattern, _fmt(r.sparsity, "pct"),
                 _fmt(r.achieved_sparsity, "pct")]
        cells += [_fmt(r.perplexity.get(d), "ppl") for d in datasets]
        for t in tasks:
            scores = r.zeroshot.get(t, {})
            cells.append(" / ".join(_fmt(scores.get(m), "ppl" if m == "perplexity" else "pct") for m in metrics[t]))
        cells += [_fmt(zeroshot_average(r, avg_tasks), "pct")] if avg_tasks else []
        cells += [_fmt(r.time_s, "s"), _fmt(r.peak_rss_mb, "int")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _notes(runs: list[Run]) -> list[str]:
    notes = []
    windows = sorted({f"{r.eval_windows} windows × {r.seqlen} tokens" for r in runs if r.perplexity})
    if windows:
        notes.append("Perplexity evaluated on " + "; ".join(windows) + " per dataset.")
    limits = sorted({"all" if r.zeroshot_limit is None else f"the first {r.zeroshot_limit}"
                     for r in runs if r.zeroshot})
    if limits:
        notes.append(f"Zero-shot: 0-shot, lm-evaluation-harness prompts, {' / '.join(limits)} documents per task; "
                     "cells are acc / acc_norm in % (LAMBADA: acc / perplexity).")
    avg = common_tasks(runs)
    if avg:
        notes.append(f"Zero-shot average: mean acc over {', '.join(avg)}.")
    return notes


def compare_runs(run_dirs: list[Path], out_dir: Path, dense: Path | None = None, plots: bool = True) -> Path:
    """Write ``comparison.md``, ``comparison.csv`` and the PNG plots into ``out_dir``; return the Markdown path."""
    if not run_dirs and dense is None:
        raise ValueError("compare needs at least one run directory")
    out_dir = Path(out_dir)
    dense_run = load_run(dense) if dense is not None else None
    runs = [load_run(p) for p in run_dirs if dense is None or Path(p).resolve() != Path(dense).resolve()]
    out_dir.mkdir(parents=True, exist_ok=True)  # only once every input was read: a failed compare writes nothing
    dense_note = None
    if dense_run is None and not any(r.is_dense for r in runs):
        dense_run, dense_note = dense_from_manifests(runs)
    runs = order_runs(runs + ([dense_run] if dense_run else []), dense_run)

    write_csv(table_rows(runs), out_dir / "comparison.csv")
    lines = ["# Comparison of pruning runs", "", markdown_table(runs), ""]
    lines += [f"- {n}" for n in _notes(runs) + ([dense_note] if dense_note else [])]
    lines += ["- Raw numbers: [comparison.csv](comparison.csv)."]
    if plots:
        from .plots import comparison_plots  # matplotlib only when plots are asked for

        images = comparison_plots(runs, out_dir)
        if images:
            lines += ["", "## Plots", ""]
            lines += [f"![{title}]({path.name})" for title, path in images]
    md = out_dir / "comparison.md"
    md.write_text("\n".join(lines) + "\n")
    return md
