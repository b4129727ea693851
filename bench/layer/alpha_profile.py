"""ESD tail exponent α of every prunable matrix of a model, per block, and what each ε does to the allocation.

    python bench/layer/alpha_profile.py --model smollm2-135m [--epsilons 0.1,0.2,0.3,0.5] [--sparsities 0.6,0.7,0.8]
                                  [--out bench/out/alpha_profile]

Prints Markdown: the SVD time, the per-block mean α under the three xmin rules, mean α per matrix kind, and for
every (S, ε) and block aggregate (mean, median) the block sparsity range, the number of clamped matrices and the largest ε that needs no clamping.
With ``--out`` it also writes the per-matrix fits (JSON) and one allocation plot per sparsity.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import lmprune
from lmprune.allocation import MatrixInfo
from lmprune.allocation import alpha as alpha_alloc
from lmprune.allocation.base import fit_weighted_mean
from lmprune.allocation.plot import plot_allocation
from lmprune.models.adapters import get_adapter

RULES = ("peak", "peak_reference", "median")


def largest_clean_epsilon(metric: list[float], params: list[int], sparsity: float, hi: float) -> float:
    """Largest ε (to 1e-4) whose unclamped η·r stays at or below ``hi`` (the reference would not crash)."""
    n = torch.tensor(params, dtype=torch.float64)
    lo_eps, hi_eps = 0.0, 0.9999
    for _ in range(40):
        eps = (lo_eps + hi_eps) / 2
        r = torch.tensor(alpha_alloc.alpha_ratios(metric, eps), dtype=torch.float64)
        eta = sparsity * n.sum() / (n * r).sum()
        if float(eta * r.max()) <= hi:
            lo_eps = eps
        else:
            hi_eps = eps
    return round(lo_eps, 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--epsilons", default="0.1,0.2,0.3,0.4,0.5")
    ap.add_argument("--sparsities", default="0.6,0.7,0.8")
    ap.add_argument("--max-sparsity", type=float, default=0.99)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rules", default=",".join(RULES), help="xmin rules to fit (peak is always included)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    epsilons = [float(x) for x in args.epsilons.split(",")]
    sparsities = [float(x) for x in args.sparsities.split(",")]

    model, _, _ = lmprune.load_model(args.model)
    adapter = get_adapter(model)
    mats = [MatrixInfo(n, b, lin.weight.detach().float()) for n, b, lin in adapter.matrices(model)]
    kinds = sorted({m.name.split(".")[-1] for m in mats}, key=[m.name.split(".")[-1] for m in mats].index)
    n_blocks = max(m.block for m in mats) + 1

    rules = ["peak"] + [r for r in args.rules.split(",") if r != "peak"]
    fits, seconds = {}, {}
    for rule in rules:
        t = time.perf_counter()
        fits[rule], _ = alpha_alloc.compute_alphas(mats, rule)
        seconds[rule] = time.perf_counter() - t
    print(f"# ESD α of {args.model}: {len(mats)} matrices in {n_blocks} blocks\n")
    print("SVD + fit time: " + ", ".join(f"{r} {s:.1f} s" for r, s in seconds.items())
          + f" ({args.threads} thread(s), float32 SVD on CPU)\n")

    print("## Mean α per block (arithmetic mean over the block's matrices)\n")
    print("| block | " + " | ".join(rules) + " | median (peak) | min matrix α (peak) | max matrix α (peak) |")
    print("|---|" + "---|" * (len(rules) + 3))
    for b in range(n_blocks):
        row = []
        for rule in rules:
            vals = [fits[rule][m.name].alpha for m in mats if m.block == b]
            row.append(f"{sum(vals) / len(vals):.3f}")
        peak = [fits["peak"][m.name].alpha for m in mats if m.block == b]
        print(f"| {b} | " + " | ".join(row) + f" | {statistics.median(peak):.3f} | {min(peak):.2f} | {max(peak):.2f} |")

    print("\n## Mean α per matrix kind (peak rule), and the mean tail size\n")
    print("| kind | mean α | min | max | mean n_tail / n_eigs |")
    print("|---|---|---|---|---|")
    for k in kinds:
        fs = [fits["peak"][m.name] for m in mats if m.name.endswith("." + k)]
        a = [f.alpha for f in fs]
        print(f"| {k} | {sum(a) / len(a):.3f} | {min(a):.2f} | {max(a):.2f} | "
              f"{sum(f.n_tail / f.n_eigs for f in fs) / len(fs):.2f} |")

    params = [m.params for m in mats]
    for aggregate in ("block", "block_median"):
        block_alpha = defaultdict(list)
        for m in mats:
            block_alpha[m.block].append(fits["peak"][m.name].alpha)
        agg = statistics.median if aggregate == "block_median" else statistics.fmean
        metric = [agg(block_alpha[m.block]) for m in mats]
        print(f"\n## Block sparsities for target S and ε (peak rule, aggregate={aggregate}, "
              f"clamp to [0, {args.max_sparsity}])\n")
        print("| S | ε | min block | max block | block at max | clamped matrices | reference η·r max |")
        print("|---|---|---|---|---|---|---|")
        for s in sparsities:
            for eps in epsilons:
                r = alpha_alloc.alpha_ratios(metric, eps)
                t = fit_weighted_mean([0.0] * len(r), r, params, s, 0.0, args.max_sparsity)
                eta = s * sum(params) / sum(n * x for n, x in zip(params, r))
                clamped = sum(x >= args.max_sparsity for x in t)
                top = mats[max(range(len(t)), key=t.__getitem__)].block
                print(f"| {s} | {eps} | {min(t):.3f} | {max(t):.3f} | {top} | {clamped} | {eta * max(r):.3f} |")
        print("\nLargest ε with no clamping (the reference's formula stays ≤ max sparsity): "
              + ", ".join(f"S={s}: {largest_clean_epsilon(metric, params, s, args.max_sparsity)}"
                          for s in sparsities))

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        dump = {rule: {n: f.__dict__ for n, f in fr.items()} for rule, fr in fits.items()}
        (out / "fits.json").write_text(json.dumps(dump, indent=1))
        for s in sparsities:
            alloc = alpha_alloc.allocate(mats, s, epsilon=epsilons[len(epsilons) // 2])
            plot_allocation(alloc, out / f"alpha_s{round(100 * s)}.png")
            alloc.to_json(out / f"alpha_s{round(100 * s)}.json")
        print(f"\nwrote {out}/fits.json and alpha_s*.png/json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
