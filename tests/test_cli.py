"""The command line end to end on tiny saved models, and every bad input of the foundation issue."""

import json
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from lmprune.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmprune.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def prune_args(tiny_model_dirs, calib_file):
    def make(out, family="llama", **over):
        opts = {"--model": tiny_model_dirs[family], "--method": "sparsegpt", "--sparsity": "0.5", "--out": out,
                "--calib": calib_file, "--nsamples": "2", "--seqlen": "32", **over}
        args = ["prune", "--quiet"]
        for k, v in opts.items():
            if v is not None:
                args += [k, str(v)]
        return args
    return make


def test_prune_end_to_end(tmp_path, prune_args, data_dir, capsys):
    out = tmp_path / "run"
    assert main(prune_args(out, **{"--eval": "wikitext2,ptb", "--eval-windows": "2", "--eval-dense": None}) + ["--eval-dense"]) == 0
    m = json.loads((out / "lmprune.json").read_text())
    for key in ("method", "sparsity", "pattern", "allocation", "achieved_sparsity", "layers", "perplexity", "time_s",
                "peak_rss_mb"):
        assert key in m
    assert m["perplexity"]["eval_windows"] == 2 and m["perplexity"]["seqlen"] == 32
    assert set(m["perplexity"]) >= {"wikitext2", "ptb"} and m["dense_perplexity"]["wikitext2"] > 0
    assert len(m["layers"]) == 14 and all({"name", "shape", "sparsity", "rel_error"} <= set(r) for r in m["layers"])
    assert m["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert m["reload_check"]["ok"]
    assert (out / "report.md").read_text().startswith("# lmprune run")
    assert (out / "layers.png").is_file() and (out / "allocation.png").is_file()
    alloc = json.loads((out / "allocation.json").read_text())
    assert all(m["achieved"] == pytest.approx(0.5, abs=1e-3) for m in alloc["matrices"])
    again = tmp_path / "again"
    assert main(prune_args(again, **{"--allocation": out / "allocation.json"})) == 0
    assert json.loads((again / "lmprune.json").read_text())["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    w = reloaded.model.layers[0].self_attn.q_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    assert "wikitext2 perplexity" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*partial"))


def test_identical_rerun_is_skipped_and_different_run_refused(tmp_path, prune_args, capsys):
    out = tmp_path / "run"
    assert main(prune_args(out)) == 0
    stamp = (out / "lmprune.json").stat().st_mtime_ns
    assert main(prune_args(out)) == 0
    assert "already holds this finished run" in capsys.readouterr().out
    assert main(prune_args(out, **{"--sparsity": "0.6"})) == 2
    assert "already holds a different run (differs in: sparsity)" in capsys.readouterr().err
    assert (out / "lmprune.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("family", ["qwen2", "opt"])
def test_other_families_cli(tmp_path, prune_args, family):
    out = tmp_path / family
    assert main(prune_args(out, family, **{"--method": "wanda", "--pattern": "2:4"})) == 0
    m = json.loads((out / "lmprune.json").read_text())
    assert m["pattern"] == "2:4" and m["achieved_sparsity"] == pytest.approx(0.5)


BAD = [
    ({"--sparsity": "1.2"}, "sparsity must be in [0, 1)"),
    ({"--sparsity": "-0.1"}, "sparsity must be in [0, 1)"),
    ({"--pattern": "4:4"}, "N:M needs 0 < N < M"),
    ({"--pattern": "2:6"}, "not divisible by M=6"),
    ({"--method": "nonsense"}, "unknown method 'nonsense'"),
    ({"--model": "no/such/model/dir"}, "unknown model"),
    ({"--calib": "/no/such/file.txt"}, "unknown dataset '/no/such/file.txt'"),
    ({"--pattern": "2:4", "--allocation": "owl"}, "cannot apply, use uniform"),
    ({"--allocation": "bogus"}, "allocation must be one of"),
    ({"--tasks": "piqa,nosuchtask"}, "unknown zero-shot task 'nosuchtask'"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_input_one_line_error(tmp_path, prune_args, capsys, override, message):
    out = tmp_path / "bad"
    assert main(prune_args(out, **override)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lmprune: error:") and message in err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_missing_eval_data_fails_before_pruning(tmp_path, prune_args, capsys):
    out = tmp_path / "bad"
    empty = tmp_path / "empty_data"
    empty.mkdir()
    assert main(prune_args(out, **{"--eval": "wikitext2", "--data-dir": empty})) == 2
    assert "file not found" in capsys.readouterr().err
    assert not out.exists()


def test_non_run_directory_refused(tmp_path, prune_args, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something.txt").write_text("x")
    assert main(prune_args(out)) == 2
    assert "not an lmprune run" in capsys.readouterr().err


def test_help_states_nm_convention():
    r = run_cli("prune", "--help")
    assert r.returncode == 0 and "2:4 keeps 2 of 4" in r.stdout


def test_eval_command(tmp_path, tiny_model_dirs, data_dir):
    res = tmp_path / "eval.json"
    r = run_cli("eval", "--model", tiny_model_dirs["opt"], "--ppl", "wikitext2", "--eval-windows", "2", "--seqlen", "32",
                "--data-dir", data_dir, "--out", res, "--quiet")
    assert r.returncode == 0, r.stderr
    d = json.loads(res.read_text())
    assert d["perplexity"]["details"]["wikitext2"]["windows"] == 2
    assert d["perplexity"]["wikitext2"] > 1


def test_recipe_file(tmp_path, tiny_model_dirs, calib_file):
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "rec"
    recipe.write_text(f"model: {tiny_model_dirs['llama']}\nout: {out}\nmethod: magnitude\nsparsity: 0.4\n"
                      f"calib: {calib_file}\nnsamples: 1\nseqlen: 16\n")
    assert main(["prune", "--recipe", str(recipe), "--quiet"]) == 0
    assert json.loads((out / "lmprune.json").read_text())["method"] == "magnitude"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tiny_model_dirs['llama']}\nout: {tmp_path / 'x'}\nmethod: magnitude\nsparsity: 0.4\nsparsty: 1\n")
    assert main(["prune", "--recipe", str(bad), "--quiet"]) == 2
