"""SparseLLM's peak memory against its calibration tokens, with ``--offload-dir`` (issue 18).

One streamed ``lmprune prune --method sparsellm --offload-dir`` run per calibration size on a model built by
``bench/scale/shapes.py`` (one block is enough), and a Markdown table: peak RSS, the ``--dry-run`` plan, the
pruned weights' SHA-256 (to show that where the arrays are kept changes no bit) and the time. With
``--offload-dir`` the FFN problem's inputs, targets and auxiliaries are in files, so its peak should not grow
with the tokens (``--in-memory`` runs without it); ``--src`` runs another source tree (a snapshot of an earlier commit) for a before/after row.

    python bench/scale/sparsellm_tokens.py /work/scale/llama2-7b-quarter-1 --nsamples 8,32 --label after
    python bench/scale/sparsellm_tokens.py /work/scale/llama2-7b-quarter-1 --nsamples 8,32 --label before \\
        --src /work/snap/src_b5/src
    python bench/scale/sparsellm_tokens.py --table

Every cell is ``ROOT/<label>/n<nsamples>``; a cell with a ``lmprune.json`` is skipped (resumable cell by cell).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def weights_sha(run: Path) -> str:
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for f in sorted(run.glob("*.safetensors")):
        tensors = load_file(str(f))
        for k in sorted(tensors):
            h.update(k.encode())
            h.update(tensors[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_cell(model: Path, n: int, out: Path, args: argparse.Namespace) -> None:
    if (out / "lmprune.json").exists():
        print(f"skip {out}: finished")
        return
    offload = [] if args.in_memory else ["--offload-dir", str(out.parent / f"acts-n{n}")]
    cmd = [sys.executable, "-m", "lmprune.cli", "prune", "--model", str(model), "--method", "sparsellm",
           "--sparsity", "0.5", "--stream", *offload, "--calib", "c4", "--nsamples", str(n),
           "--seqlen", str(args.seqlen), "--dtype", "bfloat16", "--out", str(out), "--quiet",
           "--method-opt", f"rounds={args.rounds}"]
    if args.blocks:
        cmd += ["--blocks", args.blocks]
    if args.chunk_tokens:
        cmd += ["--method-opt", f"chunk_tokens={args.chunk_tokens}"]
    if args.skip_memory_check:
        cmd += ["--skip-memory-check"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
    if args.src:
        env["PYTHONPATH"] = args.src
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=False)


def table(root: Path) -> str:
    rows = ["| code | calibration tokens | peak RSS (MiB) | dry-run peak (MiB) | FFN problem (s) | run (s) "
            "| weights (sha256) |", "|---|---:|---:|---:|---:|---:|---|"]
    for label in sorted(p for p in root.iterdir() if p.is_dir()):
        for cell in sorted(label.glob("n*"), key=lambda p: int(p.name[1:])):
            manifest = cell / "lmprune.json"
            if not manifest.exists():
                continue
            m = json.loads(manifest.read_text())
            ffn = [r for r in m["layers"] if "mlp" in r["name"]]
            plan = m.get("memory_plan") or {}
            tokens = plan.get("nsamples", 0) * plan.get("seqlen", 0)
            rows.append(f"| {label.name} | {tokens} | {m['peak_rss_mb']:.0f} | "
                        f"{plan.get('peak_host_mib', '–')} | {sum(r['time_s'] for r in ffn):.0f} | {m['time_s']:.0f} | {weights_sha(cell)} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path, help="a model directory from bench/scale/shapes.py")
    ap.add_argument("--nsamples", default="8,32", help="calibration windows, comma-separated")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--label", default="current")
    ap.add_argument("--in-memory", action="store_true", help="without --offload-dir (label the cells apart)")
    ap.add_argument("--blocks", default=None, help="blocks to prune (--blocks of lmprune prune; default: all)")
    ap.add_argument("--chunk-tokens", type=int, default=None, help="SparseLLM's chunk_tokens (default: the run's)")
    ap.add_argument("--skip-memory-check", action="store_true",
                    help="run even where the plan (which counts every round's phases) is above the free memory")
    ap.add_argument("--src", default=None, help="PYTHONPATH of the lmprune to run (default: the installed one)")
    ap.add_argument("--root", type=Path, default=REPO / "bench" / "out" / "sparsellm_tokens")
    ap.add_argument("--data-dir", default=os.environ.get("LMPRUNE_DATA_DIR"))
    ap.add_argument("--table", action="store_true", help="print the table of finished cells, run nothing")
    args = ap.parse_args()
    if not args.table:
        if args.model is None:
            ap.error("a model directory is needed unless --table")
        for n in (int(v) for v in args.nsamples.split(",")):
            run_cell(args.model, n, args.root / args.label / f"n{n}", args)
    print(table(args.root))


if __name__ == "__main__":
    main()
