"""One process with N threads against N processes (``--nproc N``, gloo) with one thread each, on the same
calibration windows (issue 18): wall time, calibration passes, solves, peak RSS of rank 0, and how far the two
runs' weights are apart (masks equal, largest relative weight difference of a pruned matrix).

    python bench/scale/threads_vs_ranks.py bench/out/smollm2-hf --methods sparsegpt,alps --root /work/pairs

Every cell is ``ROOT/<method>-<layout>`` and is skipped once it has a ``lmprune.json`` (resumable); ``--table``
prints the table of the finished pairs. Run it on an otherwise idle machine: the point is the time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def run(model: Path, method: str, out: Path, nproc: int, args: argparse.Namespace) -> None:
    if (out / "lmprune.json").exists():
        return
    cmd = [sys.executable, "-m", "lmprune.cli", "prune", "--model", str(model), "--method", method,
           "--sparsity", str(args.sparsity), "--calib", "c4", "--nsamples", str(args.nsamples), "--seqlen",
           str(args.seqlen), "--out", str(out), "--quiet"]
    threads = args.nproc if nproc == 1 else 1
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    print("$", f"OMP_NUM_THREADS={threads}", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(threads)), check=True)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(run_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def compare(a: Path, b: Path) -> tuple[float, float]:
    """Share of equal mask entries over the pruned matrices, and the largest relative weight difference."""
    layers = {r["name"] + ".weight" for r in json.loads((a / "lmprune.json").read_text())["layers"]}
    wa, wb = weights(a), weights(b)
    same = total = 0
    worst = 0.0
    for k in layers & wa.keys():
        same += int(((wa[k] != 0) == (wb[k] != 0)).sum())
        total += wa[k].numel()
        worst = max(worst, float((wa[k].float() - wb[k].float()).norm() / wa[k].float().norm().clamp_min(1e-12)))
    return same / max(total, 1), worst


def row(label: str, run_dir: Path, versus: Path | None) -> str:
    m = json.loads((run_dir / "lmprune.json").read_text())
    solves = sum(r["time_s"] for r in m["layers"])
    cells = [label, f"{m['time_s']:.1f} s", f"{m['calibration_time_s']:.1f} s", f"{solves:.1f} s",
             f"{m['peak_rss_mb']:.0f} MiB"]
    if versus is None:
        cells += ["–", "–"]
    else:
        equal, worst = compare(versus, run_dir)
        cells += [f"{100 * equal:.3f}%", f"{worst:.2g}"]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--methods", default="sparsegpt,alps")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--table", action="store_true", help="print the finished pairs, run nothing")
    args = ap.parse_args()
    n = args.nproc
    lines = ["| method | run | wall (manifest time_s) | calibration passes | solves | peak RSS (rank 0) | "
             f"masks equal to 1 × {n} | largest relative weight difference |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for method in args.methods.split(","):
        threads, ranks = args.root / f"{method}-1x{n}", args.root / f"{method}-{n}x1"
        if not args.table:
            run(args.model, method, threads, 1, args)
            run(args.model, method, ranks, n, args)
        if (threads / "lmprune.json").exists():
            lines.append(f"| {method} " + row(f"1 process × {n} threads", threads, None))
        if (threads / "lmprune.json").exists() and (ranks / "lmprune.json").exists():
            lines.append(f"| {method} " + row(f"{n} processes × 1 thread", ranks, threads))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
