"""Two sets of run directories of one configuration, paired by calibration seed: each seed's perplexities, the
change B makes to A, and over the seeds its mean, how many seeds it raises, and the paired t statistic.

    python bench/paired_runs.py --a /work/f64/alps-old '/work/f64/alps-old-s*' --b /work/f64/alps-new \
        '/work/f64/alps-new-s*' --labels "float32 sums,float64 sums"

Use it where two code versions (or settings) run the same seeds and one run per seed is a draw (ALPS at 50%: its
support search turns last-bit perturbations into different supports of about equal error).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import statistics
from pathlib import Path


def by_seed(patterns: list[str]) -> dict[int, dict[str, float]]:
    """Each finished run's perplexity per evaluated dataset, by seed (two runs of one seed are an error)."""
    runs: dict[int, dict[str, float]] = {}
    for d in sorted({d for p in patterns for d in glob.glob(p)}):
        path = Path(d) / "lmprune.json"
        if path.exists():
            m = json.loads(path.read_text())
            seed = int(m["seed"])
            if seed in runs:
                raise SystemExit(f"two runs of seed {seed} among {patterns}")
            runs[seed] = {ds: m["perplexity"][ds] for ds in m["perplexity"]["details"]}
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, nargs="+", help="globs of the A run directories")
    ap.add_argument("--b", required=True, nargs="+", help="globs of the B run directories")
    ap.add_argument("--labels", default="A,B")
    args = ap.parse_args()
    la, lb = args.labels.split(",")
    a, b = by_seed(args.a), by_seed(args.b)
    seeds = sorted(set(a) & set(b))
    datasets = [k for k in a[seeds[0]] if all(k in a[s] and k in b[s] for s in seeds)]
    print("| seed | " + " | ".join(f"{ds} {la} | {ds} {lb} | change" for ds in datasets) + " |")
    print("|---:|" + "---:|---:|---:|" * len(datasets))
    for s in seeds:
        print(f"| {s} | " + " | ".join(f"{a[s][ds]:.2f} | {b[s][ds]:.2f} | {100 * (b[s][ds] / a[s][ds] - 1):+.1f}%"
                                       for ds in datasets) + " |")
    print()
    for ds in datasets:
        diff = [b[s][ds] - a[s][ds] for s in seeds]
        mean, sd = statistics.mean(diff), statistics.stdev(diff)
        t = mean / (sd / math.sqrt(len(diff)))
        up = sum(d > 0 for d in diff)
        print(f"- {ds}: {lb} − {la} = {mean:+.2f} on average over {len(seeds)} seeds "
              f"({100 * mean / statistics.mean(a[s][ds] for s in seeds):+.1f}%), higher in {up} of {len(seeds)}, "
              f"paired t = {t:.2f} ({len(seeds) - 1} degrees of freedom)")


if __name__ == "__main__":
    main()
