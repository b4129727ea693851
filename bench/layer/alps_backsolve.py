"""Backsolve table: masked batched PCG at several iteration counts against an exact per-column solve.

On a fixed support of a real SmolLM2-135M layer, solve min ½ tr(XᵀH̃X) − ⟨H̃B0, X⟩ over X on the support (ALPS's
post-processing problem, unit-diagonal damped H̃). Three starts: the magnitude support with the masked scaled
weights (a cold start), and the support and last iterate of the ADMM phase of ``alps-fast`` and of ``alps``
(what each hands to PCG).
Reported: relative layer error e (undamped H), distance to the exact solution, time.

    python bench/layer/alps_backsolve.py [--layers 0.q_proj,29.down_proj] [--sparsity 0.7] [--iters 0,1,2,3,5,10,20,50]
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
from lmprune.solvers import alps, get_solver  # noqa: E402
from lmprune.solvers.base import reconstruction_error  # noqa: E402
from lmprune.solvers.pcg import masked_pcg  # noqa: E402


def exact_per_column(h: torch.Tensor, g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = torch.zeros_like(g)
    for j in range(g.shape[1]):
        s = mask[:, j]
        x[s, j] = torch.linalg.solve(h[s][:, s], g[s, j])
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="0.q_proj,29.down_proj")
    p.add_argument("--sparsity", type=float, default=0.7)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--iters", default="0,1,2,3,5,10,20,50")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    problems = load_problems()
    pattern = parse_pattern(a.pattern)
    counts = [int(i) for i in a.iters.split(",")]
    print(f"pattern {a.pattern}, sparsity {a.sparsity}, {a.threads} thread(s); exact solve float64, PCG float32\n")
    print("| layer | start | PCG iters | e (undamped) | ‖X−X*‖/‖X*‖ | PCG s | exact s |")
    print("|---|---|---|---|---|---|---|")
    for layer in a.layers.split(","):
        entry = problems[layer]
        w = entry["weight"]
        gram = gram_of(entry)
        sg = alps.scaled_gram(gram, 0.01, "float32", "float32")
        b0 = sg.d.unsqueeze(1) * w.T
        b0[gram.dead()] = 0
        g = sg.h @ b0
        fast = get_solver("alps-fast").options({"pcg_iters": 0}).model_dump()
        admm = {
            "alps-fast ADMM": alps.solve(w, gram, pattern, a.sparsity, **fast),
            "alps ADMM": alps.solve(w, gram, pattern, a.sparsity, pcg_iters=0),
        }
        magnitude = alps.keep_mask_scaled(pattern, b0, a.sparsity)
        starts = {"magnitude": (magnitude, b0 * magnitude)}
        starts.update({k: (r.mask.T, sg.d.unsqueeze(1) * r.weight.T) for k, r in admm.items()})
        for label, (mask, x0) in starts.items():
            t = time.perf_counter()
            exact = exact_per_column(sg.h.double(), g.double(), mask).float()
            t_exact = time.perf_counter() - t
            for k in counts:
                t = time.perf_counter()
                res = masked_pcg(sg.h, g, mask, x0.clone(), iters=k, track_objective=False)  # x0 is overwritten
                secs = time.perf_counter() - t
                pruned = (res.x / sg.d.unsqueeze(1)).T
                e = reconstruction_error(w, pruned, gram, dtype=torch.float64)[1]
                dist = float((res.x - exact).norm() / exact.norm())
                print(f"| {layer} | {label} | {k} | {e:.5g} | {dist:.3g} | {secs:.3f} | {t_exact:.2f} |", flush=True)
            e_exact = reconstruction_error(w, (exact / sg.d.unsqueeze(1)).T, gram, dtype=torch.float64)[1]
            print(f"| {layer} | {label} | exact | {e_exact:.5g} | 0 | – | {t_exact:.2f} |", flush=True)


if __name__ == "__main__":
    main()
