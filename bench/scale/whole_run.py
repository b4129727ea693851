"""One whole model pruned end to end at a real shape, streamed (issue 18), and its table.

Runs ``lmprune prune --stream --dtype bfloat16`` over every block of a model built by ``bench/scale/shapes.py``
(all blocks: ``shapes.py llama2-7b --out DIR``), optionally on ``--nproc`` ranks, then prints what the run
cost from its manifest: wall time, calibration passes, solves, the spread of the per-block wall times, peak RSS
per rank against the ``--dry-run`` plan, the checkpoints written and the pruned shards.

    python bench/scale/whole_run.py /work/scale/llama2-7b --method sparsegpt --nsamples 4 --seqlen 2048 \\
        --nproc 2 --threads 1 --out /work/scale/e2e/sparsegpt-7b
    python bench/scale/whole_run.py /work/scale/llama2-7b --out /work/scale/e2e/sparsegpt-7b --table

The run resumes where it was killed (lmprune's own checkpoint: the same command continues from the last
finished block); ``--table`` prints the table of a finished run and runs nothing. ``--per-block CELL`` adds the
whole-model time that a ``bench/scale/blocks.py`` cell (one pruned block) projects, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from blocks import plan_text, streamed_prune  # noqa: E402


def run(args: argparse.Namespace) -> None:
    if (args.out / "lmprune.json").exists():
        print(f"skip {args.out}: finished")
        return
    cmd = streamed_prune(args.model, args.method, args.out, args, "--sparsity", str(args.sparsity),
                         *(["--nproc", str(args.nproc)] if args.nproc > 1 else []))
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)), check=True)


def _gib(path: Path) -> float:
    """The pruned weights' size: the shard index's tensor bytes (valid after the shards are deleted), else the files'."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["metadata"]["total_size"] / 2**30
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30


def table(out: Path, per_block: Path | None) -> str:
    m = json.loads((out / "lmprune.json").read_text())
    blocks = m["block_times_s"]
    tokens = m["calibration"]["nsamples"] * m["calibration"]["seqlen"]
    world = m.get("world_size", 1)
    rss = (m.get("distributed") or {}).get("peak_rss_mb_per_rank") or [m["peak_rss_mb"]]
    gpu = f" (GPU, rank 0: {m['peak_cuda_mb']:.0f})" if m.get("peak_cuda_mb") else ""
    io = m.get("checkpoint_io") or {}
    shape_file = Path(m["model"]["path"]) / "shape.json"
    shape = json.loads(shape_file.read_text())["shape"] if shape_file.exists() else m["model"]["model_type"]
    head = ("| shape | method | ranks × threads | calib tokens | blocks | wall (h) | calibration passes (s) "
            "| solves, summed over owners (s) | block wall mean / min / max (s) | peak RSS per rank (MiB) "
            "| dry-run peak per rank (MiB) | checkpoints written (MiB, s) | pruned shards (GiB) | sparsity | reload check |")
    sep = "|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---|---:|---:|---|"
    threads = m["versions"].get("torch_threads", "?")
    row = (f"| {shape} | {m['method']} | {world} × {threads} | {tokens} | {len(blocks)} | {m['time_s'] / 3600:.2f} | "
           f"{m['calibration_time_s']:.0f} | {m['solver_time_s']:.0f} | "
           f"{statistics.mean(blocks):.0f} / {min(blocks):.0f} / {max(blocks):.0f} | "
           f"{' / '.join(f'{r:.0f}' for r in rss)}{gpu} | {plan_text(m)} | "
           f"{io.get('bytes', 0) / 2**20:.0f}, {io.get('seconds', float('nan')):.1f} | {_gib(out):.2f} | "
           f"{m['achieved_sparsity']:.4f} | {'ok' if (m.get('reload_check') or {}).get('ok') else 'FAILED'} |")
    lines = [head, sep, row]
    if per_block is not None:
        cell = json.loads((per_block / "lmprune.json").read_text())
        block0 = cell["block_times_s"][0]
        lines.append(f"\nOne pruned block in `{per_block}` ({cell.get('world_size', 1)} rank × "
                     f"{cell['versions'].get('torch_threads', '?')} threads): {block0:.0f} s, "
                     f"× {len(blocks)} blocks = {len(blocks) * block0 / 3600:.2f} h.")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a model directory from bench/scale/shapes.py (all blocks)")
    ap.add_argument("--out", type=Path, required=True, help="the run directory")
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (one GPU per rank; peak GPU memory joins the table)")
    ap.add_argument("--data-dir", default=os.environ.get("LMPRUNE_DATA_DIR"))
    ap.add_argument("--table", action="store_true", help="print the finished run's table, run nothing")
    ap.add_argument("--per-block", type=Path, default=None, metavar="CELL",
                    help="a blocks.py cell whose block-0 wall time is projected over the model, for comparison")
    args = ap.parse_args()
    if not args.table:
        run(args)
    print(table(args.out, args.per_block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
