"""Redraw the comparison plots (perplexity and zero-shot average against sparsity) from a ``comparison.csv``
written by ``lmprune compare``, for when rows were appended after the run directories it read are gone.

    python bench/replot_comparison.py bench/results/zeroshot/comparison.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmprune.report.compare import common_tasks, read_csv
from lmprune.report.plots import plot_perplexity_vs_sparsity, plot_zeroshot_vs_sparsity


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", type=Path, help="directory of the PNGs (default: beside the CSV)")
    args = ap.parse_args(argv)
    runs = read_csv(args.csv)
    out = args.out or args.csv.parent
    print(plot_perplexity_vs_sparsity(runs, out / "perplexity_vs_sparsity.png"))
    print(plot_zeroshot_vs_sparsity(runs, common_tasks(runs), out / "zeroshot_vs_sparsity.png"))


if __name__ == "__main__":
    main()
