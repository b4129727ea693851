"""Convergence table: ALPS's ρ schedule against fixed-ρ ADMM on real SmolLM2-135M layers.

At iterations 5/10/20/30/50/100 (of a run capped at 100 iterations, no early stop for the fixed-ρ runs) it
reports the relative error of the feasible iterate D, tr((D−B0)ᵀH̃(D−B0))/tr(B0ᵀH̃B0) on the damped, scaled Gram
matrix, the number of entries whose zero/non-zero status changed in the last iteration, and ρ. The schedule
stops itself (its row shows where); its final result after PCG is in the last column.

    python bench/layer/alps_convergence.py [--layers 14.q_proj,14.down_proj] [--sparsity 0.7] [--max-iter 100]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alps_grams import gram_of, load_problems  # noqa: E402

from lmprune.patterns import parse_pattern  # noqa: E402
from lmprune.solvers import alps  # noqa: E402

CHECKPOINTS = (5, 10, 20, 30, 50, 100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="14.q_proj,14.down_proj")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    problems = load_problems()
    pattern = parse_pattern(a.pattern)
    marks = tuple(c for c in CHECKPOINTS if c <= a.max_iter)
    runs = {
        "schedule (ρ0=0.1)": {},
        "fixed ρ=0.3": {"schedule": False, "rho0": 0.3},
        "fixed ρ=3": {"schedule": False, "rho0": 3.0},
    }
    header = " | ".join(f"it {c}: err / Δsupp / ρ" for c in marks)
    print(f"pattern {a.pattern}, sparsity {a.sparsity}; err = relative error of D on the scaled damped Gram\n")
    print(f"| layer | run | {header} | stopped at | final err (after PCG) |")
    print("|---|---|" + "---|" * len(marks) + "---|---|")
    for layer in a.layers.split(","):
        entry = problems[layer]
        for label, opts in runs.items():
            w = entry["weight"]
            res = alps.solve(w, gram_of(entry), pattern, a.sparsity, max_iter=a.max_iter, trace=marks, **opts)
            got = {t["iter"]: t for t in res.stats["trace"]}
            cells = []
            for c in marks:
                t = got.get(c)
                cells.append("–" if t is None else f"{t['rel_error_d']:.4g} / {t['support_change']} / {t['rho']:.3g}")
            cells += [str(res.stats["iterations"]), f"{res.stats['rel_error_scaled']:.4g}"]
            print(f"| {layer} | {label} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
