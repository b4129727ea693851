"""SparseLLM and DSnoT through the engine, the API and the command line on tiny models."""

import json
import math

import pytest
import torch

from conftest import make_model
from lmprune import api
from lmprune.cli import main
from lmprune.config import build_config
from lmprune.models.adapters import get_adapter
from lmprune.patterns import parse_pattern
from lmprune.solvers import SOLVERS
from lmprune.strategies import sparsellm as strategy

FAST = {"rounds": 2, "s_steps": 1}


def _config(calib_file, **kw):
    base = dict(method="sparsellm", sparsity=0.6, calib=str(calib_file), nsamples=2, seqlen=24, method_options=FAST)
    return build_config(**{**base, **kw})


@pytest.mark.parametrize("fam", ["llama", "qwen2", "opt"])
def test_sparsellm_prunes_every_linear_of_every_family(fam, tokenizer, calib_file):
    model = make_model(fam)
    report = api.prune(model, tokenizer, _config(calib_file), progress=False)
    adapter = get_adapter(model)
    assert report["pattern_ok"]
    assert len(report["layers"]) == len(adapter.blocks(model)) * len(adapter.linear_names())
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    ffn = {adapter.ffn.up, adapter.ffn.down} | ({adapter.ffn.gate} if adapter.ffn.gate else set())
    for rec in report["layers"]:
        assert math.isfinite(rec["rel_error"])
        if rec["name"].split(".", 3)[-1] in ffn:
            st = rec["stats"]
            assert st["sparsellm_ffn_rel_error"] <= st["sparsellm_layerwise_ffn_rel_error"] * (1 + 1e-6)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_ffn_sees_the_pruned_attention(tokenizer, calib_file, monkeypatch):
    seen = {}
    original = strategy.prune_ffn_swiglu

    def spy(data, *args, **kw):
        seen.setdefault("x", data.x.read(slice(None)).clone())
        return original(data, *args, **kw)

    monkeypatch.setattr(strategy, "prune_ffn_swiglu", spy)
    model = make_model("llama")
    config = _config(calib_file, blocks="0")
    api.prune(model, tokenizer, config, progress=False)

    from lmprune.data.calibration import sample_windows
    from lmprune.data.sources import load_source

    windows = sample_windows(load_source(str(calib_file), "calib"), tokenizer, 2, 24, 0)
    got = []
    handle = model.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda m, a, o: got.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    with torch.no_grad():
        for row in windows:
            model(row.unsqueeze(0))
    handle.remove()
    # block 0's attention is pruned in `model`, so its FFN input is what the solver must have been given
    torch.testing.assert_close(seen["x"], torch.cat(got), rtol=1e-4, atol=1e-5)


def test_first_half_protocol_and_nm_pattern(tokenizer, calib_file):
    model = make_model("llama")
    report = api.prune(model, tokenizer, _config(calib_file, blocks="first-half", pattern="2:4"), progress=False)
    assert {r["block"] for r in report["layers"]} == {0}
    assert report["pattern_ok"]
    w = model.model.layers[0].mlp.down_proj.weight
    assert parse_pattern("2:4").verify(w, 0.5).ok
    untouched = model.model.layers[1].mlp.up_proj.weight
    assert torch.count_nonzero(untouched) == untouched.numel()


@pytest.mark.parametrize(
    "method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4"), ("sparsellm", "unstructured")]
)
def test_dsnot_refiner_through_the_api(method, pattern, tokenizer, calib_file):
    model = make_model("llama")
    kw = {"method_options": FAST} if method == "sparsellm" else {"method_options": {}}
    report = api.prune(model, tokenizer, _config(calib_file, method=method, pattern=pattern, refine="dsnot", **kw),
                       progress=False)
    assert report["pattern_ok"]
    assert all("dsnot_swaps" in r["stats"] for r in report["layers"])
    mlp = [r for r in report["layers"] if ".mlp." in r["name"]]
    assert mlp and all("dsnot_swaps" in r["stats"] for r in mlp)  # the MLP is refined too


def test_cli_sparsellm_with_dsnot(tmp_path, tiny_model_dirs, calib_file):
    out = tmp_path / "run"
    args = ["prune", "--quiet", "--model", str(tiny_model_dirs["opt"]), "--method", "sparsellm", "--sparsity", "0.7",
            "--refine", "dsnot", "--out", str(out), "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "24",
            "--method-opt", "rounds=2"]
    assert main(args) == 0
    manifest = json.loads((out / "lmprune.json").read_text())
    assert manifest["method"] == "sparsellm" and manifest["config"]["refine"] == "dsnot"
    assert manifest["achieved_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert any("sparsellm_ffn_rel_error" in r.get("stats", {}) for r in manifest["layers"])


@pytest.mark.skipif("alps" not in SOLVERS, reason="ALPS solver not registered")
def test_sparsellm_with_alps_inner(tokenizer, calib_file):
    model = make_model("llama")
    report = api.prune(model, tokenizer, _config(calib_file, inner="alps", blocks="0"), progress=False)
    assert report["pattern_ok"]
    mlp = [r for r in report["layers"] if ".mlp." in r["name"]]
    assert len(mlp) == 3
    assert all(r["stats"]["sparsellm_ffn_rel_error"] <= r["stats"]["sparsellm_layerwise_ffn_rel_error"] * (1 + 1e-6)
               for r in mlp)


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_offload_dir_keeps_the_ffn_problem_in_files_with_the_same_weights(fam, tokenizer, calib_file, tmp_path,
                                                                            monkeypatch):
    """With ``--offload-dir`` the FFN problem's inputs, targets and auxiliaries go to files in the run's activation
    folder and its ``tokens x d_ff`` arrays are formed a token chunk at a time (three chunks here); the weights
    are those of the run in memory."""
    seen = []
    original = strategy.prune_ffn_swiglu if fam == "llama" else strategy.prune_ffn_relu

    def spy(data, *args, aux_dir=None, **kw):
        seen.append((aux_dir, data.x.in_memory, data.y.in_memory))
        return original(data, *args, aux_dir=aux_dir, **kw)

    monkeypatch.setattr(strategy, "prune_ffn_swiglu" if fam == "llama" else "prune_ffn_relu", spy)
    states = []
    for offload in (None, str(tmp_path / "acts")):
        model = make_model(fam)
        config = _config(calib_file, method_options={**FAST, "chunk_tokens": 16}, offload_dir=offload)
        report = api.prune(model, tokenizer, config, progress=False)
        assert report["pattern_ok"]
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    half = len(seen) // 2
    assert half > 0 and seen[:half] == [(None, True, True)] * half
    # with --offload-dir the inputs and targets are in files as well
    assert all(d is not None and d.startswith(str(tmp_path / "acts")) and not x_mem and not y_mem
               for d, x_mem, y_mem in seen[half:])
    memory, files = states
    assert all(torch.equal(memory[k], files[k]) for k in memory)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # gc's walk touches torch's deprecated aliases
def test_no_gram_matrix_outside_the_ffn_problem_is_alive_while_it_is_solved(tokenizer, calib_file, monkeypatch):
    """The memory plan counts no Gram matrix beside SparseLLM's FFN problem (its own are in its fitted workspace):
    the attention's are released with their solves, the error reports' formed after it."""
    import gc

    from lmprune.solvers.base import Gram

    alive = []
    original = strategy.prune_ffn_swiglu

    def spy(*args, **kw):
        gc.collect()
        alive.append([tuple(o.matrix.shape) for o in gc.get_objects() if isinstance(o, Gram)])
        return original(*args, **kw)

    monkeypatch.setattr(strategy, "prune_ffn_swiglu", spy)
    api.prune(make_model("llama"), tokenizer, _config(calib_file), progress=False)
    assert len(alive) >= 2 and all(a == [] for a in alive)
