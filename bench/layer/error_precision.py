"""Does the layer-error report need float64 products? float32 panel products against float64 ones on real layers.

For every SmolLM2-135M layer problem of ``alps_grams.load_problems`` (blocks 0, 14, 29; seven matrices each),
each per-matrix method at 50% and 70% unstructured, with the weights stored in bfloat16 and in float32 (what
``BlockContext.layer_error`` measures), ``reconstruction_error`` is computed with float32 and with float64 panel
products (float64 sums in both). Printed: per method and sparsity, the largest relative deviation of the
float32 absolute error from the float64 one, over layers and dtypes, the layer it occurs on and that layer's
relative error.

    python bench/layer/error_precision.py [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alps_grams import gram_of, load_problems  # noqa: E402

from lmprune.patterns import parse_pattern  # noqa: E402
from lmprune.solvers import get_solver  # noqa: E402
from lmprune.solvers.base import reconstruction_error  # noqa: E402

METHODS = ("magnitude", "wanda", "sparsegpt", "alps")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    problems = load_problems()
    unstructured = parse_pattern("unstructured")
    print(f"{len(problems)} layers, {a.threads} thread(s)\n")
    print("| method | sparsity | largest deviation, float32 vs float64 products | on layer (stored dtype) "
          "| its relative error | float64 / float32 report time |")
    print("|---|---:|---:|---|---:|---:|")
    for method in METHODS:
        for sparsity in (0.5, 0.7):
            worst, where, rel, t32, t64 = 0.0, "", 0.0, 0.0, 0.0
            for name, entry in problems.items():
                w, gram = entry["weight"].float(), gram_of(entry)
                pruned = get_solver(method).function()(w, gram, unstructured, sparsity).weight
                for dtype in (torch.bfloat16, torch.float32):
                    dense, stored = w.to(dtype), pruned.to(dtype)
                    start = time.perf_counter()
                    exact = reconstruction_error(dense, stored, gram, dtype=torch.float64)
                    t64 += time.perf_counter() - start
                    start = time.perf_counter()
                    fast = reconstruction_error(dense, stored, gram)
                    t32 += time.perf_counter() - start
                    dev = abs(fast[0] - exact[0]) / exact[0] if exact[0] > 0 else abs(fast[0])
                    if dev >= worst:
                        worst, where, rel = dev, f"{name} ({str(dtype).removeprefix('torch.')})", exact[1]
            print(f"| {method} | {sparsity:.0%} | {worst:.1e} | {where} | {rel:.3g} | {t64 / t32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
