"""Single-layer table: relative reconstruction error and time per solve on real SmolLM2-135M layers.

e = tr((Ŵ−W) H (Ŵ−W)ᵀ) / tr(W H Wᵀ) with the undamped Gram matrix H = Σ xxᵀ of the C4 calibration windows.
Every solve gets a fresh Gram object, so its time includes the factorisation it needs (Cholesky for
SparseGPT, eigendecomposition for ALPS); in a model q/k/v and gate/up share one.

    python bench/layer/alps_layers.py                       # q_proj, down_proj of blocks 0 and 29; 0.4..0.9 and 2:4
    python bench/layer/alps_layers.py --settings 0.7 --methods sparsegpt,alps \\
        --variant "alps-f32eig=alps:eigh_dtype=float32" --variant "pcg0=alps:pcg_iters=0"

A variant is ``label=solver:key=value,key=value`` over a registered solver's preset.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from alps_grams import OUT, gram_of, load_problems  # noqa: E402

from lmprune.patterns import parse_pattern  # noqa: E402
from lmprune.solvers import get_solver  # noqa: E402
from lmprune.solvers.base import reconstruction_error  # noqa: E402


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_variant(text: str) -> tuple[str, str, dict]:
    label, rest = text.split("=", 1)
    solver, _, opts = rest.partition(":")
    overrides = {}
    for item in filter(None, opts.split(",")):
        key, val = item.split("=", 1)
        overrides[key] = tuple(float(t) for t in val.split("|")) if "|" in val else _value(val)
    return label, solver, overrides


def setting_of(text: str) -> tuple[str, float]:
    if ":" in text:
        n, m = (int(t) for t in text.split(":"))
        return text, 1 - n / m
    return "unstructured", float(text)


def run(layers, settings, variants, problems) -> list[dict]:
    rows = []
    for layer in layers:
        entry = problems[layer]
        w = entry["weight"]
        for setting in settings:
            spec, sparsity = setting_of(setting)
            pattern = parse_pattern(spec)
            for label, solver, overrides in variants:
                sol = get_solver(solver)
                opts = sol.options(overrides).model_dump()
                gram = gram_of(entry)
                start = time.perf_counter()
                res = sol.solve_fn()(w, gram, pattern, sparsity, **opts)
                secs = time.perf_counter() - start
                check = pattern.verify(res.weight, sparsity)  # Wanda keeps round((1-s)·in) per row: may exceed
                err = reconstruction_error(w, res.weight, gram)[1]
                row = {"layer": layer, "setting": setting, "method": label, "rel_error": err, "time_s": secs}
                row["sparsity"] = check.achieved_sparsity
                for key in ("iterations", "pcg_iterations", "eigh_s", "admm_s", "pcg_s"):
                    if key in res.stats:
                        row[key] = res.stats[key]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


def run_blocks(blocks, settings, variants, problems) -> list[dict]:
    """Whole blocks as the engine solves them: one Gram object per input group (q/k/v, gate/up share)."""
    rows = []
    for block in blocks:
        for setting in settings:
            spec, sparsity = setting_of(setting)
            pattern = parse_pattern(spec)
            for label, solver, overrides in variants:
                sol = get_solver(solver)
                opts = sol.options(overrides).model_dump()
                errs, secs = [], 0.0
                for group in GROUPS:
                    gram = gram_of(problems[f"{block}.{group[0]}"])
                    for name in group:
                        w = problems[f"{block}.{name}"]["weight"]
                        start = time.perf_counter()
                        res = sol.solve_fn()(w, gram, pattern, sparsity, **opts)
                        secs += time.perf_counter() - start
                        errs.append(reconstruction_error(w, res.weight, gram)[1])
                row = {"layer": f"block {block}", "setting": setting, "method": label,
                       "rel_error": statistics.mean(errs), "time_s": secs}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], labels: list[str]) -> str:
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    get = {(r["layer"], r["setting"], r["method"]): r for r in rows}

    def header(first: str) -> str:
        return "| " + " | ".join([first] + [f"{m} e" for m in labels] + [f"{m} s" for m in labels]) + " |"

    lines = ["Mean over layers " + ", ".join(layers) + " (e = relative error, s = seconds per solve):", ""]
    lines += [header("setting"), "|---" * (1 + 2 * len(labels)) + "|"]
    for s in settings:
        errs = [statistics.mean(get[(lay, s, m)]["rel_error"] for lay in layers) for m in labels]
        secs = [statistics.mean(get[(lay, s, m)]["time_s"] for lay in layers) for m in labels]
        lines.append("| " + " | ".join([s] + [f"{e:.4g}" for e in errs] + [f"{t:.3f}" for t in secs]) + " |")
    lines += ["", "Per layer:", "", header("layer | setting"), "|---" * (2 + 2 * len(labels)) + "|"]
    for lay in layers:
        for s in settings:
            cells = [f"{get[(lay, s, m)]['rel_error']:.4g}" for m in labels]
            cells += [f"{get[(lay, s, m)]['time_s']:.3f}" for m in labels]
            lines.append(f"| {lay} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="0.q_proj,0.down_proj,29.q_proj,29.down_proj")
    p.add_argument("--settings", default="0.4,0.5,0.6,0.7,0.8,0.9,2:4")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,alps,alps-fast")
    p.add_argument("--variant", action="append", default=[], help="label=solver:key=value,...")
    p.add_argument("--blocks", default="", help="instead of --layers: whole blocks (all 7 linears, shared Grams); "
                   "e = mean relative error over the 7, s = seconds for the block")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--out", default=str(OUT / "alps_layers.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    problems = load_problems(a.windows, a.seqlen)
    variants = [(m, m, {}) for m in filter(None, a.methods.split(","))] + [parse_variant(v) for v in a.variant]
    if a.blocks:
        rows = run_blocks(a.blocks.split(","), a.settings.split(","), variants, problems)
    else:
        rows = run(a.layers.split(","), a.settings.split(","), variants, problems)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print()
    print(markdown(rows, [v[0] for v in variants]))


if __name__ == "__main__":
    main()
