"""Run a benchmark grid described by a data file (``bench/grids/*.toml``) through the ``lmprune`` command line.

    python bench/grid.py bench/grids/issue4.toml --dry-run            # list the commands, run nothing
    python bench/grid.py bench/grids/issue4.toml --list               # the cells' names
    python bench/grid.py bench/grids/issue4.toml --jobs 2             # two cells at a time
    python bench/grid.py bench/grids/issue4.toml --only 'sparsellm*_s80_first-half_*'
    python bench/grid.py bench/grids/h200.toml --in-process --set device=cuda   # one process, model loaded once

Every cell is a run directory ``ROOT/NAME`` (``ROOT``: ``--root``, default ``bench/out/<grid file stem>``). A cell
whose directory holds a finished run is skipped, so a grid resumes cell by cell; an interrupted ``lmprune prune``
resumes from its own checkpoint when the same command runs again. Each cell runs
``python -m lmprune.cli prune ...`` (``eval`` for the dense row) as a subprocess with ``OMP_NUM_THREADS`` set to
its ``threads``; a finished cell whose grid asks for zero-shot tasks it lacks gets
``lmprune eval --tasks ... --out CELL/zeroshot.json``. A grid's ``[compare]`` table ends the run with
``lmprune compare`` over its finished cells.

``--in-process`` runs the grid in this process instead (meant for a GPU, where a process per cell costs more
than the pruning): the model is loaded once with ``lmprune.load_model``, each cell restores the dense weights,
prunes with ``lmprune.prune`` and evaluates perplexity, and appends one JSON line per cell to ``ROOT/grid.jsonl``
(read by ``bench/tables.py``). Nothing is saved to disk in that mode.

The grid file (examples: ``bench/grids/*.toml``): ``[model]`` (``spec``; ``prepare``: a directory the spec is
converted into once, as an HF model, and then used), ``[settings]`` (CLI options of every cell) and
``[[cells]]`` tables. In a ``[[cells]]`` table a list value is an axis: the cells are the product of the axes,
the first key outermost; scalars (and tables) are fixed. Keys are the CLI's options with ``_`` for ``-``
(``eval_windows``), ``alloc_opt``/``solver_opt``/``method_opt``/``refine_opt`` tables, ``threads``, and
``kind = "dense"`` for the unpruned model's row. A ``sparsity`` of ``"2:4"`` means ``pattern = "2:4"``.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import os
import shlex
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from lmprune.report.runs import MANIFEST, ZEROSHOT_SIDECAR, load_run

REPO = Path(__file__).resolve().parents[1]

GRID_KEYS = {"kind", "threads"}  # keys the driver uses itself; every other key is a CLI option
OPTION_TABLES = {"alloc_opt": "allocation_options", "solver_opt": "solver_options", "method_opt": "method_options",
                 "refine_opt": "refine_options"}
EVAL_KEYS = {"eval", "eval_windows", "eval_seqlen", "tasks", "limit", "ppl_batch_size"}
PRUNE_ONLY = {"quiet", "eval_dense"}  # prune options that `lmprune eval` (the dense row) does not take


# --- the grid file --------------------------------------------------------------------------------------------

def load_grid(path: str | Path) -> dict[str, Any]:
    """The grid file's content, with ``name`` (the file's stem) added."""
    path = Path(path)
    with open(path, "rb") as f:
        grid = tomllib.load(f)
    grid.setdefault("name", path.stem)
    grid.setdefault("settings", {})
    grid.setdefault("model", {})
    if not grid.get("cells"):
        raise SystemExit(f"{path}: no [[cells]]")
    return grid


def _nm_sparsity(pattern: str) -> float:
    n, m = (int(x) for x in pattern.split(":"))
    return 1 - n / m


def _normalise(cell: dict[str, Any]) -> dict[str, Any]:
    """A ``sparsity`` given as "N:M" becomes that pattern; an N:M pattern fixes the sparsity at 1 − N/M."""
    cell = dict(cell)
    if isinstance(cell.get("sparsity"), str) and ":" in cell["sparsity"]:
        cell["pattern"] = cell.pop("sparsity")
    pattern = str(cell.get("pattern", "unstructured"))
    if ":" in pattern and pattern != "unstructured:row":
        cell["sparsity"] = round(_nm_sparsity(pattern), 6)
    return cell


def _setting_part(cell: dict[str, Any]) -> str:
    pattern = str(cell.get("pattern", "unstructured"))
    if ":" in pattern and pattern != "unstructured:row":
        return pattern.replace(":", "of")
    sparsity = f"s{round(100 * float(cell['sparsity'])):02d}"
    return sparsity if pattern == "unstructured" else f"{pattern.replace(':', '-')}-{sparsity}"


def _allocation_part(cell: dict[str, Any]) -> str:
    allocation = str(cell.get("allocation", "uniform"))
    name = Path(allocation).stem if allocation.endswith(".json") else allocation
    opts = cell.get("alloc_opt") or {}
    if "epsilon" in opts:
        name += f"-e{opts['epsilon']:g}"
    return name + "".join(f"-{k}{v}" for k, v in sorted(opts.items()) if k != "epsilon")


def cell_name(cell: dict[str, Any]) -> str:
    """The one naming scheme of every grid: ``METHOD[@INNER][+REFINE]_ALLOCATION_SETTING_BLOCKS_seedN``, e.g.
    ``sparsellm@alps_uniform_s80_first-half_seed0`` or ``wanda+dsnot_alpha-e0.3_2of4_all_seed1``;
    ``dense`` for the unpruned model."""
    if cell.get("kind") == "dense":
        return "dense"
    method = str(cell["method"])
    for key, value in sorted((cell.get("method_opt") or {}).items()):  # sparsellm-paper, sparsellm-rounds1
        method += f"-{value}" if key == "preset" else f"-{key}{value}"
    if cell.get("inner"):
        method += f"@{cell['inner']}"
    if cell.get("refine", "none") != "none":
        method += f"+{cell['refine']}"
    blocks = str(cell.get("blocks", "all")).replace(",", ".")
    return f"{method}_{_allocation_part(cell)}_{_setting_part(cell)}_{blocks}_seed{cell.get('seed', 0)}"


def expand(grid: dict[str, Any], overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every cell of the grid in order: ``{"name": ..., **settings}`` (settings, then the cell's own keys, then
    ``overrides``). Two cells with one name must be the same cell (an N:M pattern crossed with several sparsities
    collapses into one); otherwise it is an error."""
    cells: dict[str, dict[str, Any]] = {}
    for spec in grid["cells"]:
        axes = [(k, v) for k, v in spec.items() if isinstance(v, list)]
        fixed = {k: v for k, v in spec.items() if not isinstance(v, list)}
        for values in itertools.product(*(v for _, v in axes)):
            cell = _normalise({**grid["settings"], **fixed, **dict(zip((k for k, _ in axes), values)),
                               **(overrides or {})})
            name = cell_name(cell)
            if name in cells and cells[name] != cell:
                raise SystemExit(f"grid {grid['name']}: two different cells are named {name}")
            cells[name] = cell
    return [{"name": name, **cell} for name, cell in cells.items()]


# --- commands -------------------------------------------------------------------------------------------------

def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _options(cell: dict[str, Any], skip: set[str]) -> list[str]:
    """CLI options from a cell's keys: ``True`` is a bare flag, ``False``/``None`` nothing, a table of options
    one ``--x-opt key=value`` each."""
    out: list[str] = []
    for key, value in cell.items():
        if key in skip or key in GRID_KEYS or key == "name" or value is None or value is False or value == "":
            continue
        if isinstance(value, dict):
            out += [x for k, v in value.items() for x in (_flag(key), f"{k}={v}")]
        elif value is True:
            out.append(_flag(key))
        else:
            out += [_flag(key), f"{value:g}" if isinstance(value, float) else str(value)]
    return out


def prune_command(cell: dict[str, Any], model: str, out: Path, common: list[str]) -> list[str]:
    return [sys.executable, "-m", "lmprune.cli", "prune", "--model", model, *_options(cell, {"model", "ppl_batch_size"}),
            "--out", str(out), *common]


def dense_command(cell: dict[str, Any], model: str, out_file: Path, common: list[str]) -> list[str]:
    """``lmprune eval`` of the unpruned model with the grid's evaluation settings."""
    cmd = [sys.executable, "-m", "lmprune.cli", "eval", "--model", model]
    if cell.get("eval"):
        cmd += ["--ppl", cell["eval"]]
        cmd += ["--eval-windows", str(cell["eval_windows"])] if cell.get("eval_windows") else []
        seqlen = cell.get("eval_seqlen") or cell.get("seqlen")
        cmd += ["--seqlen", str(seqlen)] if seqlen else []
    cmd += _zeroshot_options(cell)
    cmd += ["--ppl-batch-size", str(cell["ppl_batch_size"])] if cell.get("ppl_batch_size") else []
    cmd += ["--device", cell["device"]] if cell.get("device") else []
    return cmd + ["--out", str(out_file), *common]


def _zeroshot_options(cell: dict[str, Any]) -> list[str]:
    if not cell.get("tasks"):
        return []
    return ["--tasks", cell["tasks"]] + (["--limit", str(cell["limit"])] if cell.get("limit") else [])


def zeroshot_command(cell: dict[str, Any], run_dir: Path, common: list[str]) -> list[str]:
    device = ["--device", cell["device"]] if cell.get("device") else []
    return [sys.executable, "-m", "lmprune.cli", "eval", "--model", str(run_dir), *_zeroshot_options(cell),
            *device, "--out", str(run_dir / ZEROSHOT_SIDECAR), *common]


def write_dense_manifest(run_dir: Path, evaluation: dict[str, Any], cell: dict[str, Any], seconds: float) -> None:
    """The dense row as a run manifest (the keys the report's run reader uses)."""
    manifest = {
        "method": "dense", "sparsity": 0.0, "pattern": "-", "allocation": "-", "achieved_sparsity": 0.0,
        "layers": [], "model": {"spec": cell.get("model")},
        "perplexity": evaluation.get("perplexity", {}), "zeroshot": evaluation.get("zeroshot", {}),
        "time_s": 0.0, "eval_time_s": round(seconds, 1), "peak_rss_mb": None,
    }
    (run_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))


# --- in one process -------------------------------------------------------------------------------------------

def _prune_fields(cell: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    """``lmprune.prune`` keywords from a cell (the CLI's option names, option tables under the config's names)."""
    skip = GRID_KEYS | EVAL_KEYS | PRUNE_ONLY | {"name", "model"}
    fields = {OPTION_TABLES.get(k, k): v for k, v in cell.items() if k not in skip and v not in (None, "")}
    return {**fields, "data_dir": data_dir}


def _evaluate(model: Any, tokenizer: Any, cell: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    from lmprune.evaluation.perplexity import EvalSpec, perplexity

    out: dict[str, Any] = {"eval_windows": cell.get("eval_windows"), "seqlen": cell.get("eval_seqlen") or cell.get("seqlen"),
                           "windows": {}}
    for dataset in [d for d in str(cell.get("eval") or "").split(",") if d]:
        spec = EvalSpec(dataset, out["seqlen"], cell.get("eval_windows"), cell.get("ppl_batch_size", 1))
        result = perplexity(model, tokenizer, spec, data_dir, cell.get("device", "cpu"), False)
        out[dataset], out["windows"][dataset] = result.perplexity, result.windows
    return out


def _cell_row(cell: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """The JSON line of a pruned cell: the manifest's fields the tables read, per-matrix records left out."""
    errors = [r["rel_error"] for r in manifest.get("layers", [])]
    keep = {k: v for k, v in manifest.items() if k not in ("layers", "resolved_options", "block_times_s")}
    return {**keep, "mean_rel_error": sum(errors) / len(errors) if errors else None}


def run_in_process(cells: list[dict[str, Any]], model_spec: str, root: Path, data_dir: str | None,
                   budget_s: float) -> int:
    """The grid in this process: load once, restore the dense weights before each cell, prune with
    ``lmprune.prune``, evaluate, append a JSON line to ``ROOT/grid.jsonl``; cells already there are skipped."""
    import torch

    import lmprune

    torch.backends.cuda.matmul.allow_tf32 = False  # every solve in true float32, as on the CPU
    torch.backends.cudnn.allow_tf32 = False
    root.mkdir(parents=True, exist_ok=True)
    out = root / "grid.jsonl"
    done = {json.loads(line)["name"] for line in out.read_text().splitlines()} if out.is_file() else set()
    start = time.perf_counter()
    model, tokenizer, _ = lmprune.load_model(model_spec)
    device = cells[0].get("device", "cpu") if cells else "cpu"
    model.to(device).eval()
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    print(f"loaded {model_spec} in {time.perf_counter() - start:.1f} s", flush=True)
    for cell in cells:
        if cell["name"] in done:
            print(f"skip {cell['name']}: in {out}", flush=True)
            continue
        if time.perf_counter() - start > budget_s:
            print(f"budget of {budget_s} s spent; stopping before {cell['name']}", flush=True)
            break
        model.load_state_dict(dense)
        cuda = str(cell.get("device", "cpu")).startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        row: dict[str, Any] = {"name": cell["name"], "cell": cell, "device": cell.get("device", "cpu")}
        t0 = time.perf_counter()
        try:
            if cell.get("kind") == "dense":
                row.update({"method": "dense", "sparsity": 0.0})
            else:
                row.update(_cell_row(cell, lmprune.prune(model, tokenizer, progress=False,
                                                         **_prune_fields(cell, data_dir))))
            t_eval = time.perf_counter()
            row["perplexity"] = _evaluate(model, tokenizer, cell, data_dir)
            row["eval_s"] = time.perf_counter() - t_eval
        except Exception as e:  # one broken cell must not lose the others; the error is recorded with it
            row["error"] = f"{type(e).__name__}: {e}"
        row["cell_s"] = time.perf_counter() - t0
        if cuda:
            row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: row.get(k) for k in ("name", "perplexity", "time_s", "cell_s", "error")}), flush=True)
    return 0


# --- running --------------------------------------------------------------------------------------------------

class Runner:
    """Runs (or, dry, prints) the commands of a grid's cells under one root."""

    def __init__(self, root: Path, model: str, data_dir: str | None, dry_run: bool):
        self.root, self.model, self.dry_run = root, model, dry_run
        self.common = ["--data-dir", data_dir] if data_dir else []

    def _run(self, cmd: list[str], cell: dict[str, Any]) -> bool:
        print("$ " + shlex.join(cmd), flush=True)
        if self.dry_run:
            return True
        threads = str(cell.get("threads", 1))
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, HF_HUB_OFFLINE="1")
        code = subprocess.run(cmd, env=env).returncode
        if code:
            print(f"  {cell['name']}: exit status {code}", flush=True)
        return code == 0

    def run_cell(self, cell: dict[str, Any]) -> str | None:
        """Run one cell unless it is finished; the cell's name when something failed, else None."""
        out = self.root / cell["name"]
        model = str(cell.get("model") or self.model)
        if (out / MANIFEST).is_file():
            problem = mismatch(out, cell)
            if problem:
                print(f"skip {cell['name']}: {out} holds another run ({problem})", flush=True)
                return cell["name"]
            print(f"skip {cell['name']}: finished", flush=True)
        elif cell.get("kind") == "dense":
            if not self.dry_run:
                out.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            if not self._run(dense_command(cell, model, out / "eval.json", self.common), cell):
                return cell["name"]
            if not self.dry_run:
                evaluation = json.loads((out / "eval.json").read_text())
                write_dense_manifest(out, evaluation, {**cell, "model": model}, time.perf_counter() - start)
            return None
        elif not self._run(prune_command(cell, model, out, self.common), cell):
            return cell["name"]
        if cell.get("tasks") and (out / MANIFEST).is_file() and not load_run(out).zeroshot:
            if not self._run(zeroshot_command(cell, out, self.common), cell):  # pruned earlier without tasks
                return cell["name"] + " (zero-shot)"
        return None

    def compare(self, spec: dict[str, Any], cells: list[dict[str, Any]]) -> bool:
        patterns = spec.get("cells", ["*"])
        chosen = [c["name"] for c in cells if any(fnmatch.fnmatchcase(c["name"], p) for p in patterns)]
        dirs = [str(self.root / n) for n in chosen if self.dry_run or (self.root / n / MANIFEST).is_file()]
        if not dirs:
            return True
        cmd = [sys.executable, "-m", "lmprune.cli", "compare", *dirs, "--out", str(self.root / spec.get("out", "compare"))]
        return self._run(cmd, {"name": "compare"})


def mismatch(run_dir: Path, cell: dict[str, Any]) -> str | None:
    """What differs between a finished run directory and the cell that would have made it (None: nothing)."""
    run = load_run(run_dir)
    if cell.get("kind") == "dense":
        return None if run.is_dense else f"method {run.method}"
    wanted = {"method": cell["method"], "sparsity": float(cell["sparsity"]), "seed": cell.get("seed"),
              "nsamples": cell.get("nsamples"), "refiner": cell.get("refine", "none")}
    found = {"method": run.base_method, "sparsity": run.sparsity, "seed": run.seed, "nsamples": run.nsamples,
             "refiner": run.refiner}
    diffs = [f"{k} {found[k]} ≠ {v}" for k, v in wanted.items()
             if v is not None and found[k] is not None and found[k] != v]
    return ", ".join(diffs) or None


def prepare_model(spec: dict[str, Any]) -> str:
    """The model every cell uses: ``spec``, or the HF directory ``prepare`` that it is converted into once (a GGUF
    dequantised once loads in seconds)."""
    target = spec.get("prepare")
    if not target:
        return str(spec.get("spec", "smollm2-135m"))
    out = Path(target) if Path(target).is_absolute() else REPO / target
    if not (out / "config.json").is_file():
        import lmprune

        print(f"converting {spec['spec']} into {out} (once)", flush=True)
        model, tokenizer, source = lmprune.load_model(spec["spec"])
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "SOURCE").write_text(f"{source.spec} {source.path} sha256={source.sha256}\n")
    return str(out)


def default_data_dir() -> str | None:
    """``$LMPRUNE_DATA_DIR``, else ``../shared/data`` beside the repository when it exists, else the CLI's."""
    if os.environ.get("LMPRUNE_DATA_DIR"):
        return os.environ["LMPRUNE_DATA_DIR"]
    beside = REPO.parent / "shared" / "data"
    return os.path.relpath(beside) if beside.is_dir() else None


def _value(text: str) -> Any:
    """A ``--set`` value as TOML reads it (numbers, booleans, strings with or without quotes)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="a grid file, e.g. bench/grids/issue4.toml")
    p.add_argument("--root", help="output root (default: bench/out/<grid name>)")
    p.add_argument("--data-dir", default=None, help="default: $LMPRUNE_DATA_DIR, else ../shared/data if present")
    p.add_argument("--model", help="use this model instead of the grid's [model]")
    p.add_argument("--only", action="append", metavar="GLOB", help="cells whose name matches (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of every cell, e.g. --set threads=2 --set device=cuda")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (each with its own threads)")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    p.add_argument("--list", action="store_true", help="print the cells' names and exit")
    p.add_argument("--in-process", action="store_true", help="one process, model loaded once (see above)")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="--in-process: start no cell after this")
    return p.parse_args(argv)


def select(cells: list[dict[str, Any]], only: list[str] | None) -> list[dict[str, Any]]:
    if not only:
        return cells
    globs = [g for item in only for g in item.split(",") if g]
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c["name"], g) for g in globs)]
    if not chosen:
        raise SystemExit(f"--only {' '.join(only)}: no cell of the grid matches")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grid = load_grid(args.grid)
    overrides = dict(item.split("=", 1) for item in args.set)
    cells = select(expand(grid, {k: _value(v) for k, v in overrides.items()}), args.only)
    if args.list:
        print("\n".join(c["name"] for c in cells))
        return 0
    root = Path(args.root) if args.root else Path(os.path.relpath(REPO / "bench" / "out" / grid["name"]))
    data_dir = args.data_dir or default_data_dir()
    if args.in_process:
        model = args.model or grid["model"].get("spec", "smollm2-135m")
        return run_in_process(cells, model, root, data_dir, args.budget_s)
    model = args.model or (str(grid["model"].get("prepare") or grid["model"].get("spec", "smollm2-135m"))
                           if args.dry_run else prepare_model(grid["model"]))
    runner = Runner(root, model, data_dir, args.dry_run)
    if not args.dry_run:
        root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        failed = [f for f in pool.map(runner.run_cell, cells) if f]
    if grid.get("compare") and not args.only and not runner.compare(grid["compare"], cells):
        failed.append("compare")
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
