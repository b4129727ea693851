"""bench/ as a tool: every grid file parses and expands to uniquely named cells, ``grid.py --dry-run`` prints the
CLI commands (nothing is pruned here), and ``tables.py`` reads run directories and JSON lines."""

from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
GRIDS = sorted((BENCH / "grids").glob("*.toml"))


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


grid = _module("grid")
tables = _module("tables")


def test_there_are_grid_files():
    assert {p.stem for p in GRIDS} >= {"foundation", "cpu70", "cpu_alps", "allocation", "issue4", "h200", "zeroshot"}


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_grid_expands_to_uniquely_named_cells(path):
    cells = grid.expand(grid.load_grid(path))
    names = [c["name"] for c in cells]
    assert names and len(names) == len(set(names))
    for cell in cells:
        if cell.get("kind") == "dense":
            continue
        assert 0 < cell["sparsity"] < 1 and cell["method"]
        assert grid.cell_name(cell) == cell["name"]
        cmd = grid.prune_command(cell, "MODEL", Path("ROOT") / cell["name"], [])
        assert cmd[:4] == [sys.executable, "-m", "lmprune.cli", "prune"]
        assert not any(str(part).startswith("/") for part in cmd[1:]), "no absolute path in a grid"


def test_grid_files_hold_no_absolute_paths():
    for path in GRIDS:
        for line in path.read_text().splitlines():
            code = line.split("#", 1)[0]
            assert '"/' not in code and "'/" not in code, f"{path.name}: {line}"


def test_issue4_grid_is_the_measured_one():
    cells = grid.expand(grid.load_grid(BENCH / "grids" / "issue4.toml"))
    assert len(cells) == 72 and sum(c.get("seed") == 0 for c in cells) == 48
    names = {c["name"] for c in cells}
    assert {"sparsellm@alps_uniform_2of4_first-half_seed0", "wanda+dsnot_uniform_s90_all_seed0",
            "sparsellm_uniform_s80_first-half_seed2"} <= names
    two_four = next(c for c in cells if c["name"] == "sparsegpt_uniform_2of4_all_seed0")
    assert (two_four["pattern"], two_four["sparsity"]) == ("2:4", 0.5)


def test_cell_names_follow_one_scheme():
    name = grid.cell_name({"method": "wanda", "refine": "dsnot", "allocation": "alpha", "alloc_opt": {"epsilon": 0.3},
                           "sparsity": 0.7, "seed": 1})
    assert name == "wanda+dsnot_alpha-e0.3_s70_all_seed1"
    assert grid.cell_name({"kind": "dense"}) == "dense"


def test_axes_cross_in_key_order_and_nm_collapses(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[settings]\nthreads = 1\n[[cells]]\nsparsity = [0.5, "2:4"]\nmethod = ["wanda", "sparsegpt"]\n'
                    '[[cells]]\nmethod = "wanda"\npattern = "2:4"\nsparsity = [0.6, 0.7]\n')
    names = [c["name"] for c in grid.expand(grid.load_grid(path))]
    assert names == ["wanda_uniform_s50_all_seed0", "sparsegpt_uniform_s50_all_seed0",
                     "wanda_uniform_2of4_all_seed0", "sparsegpt_uniform_2of4_all_seed0"]


def test_options_map_to_cli_flags():
    cell = {"name": "x", "method": "alps", "sparsity": 0.7, "threads": 2, "quiet": True, "eval_dense": False,
            "solver_opt": {"pcg_iters": 10}, "inner": ""}
    assert grid._options(cell, set()) == ["--method", "alps", "--sparsity", "0.7", "--quiet",
                                          "--solver-opt", "pcg_iters=10"]
    fields = grid._prune_fields({**cell, "eval": "wikitext2", "alloc_opt": {"epsilon": 0.3}}, "DATA")
    assert fields == {"method": "alps", "sparsity": 0.7, "solver_options": {"pcg_iters": 10},
                      "allocation_options": {"epsilon": 0.3}, "data_dir": "DATA"}


def _run_grid(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "grid.py"), *args], capture_output=True, text=True,
                          cwd=BENCH.parent)


def test_dry_run_prints_the_cli_commands(tmp_path):
    proc = _run_grid(str(BENCH / "grids" / "foundation.toml"), "--dry-run", "--root", str(tmp_path / "root"),
                     "--data-dir", "DATA")
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert len(commands) == 7
    dense, first = commands[0], commands[1]
    assert dense[1:4] == ["-m", "lmprune.cli", "eval"] and "--ppl" in dense
    assert first[1:4] == ["-m", "lmprune.cli", "prune"]
    opts = {flag: first[i + 1] for i, flag in enumerate(first[:-1]) if flag.startswith("--")}
    assert "--quiet" in first and opts["--method"] == "magnitude" and opts["--nsamples"] == "32" and opts["--data-dir"] == "DATA"
    assert opts["--out"] == str(tmp_path / "root" / "magnitude_uniform_s50_all_seed0")
    assert not (tmp_path / "root").exists()  # a dry run writes nothing


def test_finished_cells_are_skipped_and_only_filters(tmp_path):
    root = tmp_path / "root"
    done = root / "wanda_uniform_s50_all_seed0"
    done.mkdir(parents=True)
    (done / "lmprune.json").write_text(json.dumps({"method": "wanda", "sparsity": 0.5, "seed": 0,
                                                   "calibration": {"nsamples": 32}}))
    proc = _run_grid(str(BENCH / "grids" / "foundation.toml"), "--dry-run", "--root", str(root),
                     "--only", "wanda_*", "--set", "threads=1")
    assert proc.returncode == 0, proc.stderr
    assert "skip wanda_uniform_s50_all_seed0: finished" in proc.stdout
    assert proc.stdout.count("$ ") == 1 and "wanda_uniform_2of4_all_seed0" in proc.stdout


def test_tables_read_run_directories_and_their_jsonl(tmp_path, capsys):
    manifest = {"method": "sparsellm", "sparsity": 0.8, "pattern": "unstructured", "allocation": "uniform",
                "pruned_blocks": list(range(15)), "seed": 0, "time_s": 100.0, "solver_time_s": 60.0,
                "peak_rss_mb": 2000.0, "config": {"inner": "alps", "blocks": "first-half", "refine": "none"},
                "perplexity": {"wikitext2": 150.0, "eval_windows": 10, "seqlen": 1024}}
    run = tmp_path / "r"
    run.mkdir()
    (run / "lmprune.json").write_text(json.dumps(manifest))
    rows = tmp_path / "rows.jsonl"
    assert tables.main([str(run), str(tmp_path / "not-a-run"), "--jsonl", str(rows)]) == 0
    first = capsys.readouterr().out
    assert ("| sparsellm(alps) | uniform | first-half (blocks 0–14) | 80% | 150.0 | 100.0 | 60.0 | 40.0 | 2000.0 |"
            in first)
    assert tables.main([str(rows)]) == 0
    assert capsys.readouterr().out == first


def test_tables_regenerate_the_h200_table_of_results():
    """The GPU table of bench/RESULTS.md, from the raw rows kept in bench/results/."""
    runs = tables.read_inputs([str(BENCH / "results" / "h200_grid.jsonl"),
                               str(BENCH / "results" / "cpu_alps60_full.jsonl")])
    results = (BENCH / "RESULTS.md").read_text()
    lines = tables.device_view(runs)
    assert len(lines) == 33 and all(line in results for line in lines)


def test_tables_regenerate_the_allocation_table_of_results():
    runs = tables.read_inputs([str(BENCH / "results" / "allocation_cpu.jsonl")])
    results = (BENCH / "RESULTS.md").read_text()
    lines = [x for line in tables.allocation_view(runs) for x in line.split("\n") if x.strip()]
    assert all(line in results for line in lines)


def test_scale_tables_read_a_streamed_run(tmp_path, tiny_model_dirs, calib_file):
    """``bench/scale``'s per-block and whole-run tables on a real (tiny) streamed run's manifest."""
    blocks = _module("scale/blocks")
    whole_run = _module("scale/whole_run")
    model = tiny_model_dirs["llama"]
    out = tmp_path / "tiny" / "sparsegpt"
    proc = subprocess.run([sys.executable, "-m", "lmprune.cli", "prune", "--model", str(model), "--method",
                           "sparsegpt", "--sparsity", "0.5", "--stream", "--calib", str(calib_file), "--nsamples", "2",
                           "--seqlen", "16", "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    row = blocks.row(out, project_tokens=64)
    assert row.startswith("| tiny | sparsegpt | 32 |") and row.count("|") == 13
    assert float(row.split(" | ")[5]) >= 0  # the error reports of block 0, apart from the solves
    by_rank = blocks.rank_row(out).split(" | ")
    assert by_rank[:2] == ["| tiny", "sparsegpt"] and by_rank[2].startswith("1 × ")
    solve, error, load = float(by_rank[4]), float(by_rank[5]), float(by_rank[6].rstrip(" |"))
    assert load == pytest.approx(solve + error, abs=0.2)  # one rank owns every matrix
    lines = whole_run.table(out, per_block=out).splitlines()
    assert lines[2].startswith("| llama | sparsegpt | 1 × ") and "| 32 | 2 |" in lines[2]
    assert lines[2].endswith("| 0.5000 | ok |")
    assert "× 2 blocks" in lines[-1]


def test_scale_projection_leaves_out_a_solve_that_grows_with_tokens(tmp_path, tiny_model_dirs, calib_file):
    """SparseLLM's FFN problem passes over the tokens every round: its block is not projected by holding the solve
    fixed ("–"); ``ffn_tokens.fit`` gives the ``a + b·T`` that does project it."""
    blocks = _module("scale/blocks")
    ffn_tokens = _module("scale/ffn_tokens")
    out = tmp_path / "tiny" / "sparsellm"
    proc = subprocess.run([sys.executable, "-m", "lmprune.cli", "prune", "--model", str(tiny_model_dirs["llama"]),
                           "--method", "sparsellm", "--sparsity", "0.5", "--stream", "--calib", str(calib_file),
                           "--nsamples", "2", "--seqlen", "16", "--out", str(out), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert blocks.row(out, project_tokens=64).endswith("| – |")
    assert not blocks.row(out, project_tokens=None).endswith("| – |")
    a, b = ffn_tokens.fit({2048: 30.0, 8192: 48.0, 32768: 120.0})
    assert a == pytest.approx(24.0) and b == pytest.approx(18 / 6144)


def test_peak_where_reports_the_run_and_its_peak(tmp_path, tiny_model_dirs, calib_file):
    """``bench/scale/peak_where.py`` runs lmprune in its own process and names where it peaked."""
    proc = subprocess.run([sys.executable, str(BENCH / "scale" / "peak_where.py"), "prune", "--model",
                           str(tiny_model_dirs["llama"]), "--method", "wanda", "--sparsity", "0.5", "--calib",
                           str(calib_file), "--nsamples", "2", "--seqlen", "16", "--out", str(tmp_path / "run"),
                           "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    head = next(line for line in proc.stdout.splitlines() if line.startswith("rc ")).split()
    assert head[:2] == ["rc", "0"] and int(head[-1]) >= int(head[4]) > 0  # peak >= base
    assert (tmp_path / "run" / "lmprune.json").exists()
