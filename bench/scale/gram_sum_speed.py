"""Time and memory of one window's Gram matrix sum at real widths: the full ``xᵀx`` in 2048-row panels (how the
engine summed before) against the lower triangle in :data:`~lmprune.gram_sum.GRAM_ROWS`-row panels
(:class:`~lmprune.gram_sum.GramSum`), both float32 products added into float64, and whether they give the same bits.

    python bench/scale/gram_sum_speed.py --widths 4096,11008 --tokens 2048 --threads 2

One JSON line per width: seconds per window (best of ``--repeat``), float64 MiB held, bit-identical or not.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def full_sum(h: torch.Tensor, x: torch.Tensor) -> None:
    for lo in range(0, h.shape[0], 2048):
        h[lo:lo + 2048].add_(x[:, lo:lo + 2048].T @ x)


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="4096,11008")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from lmprune.gram_sum import GramSum, lower_words

    g = torch.Generator().manual_seed(0)
    for d in (int(w) for w in args.widths.split(",")):
        x = torch.randn(args.tokens, d, generator=g)
        full = torch.zeros(d, d, dtype=torch.float64)
        full_s = best_of(args.repeat, lambda: full_sum(full, x))
        lower = GramSum(d)
        lower_s = best_of(args.repeat, lambda: lower.add_(x))
        same = torch.equal(lower.rounded(), full.float())
        print(json.dumps({"width": d, "tokens": args.tokens, "threads": args.threads,
                          "full_s": round(full_s, 3), "lower_s": round(lower_s, 3),
                          "full_float64_mib": round(8 * d * d / 2**20, 1),
                          "lower_float64_mib": round(8 * lower_words(d) / 2**20, 1), "bit_identical": same}),
              flush=True)


if __name__ == "__main__":
    main()
