"""The top-level Python API, the settings recorded in the manifest, and save → reload with identical logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import lmprune
from conftest import make_model
from lmprune import api
from lmprune.config import ConfigError, build_config
from lmprune.report.manifest import versions
from lmprune.run import rundir


def test_top_level_prune_with_keywords(tokenizer, calib_file):
    model = make_model("llama")
    m = lmprune.prune(model, tokenizer, method="wanda", sparsity=0.5, calib=str(calib_file), nsamples=2, seqlen=24,
                      progress=False)
    assert m["method"] == "wanda" and m["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert (model.model.layers[0].mlp.down_proj.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    base = build_config(method="magnitude", sparsity=0.3, calib=str(calib_file), nsamples=2, seqlen=24)
    m2 = lmprune.prune(make_model("llama"), tokenizer, base, sparsity=0.6, progress=False)
    assert m2["method"] == "magnitude" and m2["sparsity"] == 0.6
    with pytest.raises(ConfigError, match="sparsity"):
        lmprune.prune(make_model("llama"), tokenizer, method="wanda", sparsity=1.5)


@pytest.mark.parametrize("method,extra,expect", [
    ("alps-fast", {}, {"solver": "alps-fast", "max_iter": 3, "rho0": 0.3, "pcg_iters": 2}),
    ("alps", {"solver_options": {"pcg_iters": 10}}, {"solver": "alps", "pcg_iters": 10, "max_iter": 300}),
    ("sparsegpt", {"refine": "dsnot"}, {"solver": "sparsegpt", "blocksize": 128, "percdamp": 0.01}),
    ("sparsellm", {}, {"solver": "sparsegpt"}),
])
def test_manifest_records_every_resolved_option(tokenizer, calib_file, method, extra, expect):
    config = build_config(method=method, sparsity=0.5, calib=str(calib_file), nsamples=2, seqlen=24, **extra)
    settings = api.prune(make_model("llama"), tokenizer, config, progress=False)["resolved_options"]
    assert settings["solver"] == expect.pop("solver")
    assert all(settings["solver_options"][k] == v for k, v in expect.items()), settings
    if extra.get("refine") == "dsnot":
        assert settings["refiner"] == "dsnot" and settings["refine_options"]
    if method == "sparsellm":
        assert {"alpha", "beta", "gamma"} <= set(settings["method_options"])


def test_bad_solver_option_is_one_line_error(tokenizer, calib_file):
    with pytest.raises(ConfigError, match="solver_options for alps") as e:  # refused when the config is built
        build_config(method="alps", sparsity=0.5, calib=str(calib_file), nsamples=2, seqlen=24,
                     solver_options={"pcg_iters": "many"})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="solver_options for alps"):
        lmprune.prune(make_model("llama"), tokenizer, method="alps", sparsity=0.5, calib=str(calib_file),
                      nsamples=2, seqlen=24, solver_options={"pcg_iters": "many"})


@pytest.mark.parametrize("fam", ["llama", "qwen2", "opt"])
def test_save_reload_gives_identical_logits(fam, tokenizer, calib_file, tmp_path):
    model = make_model(fam)
    config = build_config(method="sparsegpt", sparsity=0.5, calib=str(calib_file), nsamples=2, seqlen=24)
    manifest = api.prune(model, tokenizer, config, progress=False)
    manifest["model"] = {"spec": "tiny", "model_type": fam, "parameters": sum(p.numel() for p in model.parameters())}
    manifest["peak_rss_mb"] = 0.0
    manifest.update(versions=versions(), created="now", lmprune_version=lmprune.__version__)
    out = tmp_path / "run"
    out.mkdir()
    rundir.save_model(model, tokenizer, out, manifest)
    assert manifest["reload_check"]["ok"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    for (n, p), (n2, q) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert n == n2 and torch.equal(p, q), n


def test_offload_and_device_do_not_make_a_different_run(tmp_path):
    from lmprune.report.manifest import write_json

    config = build_config(method="wanda", sparsity=0.5)
    out = tmp_path / "run"
    out.mkdir()
    write_json(out / "lmprune.json", {"model": {"spec": "m"}, "config": config.model_dump()})
    with pytest.raises(api.RunExists):
        rundir.check_out_dir(out, "m", build_config(method="wanda", sparsity=0.5, offload_activations=True), False)
    with pytest.raises(api.RunExists):
        rundir.check_out_dir(out, "m", build_config(method="wanda", sparsity=0.5, offload_dir="/tmp/x"), False)
    with pytest.raises(ConfigError, match="differs in: sparsity"):
        rundir.check_out_dir(out, "m", build_config(method="wanda", sparsity=0.6), False)
