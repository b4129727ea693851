"""Per-block cost of pruning at real shapes, streamed (issue 18): one ``lmprune prune --stream`` run per
(shape, method) on a model built by ``bench/scale/shapes.py`` with few blocks, and a Markdown table of what one
block costs: calibration passes, solves, the block's wall time, peak RSS against the ``--dry-run`` plan, and
the checkpoint written after it (bytes, seconds). ``--ranks`` prints block 0 by rank instead: solves and
error reports summed, and each rank's share of them.

    python bench/scale/blocks.py /work/scale/llama2-7b-2 --methods sparsegpt,wanda --nsamples 4 --seqlen 2048
    python bench/scale/blocks.py /work/scale/*/ --table          # the table of every finished cell
    python bench/scale/blocks.py /work/scale/llama2-7b-2 --methods sparsegpt --nproc 2 --ranks   # two ranks

Every cell is ``ROOT/<model dir name>/<method>`` (``--root``, default ``bench/out/scale``); a cell with a
``lmprune.json`` is skipped, so the benchmark resumes cell by cell. Each run prunes block 0 only
(``--blocks 0``) and propagates the others dense, at ``--threads`` threads (``OMP_NUM_THREADS``). With
``--project TOKENS``, the table adds the whole-model time at ``TOKENS`` calibration tokens per block and the
model's published block count: calibration passes scale with the tokens, solves and error reports do not (runs
made before the records carried the error reports' time show "–" there and project without them). A block whose
solve itself passes over the tokens (SparseLLM's FFN problem: every round multiplies ``tokens x d_ff`` arrays) is
not projected ("–"): one token count cannot split its time into the part that grows with the tokens and the part
that does not (``ffn_tokens.py`` measures that split). ``--scale-to SHAPE,...`` adds rows for shapes that were not
run, scaled from each measured cell by FLOPs (labelled as such): a block's passes by its parameter count, its
layer-wise solves by ``Σ (in³ + out·in²)`` over its matrices (the inverse-Hessian factorisation and the column
sweep or ADMM products), its error reports by ``Σ out·in²`` (one product with the Gram matrix each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Published block counts, for the whole-model projection.
FULL_BLOCKS = {"llama2-7b": 32, "llama2-13b": 40, "llama3-8b": 32, "llama3-70b": 80}


def streamed_prune(model: Path, method: str, out: Path, args: argparse.Namespace, *extra: str) -> list[str]:
    """The ``lmprune prune`` command of a scale benchmark: streamed, bf16, C4 calibration of ``args.nsamples`` ×
    ``args.seqlen`` tokens on ``args.device``, then ``extra`` flags."""
    cmd = [sys.executable, "-m", "lmprune.cli", "prune", "--model", str(model), "--method", method, "--stream",
           "--calib", "c4", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--dtype", "bfloat16",
           "--device", args.device, "--out", str(out), "--quiet", *extra]
    return cmd + (["--data-dir", args.data_dir] if args.data_dir else [])


def plan_text(m: dict) -> str:
    """The manifest's dry-run peak: host MiB, with the device's when the plan has one."""
    plan = m.get("memory_plan") or {}
    host = plan.get("peak_host_mib", "–")
    return f"{host} (GPU {plan['peak_device_mib']})" if plan.get("peak_device_mib") else str(host)


def run_cell(model: Path, method: str, out: Path, args: argparse.Namespace) -> None:
    if (out / "lmprune.json").exists():
        print(f"skip {out}: finished")
        return
    ranks = ["--nproc", str(args.nproc)] if args.nproc > 1 else []
    cmd = streamed_prune(model, method, out, args, "--sparsity", "0.5", "--blocks", "0", *ranks)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=False)


def _shape(cell: Path) -> dict:
    """The ``shape.json`` that ``bench/scale/shapes.py`` wrote for the cell's model ({} when there is none)."""
    path = cell.parent / "shape.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _solve_grows_with_tokens(layers: list[dict]) -> bool:
    """Does the block's solve pass over the calibration tokens (SparseLLM's FFN problem records its rounds)?"""
    return any("sparsellm_rounds_run" in r["stats"] for r in layers)


def row(cell: Path, project_tokens: int | None) -> str | None:
    path = cell / "lmprune.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    shape = _shape(cell)
    layers = [r for r in m["layers"] if r["block"] == 0]
    solve = sum(r["time_s"] for r in layers)
    reports = [r["error_time_s"] for r in layers if "error_time_s" in r]
    report = sum(reports) if reports else None  # runs before the records carried it: "–"
    # block 0's passes (statistics, then propagation): the run's calibration time less the later blocks, which
    # are only propagated (their wall time is one pass and a shard write, so this slightly undercounts block 0)
    calib = m["calibration_time_s"] - sum(m["block_times_s"][1:])
    block0 = m["block_times_s"][0]
    io = m.get("checkpoint_io") or {}
    per_block = (io.get("per_block") or [{}])[0]
    tokens = m["calibration"]["nsamples"] * m["calibration"]["seqlen"]
    peak = f"{m['peak_rss_mb']:.0f}" + (f" (GPU {m['peak_cuda_mb']:.0f})" if m.get("peak_cuda_mb") else "")
    out = (f"| {shape.get('shape', cell.parent.name)} | {m['method']} | {tokens} | {calib:.1f} | {solve:.1f} | "
           f"{'–' if report is None else f'{report:.1f}'} | {block0:.1f} | {peak} | {plan_text(m)} | "
           f"{per_block.get('bytes', 0) / 2**20:.0f} | {per_block.get('seconds', float('nan')):.1f} |")
    if project_tokens and _solve_grows_with_tokens(layers):
        out += " – |"
    elif project_tokens:
        blocks = FULL_BLOCKS.get(shape.get("shape", ""), m["n_blocks"])
        whole = blocks * (calib * project_tokens / tokens + solve + (report or 0.0))
        out += f" {whole / 3600:.1f} |"
    return out


def rank_row(cell: Path) -> str | None:
    """Block 0 of a cell by rank: its wall time, the solves and the error reports summed over matrices, and each
    rank's share of both (from the records' ``owner_rank``; "–" for runs made before records carried it)."""
    path = cell / "lmprune.json"
    if not path.exists():
        return None
    m = json.loads(path.read_text())
    layers = [r for r in m["layers"] if r["block"] == 0]
    world = m.get("world_size", 1)
    solve = sum(r["time_s"] for r in layers)
    error = sum(r.get("error_time_s", 0.0) for r in layers) if all("error_time_s" in r for r in layers) else None
    load = [0.0] * world
    owned = all("owner_rank" in r["stats"] for r in layers) and error is not None
    for r in layers if owned else []:
        load[r["stats"]["owner_rank"]] += r["time_s"] + r["error_time_s"]
    shape = _shape(cell).get("shape", cell.parent.name)
    return (f"| {shape} | {cell.name} | {world} × {m['versions'].get('torch_threads', '?')} | "
            f"{m['block_times_s'][0]:.1f} | {solve:.1f} | {'–' if error is None else f'{error:.1f}'} | "
            f"{' / '.join(f'{x:.1f}' for x in load) if owned else '–'} |")


def rank_table(cells: list[Path]) -> str:
    head = ("| shape | cell | ranks × threads | block 0 wall (s) | solves, summed (s) | error reports, summed (s) "
            "| solve + error per rank (s) |\n|---|---|---|---:|---:|---:|---|")
    return "\n".join([head, *(r for r in map(rank_row, cells) if r)])


def _matrices(shape: dict) -> list[tuple[int, int]]:
    """``(out, in)`` of one LLaMA block's seven matrices."""
    d, ff = shape["hidden_size"], shape["intermediate_size"]
    kv = d // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)]


def scaled_rows(cells: list[Path], targets: list[str], project_tokens: int) -> list[str]:
    """Whole-model hours at ``project_tokens`` for shapes not run, from each measured cell scaled by FLOPs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from shapes import SHAPES

    rows = []
    for cell in cells:
        path = cell / "lmprune.json"
        measured = json.loads((cell.parent / "shape.json").read_text()).get("shape") if path.exists() else None
        if measured not in SHAPES:
            continue
        m = json.loads(path.read_text())
        layers = [r for r in m["layers"] if r["block"] == 0]
        if _solve_grows_with_tokens(layers):
            continue
        solve = sum(r["time_s"] for r in layers)
        report = sum(r.get("error_time_s", 0.0) for r in layers)
        calib = m["calibration_time_s"] - sum(m["block_times_s"][1:])
        tokens = m["calibration"]["nsamples"] * m["calibration"]["seqlen"]
        src = _matrices(SHAPES[measured])
        params = sum(o * i for o, i in src)
        cubic = sum(i**3 + o * i * i for o, i in src)
        product = sum(o * i * i for o, i in src)
        for target in targets:
            dst = _matrices(SHAPES[target])
            t_calib = calib * sum(o * i for o, i in dst) / params * project_tokens / tokens
            t_solve = solve * sum(i**3 + o * i * i for o, i in dst) / cubic
            t_report = report * sum(o * i * i for o, i in dst) / product
            hours = SHAPES[target]["num_hidden_layers"] * (t_calib + t_solve + t_report) / 3600
            rows.append(f"| {target} (scaled from {measured} by FLOPs) | {m['method']} | {project_tokens} | "
                        f"{t_calib:.0f} | {t_solve:.0f} | {t_report:.0f} | {hours:.1f} |")
    return rows


def table(cells: list[Path], project_tokens: int | None) -> str:
    head = ("| shape | method | calib tokens | calibration passes, block 0 (s) | solves, block 0 (s) "
            "| error reports, block 0 (s) | block 0 wall (s) | peak RSS (MiB) | dry-run peak (MiB) "
            "| checkpoint after block 0 (MiB) | its write (s) |")
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if project_tokens:
        head += f" whole model at {project_tokens} tokens, projected (h) |"
        sep += "---:|"
    rows = [r for r in (row(c, project_tokens) for c in cells) if r]
    return "\n".join([head, sep, *rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="model directories from bench/scale/shapes.py")
    ap.add_argument("--methods", default="sparsegpt,wanda")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each rank")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (cells are then named METHOD-npN)")
    ap.add_argument("--ranks", action="store_true", help="print the per-rank table of block 0 instead")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (peak GPU memory then joins the table)")
    ap.add_argument("--root", type=Path, default=REPO / "bench" / "out" / "scale")
    ap.add_argument("--data-dir", default=os.environ.get("LMPRUNE_DATA_DIR"))
    ap.add_argument("--table", action="store_true", help="print the table of finished cells, run nothing")
    ap.add_argument("--project", type=int, default=None, metavar="TOKENS")
    ap.add_argument("--scale-to", default="", metavar="SHAPE,...",
                    help="with --project: FLOP-scaled whole-model projections for these shapes")
    args = ap.parse_args()
    cells = []
    for model in args.models:
        root = args.root / model.name
        root.mkdir(parents=True, exist_ok=True)
        if (model / "shape.json").exists() and not (root / "shape.json").exists():
            (root / "shape.json").write_text((model / "shape.json").read_text())
        for method in args.methods.split(","):
            cell = root / (method if args.nproc == 1 else f"{method}-np{args.nproc}")
            cells.append(cell)
            if not args.table:
                run_cell(model, method, cell, args)
    if args.ranks:
        print(rank_table(cells))
        return 0
    print(table(cells, args.project))
    if args.project and args.scale_to:
        print("\n| shape | method | calib tokens per block | calibration passes per block (s) | solves per block (s) "
              "| error reports per block (s) | whole model, projected (h) |\n|---|---|---:|---:|---:|---:|---:|")
        print("\n".join(scaled_rows(cells, args.scale_to.split(","), args.project)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
