"""A grid of methods × sparsities (× allocations × patterns) on one model through the ``lmprune`` CLI,
then one comparison table with plots. Resumable: a cell whose directory already holds ``lmprune.json`` is
not pruned again (and not evaluated again when its zero-shot scores exist).

    python bench/sweep.py --dry-run                                  # print the commands only
    python bench/sweep.py --methods wanda,sparsegpt --sparsities 0.5,0.7 \\
        --eval wikitext2,ptb,c4 --eval-windows 20 --eval-seqlen 1024 --tasks all --limit 100

Layout under ``--root`` (default ``bench/out/sweep``): ``dense/``, ``<method>_<allocation>_<pattern>_s<NN>/``
run directories and ``compare/`` (``comparison.md``, ``comparison.csv``, PNGs). The dense row is
``lmprune eval`` of the unpruned model, written as a run manifest with ``method: dense``. Zero-shot scores of a
pruned cell are computed by ``lmprune prune --tasks`` into its manifest; a cell pruned earlier without them
gets ``lmprune eval --model CELL ... --out CELL/zeroshot.json``, which ``lmprune compare`` reads beside
``lmprune.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ALL_TASKS = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,boolq,rte,openbookqa,lambada_openai"
ZEROSHOT_SIDECAR = "zeroshot.json"


def cell_name(method: str, allocation: str, pattern: str, sparsity: float, refine: str = "none") -> str:
    alloc = Path(allocation).stem if allocation.endswith(".json") else allocation
    method = method if refine == "none" else f"{method}+{refine}"
    return f"{method}_{alloc}_{pattern.replace(':', 'of')}_s{round(100 * sparsity):02d}"


def grid(args) -> list[dict]:
    """Every cell; an N:M pattern fixes the sparsity at 1 − N/M, so it gets one cell per method and allocation."""
    cells, seen = [], set()
    for method, refine, allocation, pattern in itertools.product(
        args.methods, args.refines, args.allocations, args.patterns
    ):
        if ":" in pattern:
            n, m = (int(x) for x in pattern.split(":"))
            sparsities = [1 - n / m]
        else:
            sparsities = args.sparsities
        for s in sparsities:
            name = cell_name(method, allocation, pattern, s, refine)
            if name not in seen:
                seen.add(name)
                cells.append({"name": name, "method": method, "refine": refine, "allocation": allocation,
                              "pattern": pattern, "sparsity": s})
    return cells


def has_zeroshot(run_dir: Path) -> bool:
    manifest = run_dir / "lmprune.json"
    return (run_dir / ZEROSHOT_SIDECAR).is_file() or (
        manifest.is_file() and bool(json.loads(manifest.read_text()).get("zeroshot"))
    )


def common_options(args) -> list[str]:
    opts = ["--data-dir", str(args.data_dir)] if args.data_dir else []
    return opts


def ppl_options(args, flag: str, seqlen_flag: str) -> list[str]:
    """Perplexity options; dense and pruned cells get the same window length so their figures compare."""
    if not args.eval:
        return []
    eval_seqlen = args.eval_seqlen or args.seqlen
    return [flag, args.eval, "--eval-windows", str(args.eval_windows)] + (
        [seqlen_flag, str(eval_seqlen)] if eval_seqlen else []
    )


def zeroshot_options(args) -> list[str]:
    if not args.tasks:
        return []
    return ["--tasks", args.tasks] + (["--limit", str(args.limit)] if args.limit else [])


def prune_command(args, cell: dict, out: Path) -> list[str]:
    cmd = args.lmprune + ["prune", "--model", args.model, "--method", cell["method"],
                          "--sparsity", f"{cell['sparsity']:g}", "--out", str(out),
                          "--pattern", cell["pattern"], "--allocation", cell["allocation"], "--refine", cell["refine"],
                          "--seed", str(args.seed)]
    for flag, value in (("--calib", args.calib), ("--nsamples", args.nsamples), ("--seqlen", args.seqlen)):
        if value is not None:  # otherwise the CLI's default
            cmd += [flag, str(value)]
    return cmd + ppl_options(args, "--eval", "--eval-seqlen") + zeroshot_options(args) + common_options(args)


def zeroshot_command(args, model: str, out_file: Path) -> list[str]:
    return args.lmprune + ["eval", "--model", model, *zeroshot_options(args), "--out", str(out_file),
                           *common_options(args)]


def dense_command(args, out_file: Path) -> list[str]:
    return args.lmprune + ["eval", "--model", args.model, *ppl_options(args, "--ppl", "--seqlen"), *zeroshot_options(args),
                           "--out", str(out_file), *common_options(args)]


def write_dense_manifest(run_dir: Path, evaluation: dict, model: str, seconds: float) -> None:
    """The dense row as a run manifest (the keys ``lmprune compare`` reads)."""
    manifest = {
        "method": "dense", "sparsity": 0.0, "pattern": "-", "allocation": "-", "achieved_sparsity": 0.0,
        "layers": [], "model": model,
        "perplexity": evaluation.get("perplexity", {}),
        "zeroshot": evaluation.get("zeroshot", {}),
        "time_s": 0.0, "eval_time_s": round(seconds, 1), "peak_rss_mb": None,
    }
    (run_dir / "lmprune.json").write_text(json.dumps(manifest, indent=2))


def run(cmd: list[str], args, log) -> bool:
    print("$ " + shlex.join(cmd), file=log, flush=True)
    if args.dry_run:
        return True
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        print(f"  failed with exit status {proc.returncode}", file=log, flush=True)
    return proc.returncode == 0


def sweep(args) -> int:
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    log = sys.stdout
    failed, run_dirs = [], []

    dense_dir = root / "dense"
    if not args.no_dense:
        run_dirs.append(dense_dir)
        if (dense_dir / "lmprune.json").is_file():
            print(f"skip dense: {dense_dir / 'lmprune.json'} exists", file=log)
        else:
            dense_dir.mkdir(exist_ok=True)
            start = time.perf_counter()
            if run(dense_command(args, dense_dir / "eval.json"), args, log) and not args.dry_run:
                evaluation = json.loads((dense_dir / "eval.json").read_text())
                write_dense_manifest(dense_dir, evaluation, args.model, time.perf_counter() - start)
            elif not args.dry_run:
                failed.append("dense")

    for cell in grid(args):
        out = root / cell["name"]
        run_dirs.append(out)
        if (out / "lmprune.json").is_file():
            print(f"skip prune {cell['name']}: lmprune.json exists", file=log)
        else:
            if out.exists():  # an interrupted earlier attempt: start the cell afresh
                shutil.rmtree(out)
            if not run(prune_command(args, cell, out), args, log):
                failed.append(cell["name"])
                continue
        if args.tasks and not args.dry_run and not has_zeroshot(out):  # pruned earlier without --tasks
            if not run(zeroshot_command(args, str(out), out / ZEROSHOT_SIDECAR), args, log):
                failed.append(cell["name"] + " (zero-shot)")

    done = [str(d) for d in run_dirs if args.dry_run or (d / "lmprune.json").is_file()]
    if done:
        run(args.lmprune + ["compare", *done, "--out", str(root / "compare")], args, log)
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}", file=log)
        return 1
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    csv_list = lambda text: [x for x in text.split(",") if x]  # noqa: E731
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", type=csv_list, default=csv_list("magnitude,wanda,sparsegpt,alps,sparsellm"))
    p.add_argument("--sparsities", type=lambda t: [float(x) for x in csv_list(t)], default=[0.5, 0.6, 0.7, 0.8])
    p.add_argument("--allocations", type=csv_list, default=["uniform"], help="uniform,owl,alpha or FILE.json")
    p.add_argument("--patterns", type=csv_list, default=["unstructured"], help="e.g. unstructured,2:4")
    p.add_argument("--refines", type=csv_list, default=["none"], help="e.g. none,dsnot")
    p.add_argument("--calib", default=None, help="calibration data (default: the CLI's, c4)")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: the CLI's, 128)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (default: the CLI's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default="wikitext2,ptb,c4", help="perplexity datasets ('' for none)")
    p.add_argument("--eval-windows", type=int, default=20)
    p.add_argument("--eval-seqlen", type=int, default=None,
                   help="perplexity window length for every cell (default: --seqlen, else the CLI's)")
    p.add_argument("--tasks", default="", help=f"zero-shot tasks, comma-separated, or 'all' ({ALL_TASKS})")
    p.add_argument("--limit", type=int, default=None, help="documents per zero-shot task (default: all)")
    p.add_argument("--data-dir", default=os.environ.get("LMPRUNE_DATA_DIR"))
    p.add_argument("--root", default=str(Path(__file__).resolve().parent / "out" / "sweep"))
    p.add_argument("--threads", type=int, default=1, help="OMP/MKL threads per cell (the CPU is shared)")
    p.add_argument("--no-dense", action="store_true", help="no dense row")
    p.add_argument("--lmprune", type=shlex.split, default=None,
                   help="how to invoke the CLI (default: the `lmprune` script next to this Python)")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = p.parse_args(argv)
    if args.tasks == "all":
        args.tasks = ALL_TASKS
    if args.lmprune is None:
        script = Path(sys.executable).with_name("lmprune")
        args.lmprune = [str(script)] if script.exists() else [shutil.which("lmprune") or "lmprune"]
    return args


if __name__ == "__main__":
    sys.exit(sweep(parse_args()))
