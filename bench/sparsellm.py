"""SparseLLM and DSnoT against their baselines on one model, through the ``lmprune`` command line.

Methods: SparseGPT, SparseLLM(SparseGPT), SparseLLM(ALPS) (when the ``alps`` solver is registered), Wanda,
Wanda+DSnoT, SparseGPT+DSnoT; at 70/80/90% unstructured and 2:4; under two protocols, labelled in every row:

* ``all``: every decoder block pruned (the usual protocol);
* ``first-half``: only the first half of the decoder blocks pruned, *for every method* (the protocol of
  the SparseLLM paper's tables; those numbers are not comparable with ``all``).

Resumable: a cell whose directory already holds ``lmprune.json`` is not run again. Prints a Markdown table
(and writes it to ``<root>/table.md``) of WikiText-2 / PTB / C4 perplexity, pruning wall time and peak RSS.

    python bench/sparsellm.py --dry-run                       # list the commands
    python bench/sparsellm.py                                 # full grid (hours on 2 CPU cores)
    python bench/sparsellm.py --sparsities 0.7 --patterns unstructured --protocols all --nsamples 4 \\
        --seqlen 128 --eval-windows 2 --root bench/out/sparsellm_smoke   # a small smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lmprune.solvers import SOLVERS

HERE = Path(__file__).resolve().parent


def methods(include_alps: bool, alps_solver: str = "alps") -> list[dict]:
    out = [
        {"label": "SparseGPT", "method": "sparsegpt"},
        {"label": "SparseLLM(SparseGPT)", "method": "sparsellm", "inner": "sparsegpt"},
        {"label": "Wanda", "method": "wanda"},
        {"label": "Wanda+DSnoT", "method": "wanda", "refine": "dsnot"},
        {"label": "SparseGPT+DSnoT", "method": "sparsegpt", "refine": "dsnot"},
    ]
    if include_alps and alps_solver in SOLVERS:
        out.insert(2, {"label": f"SparseLLM({alps_solver})", "method": "sparsellm", "inner": alps_solver})
    return out


def cells(args) -> list[dict]:
    out = []
    for protocol in args.protocols:
        for pattern in args.patterns:
            if ":" in pattern:
                n, m = (int(v) for v in pattern.split(":"))
                sparsities = [1 - n / m]
            else:
                sparsities = args.sparsities
            for s in sparsities:
                for m in methods(not args.no_alps, args.alps_solver):
                    parts = [protocol, m["method"], m.get("inner"), m.get("refine"), pattern.replace(":", "of"),
                             f"s{round(100 * s):02d}"]
                    name = "_".join(p for p in parts if p)
                    out.append({**m, "protocol": protocol, "pattern": pattern, "sparsity": s, "name": name})
    return out


def command(cell: dict, args) -> list[str]:
    cmd = [
        sys.executable, "-m", "lmprune.cli", "prune", "--quiet", "--model", args.model,
        "--method", cell["method"], "--sparsity", f"{cell['sparsity']:.4f}", "--pattern", cell["pattern"],
        "--out", str(Path(args.root) / cell["name"]), "--calib", args.calib, "--nsamples", str(args.nsamples),
        "--seqlen", str(args.seqlen), "--eval", args.eval, "--eval-windows", str(args.eval_windows),
        "--blocks", cell["protocol"], "--data-dir", args.data_dir,
    ]
    if args.eval_seqlen:
        cmd += ["--eval-seqlen", str(args.eval_seqlen)]
    if "inner" in cell:
        cmd += ["--inner", cell["inner"]]
        for opt in args.method_opt:
            cmd += ["--method-opt", opt]
    if "refine" in cell:
        cmd += ["--refine", cell["refine"]]
    return cmd


def row(cell: dict, manifest: dict, datasets: list[str]) -> str:
    ppl = manifest.get("perplexity", {})
    vals = [f"{ppl[d]:.2f}" if isinstance(ppl.get(d), (int, float)) else "–" for d in datasets]
    pattern = cell["pattern"] if ":" in cell["pattern"] else f"{round(100 * cell['sparsity'])}%"
    return (f"| {cell['protocol']} | {pattern} | {cell['label']} | " + " | ".join(vals)
            + f" | {manifest.get('time_s', float('nan')):.0f} | {manifest.get('peak_rss_mb', float('nan')):.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--root", default=str(HERE / "out" / "sparsellm"))
    ap.add_argument("--sparsities", type=lambda s: [float(v) for v in s.split(",")], default=[0.7, 0.8, 0.9])
    ap.add_argument("--patterns", type=lambda s: s.split(","), default=["unstructured", "2:4"])
    ap.add_argument("--protocols", type=lambda s: s.split(","), default=["all", "first-half"])
    ap.add_argument("--data-dir", default=os.environ.get("LMPRUNE_DATA_DIR", "/work/shared/data"))
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval", default="wikitext2,ptb,c4")
    ap.add_argument("--eval-windows", type=int, default=20)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--method-opt", action="append", default=[], help="SparseLLM option KEY=VALUE (repeatable)")
    ap.add_argument("--no-alps", action="store_true", help="skip SparseLLM(ALPS) even when ALPS is registered")
    ap.add_argument("--alps-solver", default="alps", help="inner solver of the SparseLLM(ALPS) rows: alps | alps-fast")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    datasets = args.eval.split(",")
    lines = [
        f"Model {args.model}; calibration {args.calib} {args.nsamples}×{args.seqlen}; perplexity over the first "
        f"{args.eval_windows} windows of {args.eval_seqlen or args.seqlen} tokens. Protocol `first-half`: only the "
        "first half of the decoder blocks is pruned, for every method (the SparseLLM paper's protocol); "
        "`all`: every block.",
        "",
        "| protocol | sparsity | method | " + " | ".join(f"{d} ppl" for d in datasets) + " | time s | peak RSS MiB |",
        "|---|---|---|" + "---|" * len(datasets) + "---|---|",
    ]
    for cell in cells(args):
        cmd = command(cell, args)
        manifest_path = root / cell["name"] / "lmprune.json"
        if args.dry_run:
            print(shlex.join(cmd))
            continue
        if not manifest_path.exists():
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"FAILED {cell['name']}: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            print(f"{cell['name']}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        lines.append(row(cell, json.loads(manifest_path.read_text()), datasets))
    if not args.dry_run:
        table = "\n".join(lines)
        (root / "table.md").write_text(table + "\n")
        print(table)


if __name__ == "__main__":
    main()
