"""What one matrix's solve and its error report cost at a real shape: peak RSS above the process's baseline and
wall time, against the memory plan's solver workspace for the same matrix (issue 18's memory fixes are measured
with it, before and after).

    python bench/scale/matrix_memory.py --out 4096 --in 11008 --solver sparsegpt --threads 1

The Gram matrix is built from ``--tokens`` random correlated inputs (only its shape matters for memory and
time); the weight is random ``out x in`` in ``--dtype`` and goes through the same steps as in the engine: the
layerwise strategy's float32 copy, the layer pruner (solver then refiner), and ``reconstruction_error`` on
the result. Peak RSS is sampled every 5 ms in a thread; one JSON line is printed. For SparseGPT the damped
inverse-Hessian factorisation (``in³``) is timed apart from the column sweep (``out · in²``).
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import psutil
import torch


class PeakRSS:
    """Highest resident size seen between ``start`` and ``stop``, sampled in a background thread."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._proc = psutil.Process()

    def __enter__(self) -> "PeakRSS":
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.every)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def above_base_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=int, required=True)
    ap.add_argument("--in", dest="inp", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--solver", default="sparsegpt")
    ap.add_argument("--refiner", default="none")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmprune.config import PruneConfig
    from lmprune.layer_pruner import LayerPruner
    from lmprune.patterns import parse_pattern
    from lmprune.run.memory import BlockTokens, _solver_workspace
    from lmprune.solvers.base import Gram, reconstruction_error

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.inp, generator=g)
    x = x + 0.5 * torch.randn(args.tokens, 1, generator=g)  # a shared component: correlated inputs
    gram = Gram(x.T @ x, args.tokens, x.sum(0))
    del x
    dense = (torch.randn(args.out, args.inp, generator=g) / args.inp**0.5).to(getattr(torch, args.dtype))
    pruner = LayerPruner.build(args.solver, args.refiner, parse_pattern("unstructured"),
                               {}, {"solver_options": {}, "refine_options": {}})
    config = PruneConfig(method=args.solver, sparsity=args.sparsity, refine=args.refiner)
    planned = _solver_workspace(config, args.out, args.inp, BlockTokens(args.tokens, args.inp, args.out)) / 2**20

    with PeakRSS() as solve_mem:
        start = time.perf_counter()
        factor_s = None
        if args.solver == "sparsegpt":  # the in³ factorisation, timed apart (cached on the Gram for the solve)
            from lmprune.solvers.sparsegpt import inverse_hessian_factor

            inverse_hessian_factor(gram, 0.01)
            factor_s = round(time.perf_counter() - start, 2)
        result = pruner.solve(dense.clone().float(), gram, args.sparsity)
        new = result.weight.to(dense.dtype)
        solve_s = time.perf_counter() - start
    stats = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in result.stats.items()
             if k in ("iterations", "pcg_iterations", "admm_s", "pcg_s")}
    del result
    gram.release()
    with PeakRSS() as err_mem:
        start = time.perf_counter()
        err, rel = reconstruction_error(dense, new, gram)
        err_s = time.perf_counter() - start
    print(json.dumps({
        "shape": [args.out, args.inp], "solver": args.solver, "refiner": args.refiner, "dtype": args.dtype,
        "threads": args.threads, "tokens": args.tokens,
        "solve_s": round(solve_s, 2), "of_which_factorisation_s": factor_s,
        "solve_peak_above_base_mib": round(solve_mem.above_base_mib, 1),
        "error_s": round(err_s, 2), "error_peak_above_base_mib": round(err_mem.above_base_mib, 1),
        "planned_workspace_mib": round(planned, 1), "rel_error": rel, "solver_stats": stats,
    }), flush=True)


if __name__ == "__main__":
    main()
