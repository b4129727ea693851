"""Redraw the comparison plots (perplexity and zero-shot average against sparsity) from a ``comparison.csv``
written by ``lmprune compare``, for when rows were appended after the run directories it read are gone.

    python bench/replot_comparison.py bench/results/zeroshot/comparison.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from lmprune.report.compare import Run, common_tasks
from lmprune.report.plots import plot_perplexity_vs_sparsity, plot_zeroshot_vs_sparsity


def _float(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def runs_from_csv(path: Path) -> list[Run]:
    runs = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            ppl = {k[4:]: v for k, x in row.items() if k.startswith("ppl_") and (v := _float(x)) is not None}
            zeroshot: dict[str, dict[str, float]] = {}
            for key, text in row.items():
                if key.endswith("_acc_norm"):
                    task, metric = key[: -len("_acc_norm")], "acc_norm"
                elif key.endswith("_acc") and key != "zeroshot_avg_acc":
                    task, metric = key[: -len("_acc")], "acc"
                else:
                    continue
                if (v := _float(text)) is not None:
                    zeroshot.setdefault(task, {})[metric] = v
            runs.append(Run(
                label=row["run"], path=Path(row.get("path") or row["run"]), method=row["method"],
                allocation=row["allocation"], pattern=row["pattern"], sparsity=_float(row["sparsity"]) or 0.0,
                achieved_sparsity=_float(row["achieved_sparsity"]), perplexity=ppl,
                eval_windows=row.get("eval_windows"), seqlen=row.get("seqlen"), zeroshot=zeroshot,
                zeroshot_limit=row.get("zeroshot_limit"), time_s=_float(row.get("time_s")),
                peak_rss_mb=_float(row.get("peak_rss_mb")),
            ))
    return runs


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", type=Path, help="directory of the PNGs (default: beside the CSV)")
    args = ap.parse_args(argv)
    runs = runs_from_csv(args.csv)
    out = args.out or args.csv.parent
    print(plot_perplexity_vs_sparsity(runs, out / "perplexity_vs_sparsity.png"))
    print(plot_zeroshot_vs_sparsity(runs, common_tasks(runs), out / "zeroshot_vs_sparsity.png"))


if __name__ == "__main__":
    main()
