"""Peak RSS and wall time of ``lmprune prune`` next to the ``--dry-run`` estimate.

Each configuration runs in a fresh subprocess; its peak RSS is ``VmHWM`` from ``/proc/self/status`` read by the process
itself at exit. Results are appended to ``bench/out/memory.jsonl`` and printed as a Markdown table.

    python bench/layer/memory.py --model smollm2-135m --method sparsegpt --nsamples 32 64 128 --seqlen 2048
    python bench/layer/memory.py --model smollm2-135m --method wanda --nsamples 8 --seqlen 256   # quick check
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# VmHWM (peak RSS of this process's own address space), not ru_maxrss: Linux carries ru_maxrss across
# fork+exec, so a child of a large process would report its parent's peak.
WRAPPER = (
    "import re, sys; from lmprune.cli import main; rc = main(sys.argv[1:]); "
    "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
    "print('PEAK_RSS_KIB', hwm, file=sys.stderr); sys.exit(rc)"
)


def prune_args(model: str, method: str, nsamples: int, seqlen: int, out: Path, extra: list[str]) -> list[str]:
    return ["prune", "--quiet", "--model", model, "--method", method, "--sparsity", "0.5", "--nsamples",
            str(nsamples), "--seqlen", str(seqlen), "--out", str(out), *extra]


def estimate_mib(args: list[str]) -> float:
    r = subprocess.run([sys.executable, "-m", "lmprune.cli", *args, "--dry-run"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1])
    return float(re.search(r"estimated peak host memory: (\d+) MiB", r.stdout).group(1))


def measure(args: list[str]) -> tuple[float, float]:
    """``(peak RSS MiB, wall seconds)`` of one real run in a fresh process."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1])
    return int(re.search(r"PEAK_RSS_KIB (\d+)", r.stderr).group(1)) / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", nargs="+", default=["sparsegpt"])
    ap.add_argument("--nsamples", type=int, nargs="+", default=[32])
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--extra", default="", help="more prune flags, e.g. '--dtype bfloat16 --blocks 0-3'")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "out" / "memory.jsonl"))
    a = ap.parse_args()
    rows = []
    for method in a.method:
        for n in a.nsamples:
            with tempfile.TemporaryDirectory() as tmp:
                args = prune_args(a.model, method, n, a.seqlen, Path(tmp) / "run",
                                  ["--calib", a.calib, *a.extra.split()])
                est = estimate_mib(args)
                peak, wall = measure(args)
            row = {"model": a.model, "method": method, "nsamples": n, "seqlen": a.seqlen, "extra": a.extra,
                   "estimate_mib": est, "peak_rss_mib": round(peak, 1), "wall_s": round(wall, 1),
                   "error": round(est / peak - 1, 3)}
            rows.append(row)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print("\n| model | method | nsamples x seqlen | extra | dry-run estimate MiB | peak RSS MiB | est/peak-1 | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['nsamples']} x {r['seqlen']} | {r['extra']} | "
              f"{r['estimate_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['error']:+.1%} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
