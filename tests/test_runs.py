"""The report's one run reader (``lmprune.report.runs``) and the report package's import structure."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmprune.report.runs import Run, load_run, load_runs

REPORT_DIR = Path(__file__).resolve().parents[1] / "src" / "lmprune" / "report"


def _write(root: Path, name: str, manifest: dict) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "lmprune.json").write_text(json.dumps(manifest))
    return run


def _current_manifest() -> dict:
    """A manifest with the keys the current lmprune writes (the ones the reader uses)."""
    return {
        "method": "sparsellm", "sparsity": 0.8, "pattern": "unstructured", "allocation": "alpha",
        "achieved_sparsity": 0.8001, "pattern_ok": True, "pruned_blocks": list(range(15)), "n_blocks": 30,
        "layers": [{"name": "model.layers.0.mlp.down_proj", "shape": [4, 8], "sparsity": 0.8, "rel_error": 0.02},
                   {"name": "model.layers.1.mlp.down_proj", "shape": [4, 8], "sparsity": 0.8, "rel_error": 0.04}],
        "allocation_detail": {"method": "alpha", "time_s": 0.1},
        "time_s": 120.0, "time_this_process_s": 80.0, "calibration_time_s": 90.0, "solver_time_s": 20.0,
        "block_times_s": [40.0, 40.0], "resumed_from_block": 1, "seed": 2,
        "calibration": {"source": "c4", "nsamples": 32, "seqlen": 512},
        "config": {"method": "sparsellm", "inner": "alps", "refine": "dsnot", "blocks": "first-half",
                   "allocation_options": {"epsilon": 0.3}, "seed": 2, "nsamples": 32, "seqlen": 512,
                   "device": "cpu"},
        "perplexity": {"wikitext2": 150.0, "ptb": 230.0, "eval_windows": 10, "seqlen": 1024,
                       "details": {"wikitext2": {"perplexity": 150.0}}},
        "peak_rss_mb": 2900.0, "world_size": 2, "versions": {"torch_threads": "1"},
        "created": "2026-12-06T00:00:00+00:00",
    }


def test_reader_takes_inner_solver_block_set_seed_and_calibration(tmp_path):
    run = load_run(_write(tmp_path, "sllm", _current_manifest()))
    assert (run.name, run.method, run.base_method, run.refiner, run.inner) == (
        "sllm", "sparsellm+dsnot", "sparsellm", "dsnot", "alps")
    assert run.method_label == "sparsellm(alps)+dsnot"
    assert run.label == "sparsellm(alps+dsnot, +down refit, +best round) + alpha(peak)"  # report/labels.py
    assert (run.blocks, run.blocks_label) == ("first-half", "first-half (blocks 0–14)")
    assert (run.seed, run.nsamples, run.calib_seqlen) == (2, 32, 512)
    assert run.perplexity == {"wikitext2": 150.0, "ptb": 230.0}
    assert (run.eval_windows, run.seqlen) == (10, 1024)
    assert run.setting == "80%" and not run.is_nm
    assert run.mean_rel_error == pytest.approx(0.03)
    assert (run.world_size, run.threads, run.allocation_time_s) == (2, 1, 0.1)
    assert run.wall_time == (120.0, False)  # time_this_process_s present: time_s is already the whole cost


def test_old_manifest_without_newer_keys_reads_with_defaults(tmp_path):
    old = {"method": "wanda", "sparsity": 0.5, "pattern": "2:4", "allocation": "uniform", "achieved_sparsity": 0.5,
           "layers": [], "perplexity": {"wikitext2": 40.0}, "time_s": 10.0, "peak_rss_mb": 1000.0}
    run = load_run(_write(tmp_path, "old", old))
    assert (run.inner, run.refiner, run.blocks, run.seed, run.nsamples, run.world_size) == (
        None, "none", "all", None, None, 1)
    assert run.method_label == "wanda" and run.label == "wanda"
    assert run.setting == "2:4" and run.is_nm
    assert run.eval_windows is None and run.mean_rel_error is None


def test_inner_solver_is_only_named_for_block_methods(tmp_path):
    m = {"method": "sparsegpt", "sparsity": 0.7, "config": {"inner": "sparsegpt", "refine": "none"}}
    assert load_run(_write(tmp_path, "s", m)).method_label == "sparsegpt"


def test_resumed_run_of_an_older_lmprune_takes_its_time_from_the_blocks(tmp_path):
    m = {"method": "sparsegpt", "sparsity": 0.7, "time_s": 50.0, "resumed_from_block": 3,
         "block_times_s": [10.0, 20.0, 30.0]}
    assert load_run(_write(tmp_path, "r", m)).wall_time == (60.0, True)


def test_load_runs_skips_unfinished_directories_when_asked(tmp_path):
    done = _write(tmp_path, "done", {"method": "wanda", "sparsity": 0.5})
    (tmp_path / "partial").mkdir()
    assert [r.name for r in load_runs([done, tmp_path / "partial"], skip_unfinished=True)] == ["done"]
    with pytest.raises(ValueError, match="no lmprune.json"):
        load_runs([done, tmp_path / "partial"])


def test_run_is_the_same_class_compare_uses():
    from lmprune.report import compare

    assert compare.Run is Run and compare.load_run is load_run


# --- import structure -----------------------------------------------------------------------------------------

def _report_imports(module: Path) -> set[str]:
    """The report modules ``module`` imports (relative or absolute), at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith("lmprune.report."):
                found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("lmprune.report.")}
    return {name.split(".")[0] for name in found}


def test_report_has_no_import_cycle():
    modules = {p.stem: p for p in REPORT_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {name: _report_imports(path) & set(modules) for name, path in modules.items()}
    assert graph["labels"] == set(), "labels.py names a configuration from a manifest alone"
    assert graph["runs"] <= {"labels"}, "runs.py is the bottom of the report but for the configuration labels"
    assert "compare" not in graph["plots"]

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import cycle: {' -> '.join(stack + (name,))}"
        for dep in graph[name]:
            visit(dep, stack + (name,))

    for name in graph:
        visit(name, ())


def test_report_imports_no_higher_layer():
    higher = ("api", "engine", "cli", "checkpoint", "streaming", "pipeline", "run")
    for path in REPORT_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                assert node.module.split(".")[0] not in higher, f"{path.name} imports ..{node.module}"
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lmprune."):
                assert node.module.split(".")[1] not in higher, f"{path.name} imports {node.module}"


@pytest.mark.parametrize("module", sorted(p.stem for p in REPORT_DIR.glob("*.py")))
def test_each_report_module_imports_alone(module):
    code = f"import lmprune.report.{module}" if module != "__init__" else "import lmprune.report"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
