"""Real single-layer problems for the ALPS benchmarks: SmolLM2-135M weights and Gram matrices, cached on disk.

Calibration is the library's own: ``lmprune.data.calibration.sample_windows`` over C4's calibration documents
(1100–1999) from the data directory (``--data-dir``, else ``$LMPRUNE_DATA_DIR``), seed 0, the windows a run with
the same settings calibrates on. (Before the bench was rebuilt this script sampled with its own loop and
tokenised with special tokens, so its windows, and the tables made with them, differ slightly from these.) The Gram matrices are
taken from the dense model with forward hooks (no sequential pruning), which is what a single-layer table needs.

    python bench/alps_grams.py [--windows 16] [--seqlen 512] [--blocks 0,14,29]

writes ``bench/out/smollm2_grams_w{windows}_s{seqlen}_lib.pt``; the other ``bench/alps_*.py`` scripts call
:func:`load_problems`, which builds the file on first use.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import lmprune
from lmprune.data.calibration import sample_windows
from lmprune.data.sources import load_source

OUT = Path(__file__).resolve().parents[1] / "out"
MODEL = "smollm2-135m"
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calibration_windows(tok, n: int, seqlen: int, seed: int = 0, data_dir: str | None = None) -> torch.Tensor:
    """``(n, seqlen)`` C4 calibration windows, as ``lmprune prune --calib c4`` samples them."""
    return sample_windows(load_source("c4", "calib", data_dir or os.environ.get("LMPRUNE_DATA_DIR")), tok, n, seqlen,
                          seed)


def build(windows: int, seqlen: int, blocks: list[int]) -> dict:
    model, tok, _ = lmprune.load_model(MODEL)
    model.eval()
    ids = calibration_windows(tok, windows, seqlen)
    grams: dict[str, dict] = {}
    hooks = []
    for b in blocks:
        layer = model.model.layers[b]
        for name in LINEARS:
            parent = layer.self_attn if name in LINEARS[:4] else layer.mlp
            lin = parent.get_submodule(name)
            key = f"{b}.{name}"
            grams[key] = {"weight": lin.weight.detach().clone(), "gram": 0.0, "sum_x": 0.0, "n_tokens": 0}

            def hook(_mod, inputs, _out, key=key):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                g = grams[key]
                g["gram"] = g["gram"] + x.T @ x
                g["sum_x"] = g["sum_x"] + x.sum(0)
                g["n_tokens"] += x.shape[0]

            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    for g in grams.values():
        g["gram"] = g["gram"].float()
        g["sum_x"] = g["sum_x"].float()
    return {"windows": windows, "seqlen": seqlen, "blocks": blocks, "layers": grams}


def cache_path(windows: int, seqlen: int) -> Path:
    return OUT / f"smollm2_grams_w{windows}_s{seqlen}_lib.pt"


def load_problems(windows: int = 16, seqlen: int = 512, blocks: tuple[int, ...] = (0, 14, 29)) -> dict:
    """``{"blocks.name": {"weight", "gram", "sum_x", "n_tokens"}}``, from the cache or freshly built."""
    path = cache_path(windows, seqlen)
    if path.exists():
        data = torch.load(path)
        if all(b in data["blocks"] for b in blocks):
            return data["layers"]
    data = build(windows, seqlen, list(blocks))
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data["layers"]


def gram_of(entry: dict):
    from lmprune.solvers.base import Gram

    return Gram(entry["gram"], entry["n_tokens"], entry["sum_x"])


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--blocks", default="0,14,29")
    p.add_argument("--data-dir", default=None, help="default: $LMPRUNE_DATA_DIR")
    a = p.parse_args()
    if a.data_dir:
        os.environ["LMPRUNE_DATA_DIR"] = a.data_dir
    torch.set_num_threads(1)
    layers = load_problems(a.windows, a.seqlen, tuple(int(b) for b in a.blocks.split(",")))
    for k, v in layers.items():
        print(k, tuple(v["weight"].shape), v["n_tokens"])
