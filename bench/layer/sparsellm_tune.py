"""Choose SparseLLM's α, β, γ and rounds on real SmolLM2-135M feed-forward blocks.

Captures, with the dense model, the FFN input X and output Y of a few decoder blocks on C4 validation
documents 1100–1999 (seed 0 windows; the anchors' calibration protocol), plus held-out windows (seed 1), then
prunes each FFN with SparseLLM(SparseGPT) for a grid of settings and prints the relative FFN output error
‖Y − FFN(X)‖² / ‖Y‖² on the calibration tokens and on the held-out tokens, next to two layer-wise baselines:

* ``layerwise``: SparseGPT on each matrix from its dense weights, down_proj with the dense activations
  (SparseLLM's round 0);
* ``sequential``: SparseGPT on gate/up, then down_proj with the Gram matrix of the pruned activations.

    python bench/layer/sparsellm_tune.py [--blocks 2,15,27] [--windows 16] [--seqlen 512] [--sparsity 0.7,0.9]

Runs single-threaded; about a minute per block and sparsity for the default grid.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lmprune
from lmprune.data.calibration import sample_windows
from lmprune.data.sources import load_source
from lmprune.patterns import parse_pattern
from lmprune.solvers import Gram, get_solver
from lmprune.solvers.sparsellm import FFNData, prune_ffn_swiglu

OUT = Path(__file__).resolve().parents[1] / "out"
GRID = "1,1,1,1;5,5,5,4;1,1,1,4;1,1,10,4;1,0.1,10,4;1,1,100,4;1,1,10,8"  # alpha,beta,gamma,rounds;...


def windows(tok, n: int, seqlen: int, seed: int) -> torch.Tensor:
    """C4 calibration windows as ``lmprune prune --calib c4 --seed SEED`` samples them (documents 1100–1999)."""
    return sample_windows(load_source("c4", "calib", os.environ.get("LMPRUNE_DATA_DIR")), tok, n, seqlen, seed)


def capture(model, ids: torch.Tensor, blocks: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    got: dict[int, list] = {b: [] for b in blocks}
    hooks = []
    for b in blocks:
        def hook(_m, inputs, output, b=b):
            x, y = inputs[0], output
            got[b].append((x.reshape(-1, x.shape[-1]).clone(), y.reshape(-1, y.shape[-1]).clone()))

        hooks.append(model.model.layers[b].mlp.register_forward_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    return {b: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for b, v in got.items()}


def swiglu(x, w):
    return (F.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T


def rel(y, x, w) -> float:
    return float((y - swiglu(x, w)).pow(2).sum() / y.pow(2).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", default="2,15,27")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--sparsity", default="0.7,0.9")
    ap.add_argument("--pattern", default="unstructured")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--grid", default=GRID,
                    help="alpha,beta,gamma,rounds[,percdamp];... (rounds 1 = layer-wise + down refit)")
    ap.add_argument("--no-refit", action="store_true", help="also run every setting without the down refit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    blocks = [int(b) for b in args.blocks.split(",")]
    OUT.mkdir(exist_ok=True)
    cache = OUT / f"sparsellm_ffn_{args.blocks.replace(',', '-')}_w{args.windows}_h{args.heldout}_s{args.seqlen}.pt"
    if cache.exists():
        data = torch.load(cache)
    else:
        model, tok, _ = lmprune.load_model("smollm2-135m")
        model.eval()
        calib = capture(model, windows(tok, args.windows, args.seqlen, 0), blocks)
        held = capture(model, windows(tok, args.heldout, args.seqlen, 1), blocks)
        mlps = {b: model.model.layers[b].mlp for b in blocks}
        data = {
            b: {
                "calib": calib[b], "held": held[b],
                "w": {k: getattr(mlps[b], f"{k}_proj").weight.detach().clone() for k in ("up", "gate", "down")},
            }
            for b in blocks
        }
        torch.save(data, cache)

    sg = get_solver("sparsegpt").solve_fn()
    pattern = parse_pattern(args.pattern)
    print("| block | sparsity | setting | calib rel. err | held-out rel. err | best round | time s |")
    print("|---|---|---|---|---|---|---|")
    for b in blocks:
        (x, y), (xh, yh), w = data[b]["calib"], data[b]["held"], data[b]["w"]
        for s in [float(v) for v in args.sparsity.split(",")]:
            inner = lambda weight, gram, target: sg(weight, gram, pattern, target)  # noqa: E731
            gx = Gram.from_inputs(x)
            lw = {k: inner(w[k], gx, s).weight for k in ("up", "gate")}
            dense_act = F.silu(x @ w["gate"].T) * (x @ w["up"].T)
            pruned_act = F.silu(x @ lw["gate"].T) * (x @ lw["up"].T)
            layerwise = {**lw, "down": inner(w["down"], Gram.from_inputs(dense_act), s).weight}
            sequential = {**lw, "down": inner(w["down"], Gram.from_inputs(pruned_act), s).weight}
            for name, ws in (("layerwise", layerwise), ("sequential", sequential)):
                print(f"| {b} | {s} | {name} | {rel(y, x, ws):.4f} | {rel(yh, xh, ws):.4f} | – | – |", flush=True)
            grid = [[float(v) for v in item.split(",")] for item in args.grid.split(";")]
            for alpha, beta, gamma, rounds, *damp in grid:
                rounds, percdamp = int(rounds), (damp or [0.01])[0]
                for refit in ((False, True) if args.no_refit else (True,)):
                    t0 = time.perf_counter()
                    out = prune_ffn_swiglu(
                        FFNData.swiglu(x, y, w["up"], w["gate"], w["down"]), pattern, s, inner,
                        alpha=alpha, beta=beta, gamma=gamma, rounds=rounds, refit_down=refit, percdamp=percdamp,
                    )
                    ws = {k: r.weight for k, r in out.results.items()}
                    label = f"α={alpha} β={beta} γ={gamma} R={rounds} damp={percdamp}{' +refit' if refit else ''}"
                    print(
                        f"| {b} | {s} | {label} | {rel(y, x, ws):.4f} | {rel(yh, xh, ws):.4f} | "
                        f"{out.stats['best_round']} | {time.perf_counter() - t0:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
