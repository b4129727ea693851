"""Half-precision pruning against the float32 path: mask agreement, weight difference, perplexity.

The same configuration is run with ``--dtype float32`` and with each requested dtype (solves are float32 in
both; only loading, propagation through the blocks and saving differ). Prints a Markdown table.

    python bench/layer/precision.py --model smollm2-135m --dtypes bfloat16 float16 --nsamples 16 --seqlen 512 \\
        --eval-windows 8                       # a few CPU minutes
    python bench/layer/precision.py --model smollm2-135m --dtypes bfloat16 --nsamples 4 --seqlen 128 --blocks 0-1 \\
        --eval-windows 2                       # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(run.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def prune(a: argparse.Namespace, dtype: str, out: Path) -> dict:
    """One run through the command line (one thread), its manifest back."""
    cmd = [sys.executable, "-m", "lmprune.cli", "prune", "--quiet", "--skip-memory-check", "--model", a.model,
           "--method", a.method, "--sparsity", str(a.sparsity), "--nsamples", str(a.nsamples), "--seqlen",
           str(a.seqlen), "--calib", a.calib, "--dtype", dtype, "--out", str(out)]
    cmd += ["--blocks", a.blocks] if a.blocks else []
    cmd += ["--eval", a.eval, "--eval-windows", str(a.eval_windows)] if a.eval else []
    cmd += ["--data-dir", a.data_dir] if a.data_dir else []
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    return json.loads((out / "lmprune.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", default=None)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--eval", default="wikitext2")
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--data-dir", default=os.environ.get("LMPRUNE_DATA_DIR"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "out" / "precision.jsonl"))
    a = ap.parse_args()
    evals = [d for d in a.eval.split(",") if d]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for dtype in ["float32", *a.dtypes]:
            runs[dtype] = Path(tmp) / dtype
            runs[dtype + ":manifest"] = prune(a, dtype, runs[dtype])
        ref_w, ref_m = _weights(runs["float32"]), runs["float32:manifest"]
        for dtype in a.dtypes:
            w, m = _weights(runs[dtype]), runs[dtype + ":manifest"]
            agree, rel = [], []
            for rec in m["layers"]:
                x, y = w[rec["name"] + ".weight"].float(), ref_w[rec["name"] + ".weight"]
                agree.append(((x == 0) == (y == 0)).float().mean().item())
                rel.append(((x - y).norm() / y.norm()).item())
            err = [r["rel_error"] for r in m["layers"]]
            ref_err = [r["rel_error"] for r in ref_m["layers"]]
            row = {
                "model": a.model, "method": a.method, "dtype": dtype, "saved_dtype": m["model"]["dtype"],
                "mask_agreement_min": min(agree), "mask_agreement_mean": sum(agree) / len(agree),
                "rel_weight_diff_max": max(rel), "rel_weight_diff_mean": sum(rel) / len(rel),
                "rel_error_mean": sum(err) / len(err), "rel_error_mean_fp32": sum(ref_err) / len(ref_err),
                "time_s": m["time_s"], "time_s_fp32": ref_m["time_s"],
                **{f"ppl_{d}": m.get("perplexity", {}).get(d) for d in evals},
                **{f"ppl_{d}_fp32": ref_m.get("perplexity", {}).get(d) for d in evals},
            }
            rows.append(row)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print("\n| dtype | mask agreement (min / mean) | rel. weight diff (max / mean) | mean rel_error (dtype / fp32) | "
          + " | ".join(f"{d} ppl (dtype / fp32)" for d in evals) + " |")
    print("|---|---|---|---|" + "---|" * len(evals))
    for r in rows:
        ppl = " | ".join(f"{r[f'ppl_{d}']:.3f} / {r[f'ppl_{d}_fp32']:.3f}" for d in evals)
        print(f"| {r['dtype']} | {r['mask_agreement_min']:.4f} / {r['mask_agreement_mean']:.4f} | "
              f"{r['rel_weight_diff_max']:.4f} / {r['rel_weight_diff_mean']:.4f} | "
              f"{r['rel_error_mean']:.4f} / {r['rel_error_mean_fp32']:.4f} | {ppl} |")


if __name__ == "__main__":
    main()
