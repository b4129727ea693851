"""One table (Markdown and CSV) and plots comparing pruning runs, read from their ``lmprune.json`` manifests.

A row per run: method, allocation, pattern, target and achieved sparsity, perplexity per dataset, zero-shot
accuracy per task and its average, pruning time and peak memory. The dense model comes first: the run passed
as ``dense``, or any run whose method is "dense" or whose target sparsity is 0; failing both, a row made from the
``dense_perplexity`` that ``lmprune prune --eval-dense`` records in a run's manifest (perplexity only, see
:func:`dense_from_manifests`).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "lmprune.json"
ZEROSHOT_SIDECAR = "zeroshot.json"  # `lmprune eval --out RUN/zeroshot.json`, used when the manifest has none
_PPL_META = {"eval_windows", "seqlen", "tokens", "tokens_evaluated", "windows", "windows_available"}
_ZS_METRICS = ("acc", "acc_norm", "perplexity")


@dataclass
class Run:
    """The fields of one manifest that a comparison shows (``method`` carries a refiner as "wanda+dsnot")."""

    label: str
    path: Path
    method: str
    allocation: str
    pattern: str
    sparsity: float
    achieved_sparsity: float | None
    perplexity: dict[str, float]
    eval_windows: Any
    seqlen: Any
    zeroshot: dict[str, dict[str, float]]
    zeroshot_limit: Any
    time_s: float | None
    peak_rss_mb: float | None
    layers: list[dict] = field(default_factory=list)
    dense_perplexity: dict[str, float] = field(default_factory=dict)  # --eval-dense figures, same windows/seqlen
    model: str | None = None  # the pruned model's sha256 (or spec) and dtype: which dense model those figures are of

    @property
    def is_dense(self) -> bool:
        return self.method == "dense" or self.sparsity == 0

    @property
    def series(self) -> str:
        """The curve a run belongs to in plots: its method, qualified by a non-default allocation or pattern."""
        extras = [x for x in (self.allocation, self.pattern) if x not in ("uniform", "unstructured", "", "-")]
        return f"{self.method} ({', '.join(extras)})" if extras else self.method


def _name(value: Any, default: str = "-") -> str:
    """A short label for a manifest field that may be a string, a number, None or a dict with a name."""
    if value is None:
        return default
    if isinstance(value, dict):
        for key in ("name", "method", "kind", "type"):
            if key in value:
                return str(value[key])
        return json.dumps(value, sort_keys=True)
    return str(value)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _sidecar_zeroshot(path: Path) -> dict:
    """Zero-shot scores from an evaluation file: its ``zeroshot`` entry, or the file itself (a plain
    ``evaluate_tasks`` result)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("zeroshot") or data


def load_run(path: Path) -> Run:
    """Read a run directory (or its ``lmprune.json``); a one-line ``ValueError`` when the manifest is missing."""
    path = Path(path)
    manifest = path if path.is_file() else path / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{path}: no {MANIFEST} (not a run directory)")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest}: not valid JSON ({err})") from None
    ppl_block = data.get("perplexity") or {}
    perplexity = {k: float(v) for k, v in ppl_block.items() if k not in _PPL_META and _number(v) is not None}
    zs_block = data.get("zeroshot") or _sidecar_zeroshot(manifest.parent / ZEROSHOT_SIDECAR)
    per_task = zs_block.get("tasks") if isinstance(zs_block.get("tasks"), dict) else zs_block  # nested form too
    zeroshot = {
        task: {m: float(s[m]) for m in _ZS_METRICS if _number(s.get(m)) is not None}
        for task, s in per_task.items()
        if isinstance(s, dict) and any(_number(s.get(m)) is not None for m in _ZS_METRICS)
    }
    sparsity = _number(data.get("sparsity"))
    refine = data.get("refine") or (data.get("config") or {}).get("refine")
    method = _name(data.get("method"))
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    model_id = model.get("sha256") or model.get("spec")
    return Run(
        label=manifest.parent.name,
        path=manifest.parent,
        method=method if refine in (None, "none") else f"{method}+{_name(refine)}",
        allocation=_name(data.get("allocation"), "uniform"),
        pattern=_name(data.get("pattern"), "unstructured"),
        sparsity=sparsity if sparsity is not None else 0.0,
        achieved_sparsity=_number(data.get("achieved_sparsity")),
        perplexity=perplexity,
        eval_windows=ppl_block.get("eval_windows", data.get("eval_windows")),
        seqlen=ppl_block.get("seqlen", data.get("seqlen")),
        zeroshot=zeroshot,
        zeroshot_limit=zs_block.get("limit"),
        time_s=_number(data.get("time_s")),
        peak_rss_mb=_number(data.get("peak_rss_mb")),
        layers=list(data.get("layers") or []),
        dense_perplexity={k: float(v) for k, v in (data.get("dense_perplexity") or {}).items()
                          if k not in _PPL_META and _number(v) is not None},
        model=f"{model_id} {model.get('dtype', '')}".strip() if model_id else None,
    )


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
    for r in sorted(runs, key=lambda r: r.label):
        if r.dense_perplexity:
            groups.setdefault((r.model, r.eval_windows, r.seqlen), []).append(r)
    if not groups:
        return None, None
    matching = {key: sum((r.model, r.eval_windows, r.seqlen) == key for r in runs if r.perplexity) for key in groups}
    best = max(matching.values())
    chosen = [key for key, n in matching.items() if n == best]
    describe = lambda key: f"{_settings(groups[key][0])} (runs {', '.join(r.label for r in groups[key])})"  # noqa: E731
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
    dense = Run(label="dense (--eval-dense)", path=sources[0].path, method="dense", allocation="-", pattern="-",
                sparsity=0.0, achieved_sparsity=None, perplexity=perplexity, eval_windows=key[1], seqlen=key[2],
                zeroshot={}, zeroshot_limit=None, time_s=None, peak_rss_mb=None)
    note = (f"Dense row: perplexity only, measured before pruning by `lmprune prune --eval-dense` in run(s) "
            f"{', '.join(r.label for r in sources)} ({_settings(sources[0])}).")
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
    key = lambda r: (not r.is_dense, r.method, r.allocation, r.pattern, r.sparsity, r.label)  # noqa: E731
    return ([dense] if dense is not None else []) + sorted(rest, key=key)


def common_tasks(runs: list[Run]) -> list[str]:
    """Tasks with an accuracy in every run that has zero-shot results (the average is taken over these)."""
    scored = [r for r in runs if r.zeroshot]
    if not scored:
        return []
    first = [t for t in scored[0].zeroshot if "acc" in scored[0].zeroshot[t]]
    return [t for t in first if all("acc" in r.zeroshot.get(t, {}) for r in scored)]


def zeroshot_average(run: Run, tasks: list[str]) -> float | None:
    """Mean ``acc`` over ``tasks`` (None when the run has no zero-shot results)."""
    if not tasks or not run.zeroshot:
        return None
    return sum(run.zeroshot[t]["acc"] for t in tasks) / len(tasks)


def _columns(runs: list[Run]) -> tuple[list[str], list[str], dict[str, list[str]]]:
    datasets = sorted({d for r in runs for d in r.perplexity})
    tasks = list(dict.fromkeys(t for r in runs for t in r.zeroshot))
    metrics = {t: [m for m in _ZS_METRICS if any(m in r.zeroshot.get(t, {}) for r in runs)] for t in tasks}
    return datasets, tasks, metrics


def table_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One flat record per run (the CSV rows): raw numbers, blanks where a run lacks a value."""
    datasets, tasks, metrics = _columns(runs)
    avg_tasks = common_tasks(runs)
    rows = []
    for r in runs:
        row: dict[str, Any] = {
            "run": r.label, "method": r.method, "allocation": r.allocation, "pattern": r.pattern,
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
    for metric in sorted(_ZS_METRICS, key=len, reverse=True):  # "acc_norm" before "acc"
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
                label=row["run"], path=Path(row.get("path") or row["run"]), method=row["method"],
                allocation=row["allocation"], pattern=row["pattern"], sparsity=_number_text(row["sparsity"]) or 0.0,
                achieved_sparsity=_number_text(row["achieved_sparsity"]),
                perplexity={k[4:]: v for k, x in row.items()
                            if k.startswith("ppl_") and (v := _number_text(x)) is not None},
                eval_windows=_int_text(row.get("eval_windows")), seqlen=_int_text(row.get("seqlen")),
                zeroshot=zeroshot, zeroshot_limit=_int_text(row.get("zeroshot_limit")), time_s=_number_text(row.get("time_s")),
                peak_rss_mb=_number_text(row.get("peak_rss_mb")),
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
    header = ["run", "method", "allocation", "pattern", "sparsity %", "achieved %"]
    header += [f"{d} ppl" for d in datasets]
    header += [f"{t} {'/'.join('ppl' if m == 'perplexity' else m for m in metrics[t])}" for t in tasks]
    header += ["zero-shot avg acc"] if avg_tasks else []
    header += ["time s", "peak RSS MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 4 + ["--:"] * (len(header) - 4)) + "|"]
    for r in runs:
        cells = [r.label, r.method, r.allocation, r.pattern, _fmt(r.sparsity, "pct"), _fmt(r.achieved_sparsity, "pct")]
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
        from .plots import comparison_plots

        images = comparison_plots(runs, out_dir)
        if images:
            lines += ["", "## Plots", ""]
            lines += [f"![{title}]({path.name})" for title, path in images]
    md = out_dir / "comparison.md"
    md.write_text("\n".join(lines) + "\n")
    return md
