"""Whole-model grid in one process on one device: the model is loaded once, every cell restores the dense
weights, prunes through ``lmprune.api.prune`` and evaluates perplexity. Meant for a GPU, where a CLI process per
cell would spend more time importing and loading than pruning; on a CPU ``bench/sweep.py`` is the better tool.

Each finished cell is appended to ``--out`` (JSON lines) at once, so a run cut off by a time limit keeps what
it finished, and a rerun skips the cells already there. Cells start only while ``--budget-s`` is not spent.

    python bench/device_grid.py --model smollm2-135m --device cuda --out grid.jsonl --budget-s 420
    python bench/device_grid.py --table grid.jsonl            # Markdown tables of a finished grid
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9)
SOLVERS = ("magnitude", "wanda", "sparsegpt", "alps-fast", "alps")


def cells() -> list[dict]:
    """Every cell in priority order: the headline ALPS table (issue 3), allocation (issue 5), then SparseLLM and
    DSnoT on all blocks and on the first half (issue 4)."""
    out: list[dict] = [{"method": "dense"}]
    for s in (0.7, "2:4", 0.5, 0.8, 0.9, 0.6):
        for m in SOLVERS:
            out.append({"method": m, "sparsity": 0.5, "pattern": s} if s == "2:4" else {"method": m, "sparsity": s})
    for s in (0.7, 0.6, 0.8):
        for alloc in ("owl", "alpha"):
            for m in ("wanda", "sparsegpt", "alps"):
                out.append({"method": m, "sparsity": s, "allocation": alloc})
    for blocks in ({}, {"blocks": "first-half"}):
        for s in (0.7, 0.8, 0.9, "2:4"):
            base = {"sparsity": 0.5, "pattern": "2:4"} if s == "2:4" else {"sparsity": s}
            base |= blocks
            out += [{"method": "sparsellm", **base}, {"method": "sparsellm", "inner": "alps", **base},
                    {"method": "wanda", "refine": "dsnot", **base}, {"method": "sparsegpt", "refine": "dsnot", **base}]
            if blocks:
                out += [{"method": "sparsegpt", **base}, {"method": "wanda", **base}]
    for s in (0.7, 0.6, 0.8):
        for alloc in ("owl", "alpha"):
            out.append({"method": "alps-fast", "sparsity": s, "allocation": alloc})
    return out


def cell_key(cell: dict) -> str:
    return json.dumps(cell, sort_keys=True)


def run_grid(args) -> int:
    import torch

    from lmprune import api
    from lmprune.config import build_config
    from lmprune.models.loading import load_model

    torch.backends.cuda.matmul.allow_tf32 = False  # every solve in true float32, as on the CPU
    torch.backends.cudnn.allow_tf32 = False
    out = Path(args.out)
    done = {json.loads(line)["key"] for line in out.read_text().splitlines()} if out.is_file() else set()
    start = time.perf_counter()
    model, tokenizer, source = load_model(args.model)
    model.to(args.device).eval()
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s", flush=True)
    datasets = args.eval.split(",")
    only = {cell_key(json.loads(o)) for o in args.only or []}
    chosen = [c for c in cells() if not only or cell_key(c) in only]
    for cell in chosen:
        key = cell_key(cell)
        if key in done:
            continue
        if time.perf_counter() - start > args.budget_s:
            print(f"budget of {args.budget_s} s spent; stopping before {key}", flush=True)
            break
        model.load_state_dict(dense)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        row: dict = {"key": key, **cell, "device": args.device, "calib_batch": args.calib_batch,
                     "eval_batch": args.eval_batch}
        t0 = time.perf_counter()
        try:
            if cell["method"] != "dense":
                fields = {k: v for k, v in cell.items()}
                config = build_config(**fields, calib="c4", nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                      device=args.device, data_dir=args.data_dir,
                                      calib_batch_size=args.calib_batch)
                manifest = api.prune(model, tokenizer, config, progress=False)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                row.update({k: manifest[k] for k in ("achieved_sparsity", "time_s", "calibration_time_s",
                                                      "solver_time_s", "pattern_ok")})
                errs = [r["rel_error"] for r in manifest["layers"]]
                row["mean_rel_error"] = sum(errs) / len(errs)
                if "allocation_detail" in manifest:
                    row["allocation_time_s"] = manifest["allocation_detail"].get("time_s")
            t_eval = time.perf_counter()
            ppl = api.evaluate_perplexity(model, tokenizer, datasets, args.eval_seqlen, args.eval_windows,
                                          args.data_dir, args.device, progress=False, batch_size=args.eval_batch)
            row["eval_s"] = time.perf_counter() - t_eval
            row["perplexity"] = {d: ppl[d] for d in datasets}
            row["eval_windows"] = {d: ppl["details"][d].get("windows") for d in datasets}
        except Exception as e:  # one broken cell must not lose the others; the error is recorded with it
            row["error"] = f"{type(e).__name__}: {e}"
        row["cell_s"] = time.perf_counter() - t0
        if args.device.startswith("cuda"):
            row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row.get(k) for k in ("key", "perplexity", "time_s", "cell_s", "error")}), flush=True)
    return 0


def label(row: dict) -> str:
    method = row["method"]
    if row.get("inner"):
        method += f"({row['inner']})"
    if row.get("refine"):
        method += f"+{row['refine']}"
    return method


def _order(row: dict) -> tuple:
    """Dense first, then by blocks, allocation, setting (sparsity, then N:M) and method."""
    methods = ["magnitude", "wanda", "sparsegpt", "alps-fast", "alps", "sparsellm"]
    setting = (1, 0.0) if row.get("pattern") else (0, row.get("sparsity", -1.0))
    return (row["method"] != "dense", row.get("blocks", ""), row.get("allocation", ""), setting,
            methods.index(row["method"]) if row["method"] in methods else len(methods), label(row))


def table(*paths: str) -> str:
    rows = sorted((json.loads(line) for path in paths for line in Path(path).read_text().splitlines()), key=_order)
    datasets = next((list(r["perplexity"]) for r in rows if "perplexity" in r), [])
    head = "| method | allocation | blocks | setting | " + " | ".join(datasets) + \
        " | mean layer rel. error | prune s | of which solver s | peak GPU MiB | device |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        setting = r.get("pattern") or (f"{r['sparsity']:.0%}" if "sparsity" in r else "–")
        if "error" in r:
            lines.append(f"| {label(r)} | {r.get('allocation', 'uniform')} | {r.get('blocks', 'all')} | {setting} | "
                         f"failed: {r['error'][:80]} |")
            continue
        ppl = " | ".join(f"{r['perplexity'][d]:.2f}" for d in datasets)
        err = f"{r['mean_rel_error']:.4f}" if "mean_rel_error" in r else "–"
        t = f"{r['time_s']:.1f}" if "time_s" in r else "–"
        ts = f"{r['solver_time_s']:.1f}" if "solver_time_s" in r else "–"
        mem = f"{r['peak_cuda_mb']:.0f}" if r.get("peak_cuda_mb") else "–"
        device = r.get("device") or ("cuda" if r.get("peak_cuda_mb") else "cpu")
        lines.append(f"| {label(r)} | {r.get('allocation', 'uniform')} | {r.get('blocks', 'all')} | {setting} | "
                     f"{ppl} | {err} | {t} | {ts} | {mem} | {device} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="grid.jsonl")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--eval", default="wikitext2,ptb,c4")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, default=None, help="cap per dataset (default: the whole protocol)")
    p.add_argument("--data-dir", default=os.environ.get("LMPRUNE_DATA_DIR"))
    p.add_argument("--calib-batch", type=int, default=1, help="calibration windows per block pass")
    p.add_argument("--eval-batch", type=int, default=1, help="evaluation windows per forward pass")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="start no cell after this many seconds")
    p.add_argument("--only", action="append", metavar="JSON", help='run just this cell, e.g. \'{"method": "alps", '
                   '"sparsity": 0.6}\' (repeatable)')
    p.add_argument("--table", metavar="JSONL", nargs="+", help="print the Markdown table of grid files and exit")
    p.add_argument("--list", action="store_true", help="print the cells in order and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(*args.table))
        return 0
    if args.list:
        for c in cells():
            print(cell_key(c))
        return 0
    return run_grid(args)


if __name__ == "__main__":
    sys.exit(main())
