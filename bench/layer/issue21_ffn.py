"""Issue 21 on single feed-forward blocks: which of lmprune's changes to SparseLLM buys how much.

Captures the FFN input X and output Y of SmolLM2-135M blocks with the dense model (16 C4 windows × 512 tokens,
seed 0, documents 1100–1999; held-out: 8 windows, seed 1; ``bench/layer/sparsellm_tune.py``'s capture), then prunes each
FFN with SparseLLM(SparseGPT), starting from the reference configuration (``preset=paper``) and switching on
lmprune's changes one at a time and all together. Prints ‖Y − FFN(X)‖² / ‖Y‖² on the calibration and held-out
tokens.

    python bench/layer/issue21_ffn.py [--blocks 2,15] [--sparsity 0.8] [--cache /tmp/ffn.pt]
    python bench/layer/issue21_ffn.py --blocks 11 --only preset=paper --by-round   # the gradient s-step's divergence

Single-threaded; about 1–2 minutes per block, sparsity and configuration on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from lmprune.patterns import parse_pattern
from lmprune.solvers import get_solver
from lmprune.solvers.sparsellm import FFNData, Options, prune_ffn_swiglu

_spec = importlib.util.spec_from_file_location("sparsellm_tune", Path(__file__).with_name("sparsellm_tune.py"))
tune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune)

PAPER = {k: v for k, v in Options(preset="paper").model_dump().items() if k != "preset"}
DEFAULT = {k: v for k, v in Options().model_dump().items() if k != "preset"}
LADDER = [
    ("layer-wise (1 round)", {**PAPER, "rounds": 1}),
    ("preset=paper with the reference's gradient s-steps", {**PAPER, "s_update": "gradient", "s_steps": 2}),
    ("reference configuration (preset=paper: Gauss-Newton s-steps)", PAPER),
    ("  + keep_better", {**PAPER, "keep_better": True}),
    ("  + select=best", {**PAPER, "select": "best"}),
    ("  + α:β:γ = 1:1:10", {**PAPER, "alpha": 1.0, "beta": 1.0, "gamma": 10.0}),
    ("  + refit_down", {**PAPER, "refit_down": True}),
    ("lmprune's defaults without refit_down", {**DEFAULT, "refit_down": False}),
    ("lmprune's defaults", DEFAULT),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="2,15")
    ap.add_argument("--sparsity", default="0.8")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/issue21_ffn.pt"))
    ap.add_argument("--only", default="", help="run only the configurations whose name contains this text")
    ap.add_argument("--by-round", action="store_true", help="also print the calibration error after every round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    blocks = [int(b) for b in args.blocks.split(",")]
    if args.cache.exists():
        data = torch.load(args.cache)
    else:
        model, tok = tune.load_model()
        calib = tune.capture(model, tune.windows(tok, args.windows, args.seqlen, 0), blocks)
        held = tune.capture(model, tune.windows(tok, args.heldout, args.seqlen, 1), blocks)
        data = {b: {"calib": calib[b], "held": held[b],
                    "w": {k: getattr(model.model.layers[b].mlp, f"{k}_proj").weight.detach().clone()
                          for k in ("up", "gate", "down")}} for b in blocks}
        torch.save(data, args.cache)
    sg = get_solver("sparsegpt").solve_fn()
    pattern = parse_pattern("unstructured")
    inner = lambda weight, gram, target: sg(weight, gram, pattern, target)  # noqa: E731
    print("| block | sparsity | configuration | calib rel. err | held-out rel. err | chosen round | time s |")
    print("|---|---|---|---|---|---|---|")
    for b in blocks:
        (x, y), (xh, yh), w = data[b]["calib"], data[b]["held"], data[b]["w"]
        for s in [float(v) for v in args.sparsity.split(",")]:
            for name, opts in LADDER:
                if args.only not in name:
                    continue
                t0 = time.perf_counter()
                out = prune_ffn_swiglu(FFNData.swiglu(x, y, w["up"], w["gate"], w["down"]), pattern, s, inner, **opts)
                ws = {k: r.weight for k, r in out.results.items()}
                print(f"| {b} | {s} | {name} | {tune.rel(y, x, ws):.4f} | {tune.rel(yh, xh, ws):.4f} | "
                      f"{out.stats['best_round']} | {time.perf_counter() - t0:.0f} |", flush=True)
                if args.by_round:
                    yy = float(y.double().pow(2).sum())
                    print("|   | | error after each round | " + ", ".join(f"{e / yy:.4g}" for e in out.stats["ffn_error"])
                          + " | | | |", flush=True)


if __name__ == "__main__":
    main()
