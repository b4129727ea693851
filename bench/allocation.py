"""Uniform vs OWL vs AlphaPruning allocation for several solvers and sparsities, through the ``lmprune`` CLI.

    python bench/allocation.py --dry-run                       # print the commands only
    python bench/allocation.py --methods wanda,sparsegpt,alps --sparsities 0.6,0.7,0.8 \\
        --epsilons 0.1,0.2,0.3 --eval-windows 20 --nsamples 32 --seqlen 512

One run directory per cell under ``--root`` (default ``bench/out/allocation``):
``<method>_<allocation>_s<NN>`` (alpha cells carry ``_e<ε>``). A cell whose directory already holds
``lmprune.json`` is not run again, so the script resumes after an interruption. At the end (or with
``--table-only``) it prints Markdown: every finished cell with WikiText-2/PTB/C4 perplexity, the allocation's
own time and the pruning time, then one WikiText-2 pivot per method (rows: sparsity, columns: allocation).

ε for AlphaPruning is a tuning knob; ``--epsilons`` runs the alpha cells once per value so it can be chosen
from measurements (the pivot shows every ε as its own column). ``--epsilons auto`` uses the ε whose finished
alpha cells at ``--pick-at`` sparsity have the lowest C4 perplexity (geometric mean over the methods that have
every candidate); C4 rather than WikiText-2 so that the choice is not made on a reported test set.

Several copies may run over one ``--root`` at once (one per core): a cell is claimed by creating
``ROOT/NAME.claim`` first, and a claimed cell is left to its owner.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

DATASETS = ("wikitext2", "ptb", "c4")


def cells(args) -> list[dict]:
    out = []
    for method in args.methods:
        for s in args.sparsities:
            for allocation in args.allocations:
                variants = [None] if allocation != "alpha" else args.epsilons
                for eps in variants:
                    name = f"{method}_{allocation}_s{round(100 * s):02d}"
                    opts = dict(args.owl_opt) if allocation == "owl" else {}
                    if eps is not None:
                        name += f"_e{eps:g}"
                        opts = {"epsilon": eps, **dict(args.alpha_opt)}
                    name += "".join(f"_{k}-{v}" for k, v in opts.items() if k != "epsilon")
                    out.append({"name": name, "method": method, "sparsity": s, "allocation": allocation,
                                "epsilon": eps, "options": opts})
    return out


def command(args, cell: dict, out: Path) -> list[str]:
    cmd = args.lmprune + ["prune", "--model", args.model, "--method", cell["method"],
                          "--sparsity", f"{cell['sparsity']:g}", "--allocation", cell["allocation"],
                          "--out", str(out), "--eval", ",".join(args.eval), "--eval-windows", str(args.eval_windows),
                          "--eval-seqlen", str(args.eval_seqlen),
                          "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.seed),
                          "--quiet"]
    for k, v in cell["options"].items():
        cmd += ["--alloc-opt", f"{k}={v}"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd


def read_cell(run_dir: Path) -> dict | None:
    path = run_dir / "lmprune.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    detail = m.get("allocation_detail") or {}
    return {
        "ppl": {d: m.get("perplexity", {}).get(d) for d in DATASETS},
        "eval_windows": m.get("perplexity", {}).get("eval_windows"),
        "achieved": m.get("achieved_sparsity"),
        "alloc_s": detail.get("time_s"),
        "time_s": m.get("time_s"),
        "calibration_time_s": m.get("calibration_time_s"),
        "solver_time_s": m.get("solver_time_s"),
        "peak_rss_mb": m.get("peak_rss_mb"),
        "alpha_svds": {k: (detail.get("options") or {}).get(k) for k in ("svd_time_s", "cached", "computed")}
        if detail.get("method") == "alpha" else None,
    }


def fmt(x, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"


def label(cell: dict) -> str:
    return cell["allocation"] + (f" ε={cell['epsilon']:g}" if cell["epsilon"] is not None else "")


def table(args, grid: list[dict]) -> str:
    root = Path(args.root)
    results = {c["name"]: read_cell(root / c["name"]) for c in grid}
    lines = ["| method | sparsity | allocation | " + " | ".join(DATASETS) + " | achieved | alloc s | prune s |",
             "|---|---|---|" + "---|" * (len(DATASETS) + 3)]
    windows = set()
    for c in grid:
        r = results[c["name"]]
        if r is None:
            continue
        windows.add(r["eval_windows"])
        lines.append(f"| {c['method']} | {c['sparsity']:.0%} | {label(c)} | "
                     + " | ".join(fmt(r["ppl"][d]) for d in DATASETS)
                     + f" | {fmt(r['achieved'], 4)} | {fmt(r['alloc_s'], 1)} | {fmt(r['time_s'], 0)} |")
    if len(lines) == 2:
        return "no finished cells yet"
    lines.append(f"\nPerplexity over the first {', '.join(map(str, sorted(windows, key=str)))} windows of "
                 f"{args.eval_seqlen} tokens; calibration {args.nsamples} × {args.seqlen}; seed {args.seed}.")

    columns = []
    for c in grid:
        if label(c) not in columns:
            columns.append(label(c))
    for method in args.methods:
        lines += [f"\n**{method}**, WikiText-2 perplexity\n", "| sparsity | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for s in args.sparsities:
            row = {label(c): results[c["name"]] for c in grid if c["method"] == method and c["sparsity"] == s}
            lines.append(f"| {s:.0%} | " + " | ".join(
                fmt(row[col]["ppl"]["wikitext2"]) if row.get(col) else "–" for col in columns) + " |")
    return "\n".join(lines)


def pick_epsilon(root: Path, methods: list[str], at: float, wait_s: float = 30.0) -> float:
    """ε of the finished alpha cells at sparsity ``at`` with the lowest geometric-mean C4 perplexity."""
    prefix = [f"{m}_alpha_s{round(100 * at):02d}_e" for m in methods]
    while any(next(root.glob(f"{p}*.claim"), None) for p in prefix):  # a sweep cell still running elsewhere
        time.sleep(wait_s)
    c4: dict[float, dict[str, float]] = {}
    for method, pre in zip(methods, prefix):
        for d in root.glob(f"{pre}*"):
            eps_text = d.name[len(pre):]
            r = read_cell(d) if d.is_dir() and "_" not in eps_text else None
            if r and r["ppl"]["c4"]:
                c4.setdefault(float(eps_text), {})[method] = r["ppl"]["c4"]
    complete = {m for m in methods if all(m in row for row in c4.values())}
    scores = {e: sum(math.log(row[m]) for m in complete) / len(complete) for e, row in c4.items() if complete}
    if not scores:
        raise SystemExit(f"--epsilons auto: no finished alpha cells at {at:.0%} under {root}")
    best = min(scores, key=scores.get)
    print(f"ε = {best:g}: lowest geometric-mean C4 perplexity at {at:.0%} over {', '.join(sorted(complete))} "
          f"({', '.join(f'ε={e:g}: {math.exp(v):.1f}' for e, v in sorted(scores.items()))})", flush=True)
    return best


def run_cell(args, cell: dict, root: Path, env: dict) -> bool | None:
    """Prune and evaluate one cell unless it is finished or claimed; False when the run failed."""
    out = root / cell["name"]
    if (out / "lmprune.json").is_file():
        print(f"skip {cell['name']}: finished", flush=True)
        return None
    cmd = command(args, cell, out)
    if args.dry_run:
        print("$ " + shlex.join(cmd), flush=True)
        return None
    claim = root / f"{cell['name']}.claim"
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        print(f"skip {cell['name']}: claimed by another run (remove {claim} if none is running)", flush=True)
        return None
    try:
        print("$ " + shlex.join(cmd), flush=True)
        return subprocess.run(cmd, env=env).returncode == 0
    finally:
        claim.unlink(missing_ok=True)


def kv(items: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in items or []:
        k, _, v = item.partition("=")
        out.append((k.strip(), v.strip()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="wanda,sparsegpt,alps")
    ap.add_argument("--sparsities", default="0.6,0.7,0.8")
    ap.add_argument("--allocations", default="uniform,owl,alpha")
    ap.add_argument("--epsilons", default="0.3", help="AlphaPruning ε values (one alpha cell each), or 'auto'")
    ap.add_argument("--pick-at", type=float, default=0.7, help="sparsity whose ε sweep --epsilons auto reads")
    ap.add_argument("--alpha-opt", action="append", help="extra alpha option KEY=VALUE, e.g. aggregate=block_median")
    ap.add_argument("--owl-opt", action="append", help="OWL option KEY=VALUE, e.g. lam=0.08 or M=5")
    ap.add_argument("--eval", default=",".join(DATASETS))
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--eval-seqlen", type=int, default=None, help="evaluation window length (default: --seqlen)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    default_data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    ap.add_argument("--data-dir", default=os.environ.get("LMPRUNE_DATA_DIR")
                    or (str(default_data) if default_data.is_dir() else None),
                    help="default: $LMPRUNE_DATA_DIR, else ../shared/data beside the repository")
    ap.add_argument("--root", default="bench/out/allocation")
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of each run")
    ap.add_argument("--lmprune", default=f"{sys.executable} -m lmprune.cli",
                    help="how to call the CLI (default: this Python's lmprune.cli)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--jsonl", help="also write every finished cell's figures to this JSONL file")
    args = ap.parse_args(argv)
    args.methods = args.methods.split(",")
    args.sparsities = [float(x) for x in args.sparsities.split(",")]
    args.allocations = args.allocations.split(",")
    args.eval_seqlen = args.eval_seqlen or args.seqlen
    root = Path(args.root)
    if args.epsilons == "auto":
        args.epsilons = [pick_epsilon(root, args.methods, args.pick_at)]
    else:
        args.epsilons = [float(x) for x in args.epsilons.split(",")]
    args.eval = args.eval.split(",")
    args.alpha_opt, args.owl_opt = kv(args.alpha_opt), kv(args.owl_opt)
    args.lmprune = shlex.split(args.lmprune)

    grid = cells(args)
    failed = []
    if not args.table_only:
        root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        for c in grid:
            if run_cell(args, c, root, env) is False:
                failed.append(c["name"])
    if not args.dry_run:
        print()
        print(table(args, grid))
    if args.jsonl:
        with open(args.jsonl, "w") as f:
            for c in grid:
                r = read_cell(root / c["name"])
                if r is not None:
                    f.write(json.dumps({**c, **r, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                        "eval_seqlen": args.eval_seqlen, "seed": args.seed}) + "\n")
    if failed:
        print(f"\nfailed cells: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
