"""The same runs on a CUDA device as on the CPU (skipped without one): every method and pattern, and the CLI."""

import json

import pytest
import torch

from conftest import make_model
from lmprune import api
from lmprune.cli import main
from lmprune.config import build_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method,pattern,extra", [
    ("magnitude", "unstructured", {}), ("wanda", "unstructured:row", {}), ("sparsegpt", "2:4", {}),
    ("alps", "unstructured", {}), ("alps-fast", "2:4", {}), ("alps", "block:4", {}), ("alps", "row", {}),
    ("sparsellm", "unstructured", {}), ("sparsegpt", "unstructured", {"refine": "dsnot"}),
    ("wanda", "unstructured", {"allocation": "owl"}), ("sparsegpt", "unstructured", {"allocation": "alpha"}),
])
def test_cuda_prune_matches_cpu(family, tokenizer, calib_file, method, pattern, extra):
    torch.backends.cuda.matmul.allow_tf32 = False
    kw = dict(method=method, sparsity=0.5, pattern=pattern, calib=str(calib_file), nsamples=4, seqlen=32, **extra)
    if extra.get("allocation") == "alpha":
        kw["allocation_options"] = {"cache_dir": None}
    cpu_model, gpu_model = make_model(family), make_model(family)
    cpu = api.prune(cpu_model, tokenizer, build_config(**kw), progress=False)
    gpu = api.prune(gpu_model, tokenizer, build_config(device="cuda", **kw), progress=False)
    assert all(p.device.type == "cpu" for p in gpu_model.parameters())  # blocks go back home
    assert gpu["pattern_ok"] and abs(gpu["achieved_sparsity"] - cpu["achieved_sparsity"]) < 1e-3
    for a, b in zip(cpu["layers"], gpu["layers"]):
        assert a["name"] == b["name"] and abs(a["sparsity"] - b["sparsity"]) < 0.02
        assert b["rel_error"] <= 1.1 * a["rel_error"] + 1e-4, (a, b)


def test_cuda_cli_end_to_end(tmp_path, tiny_model_dirs, calib_file, data_dir):
    out = tmp_path / "run"
    args = ["prune", "--quiet", "--model", tiny_model_dirs["llama"], "--method", "alps", "--sparsity", "0.6",
            "--out", out, "--calib", calib_file, "--nsamples", "4", "--seqlen", "32", "--device", "cuda",
            "--eval", "wikitext2", "--eval-windows", "2"]
    assert main([str(a) for a in args]) == 0
    m = json.loads((out / "lmprune.json").read_text())
    assert m["achieved_sparsity"] == pytest.approx(0.6, abs=1e-3) and m["peak_cuda_mb"] > 0
    assert m["perplexity"]["wikitext2"] > 0 and m["reload_check"]["ok"]


@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
def test_cuda_offloaded_activations(tokenizer, calib_file, method, monkeypatch):
    """With --offload-activations the block's inputs and outputs live on the CPU, the block and its Gram matrices
    on the device, and the weights match the run that keeps the activations on the device."""
    import importlib

    torch.backends.cuda.matmul.allow_tf32 = False
    seen = []
    module = importlib.import_module("lmprune.strategies.sparsellm") if method == "sparsellm" else api
    name = "prune_block" if method == "sparsellm" else "prune_block_layerwise"
    original = getattr(module, name)

    def spy(ctx, options):
        seen.append(({x.device.type for x in ctx.inputs}, ctx.device.type, next(ctx.block.parameters()).device.type))
        return original(ctx, options)

    monkeypatch.setattr(module, name, spy)
    handed = []
    kw = dict(method=method, sparsity=0.5, calib=str(calib_file), nsamples=4, seqlen=32, device="cuda")
    kept, offloaded = make_model("llama"), make_model("llama")
    a = api.prune(kept, tokenizer, build_config(**kw), progress=False)
    assert all(inputs == {"cuda"} for inputs, _, _ in seen)
    seen.clear()
    b = api.prune(offloaded, tokenizer, build_config(offload_activations=True, **kw), progress=False,
                  on_block_done=lambda i, inputs, records: handed.append({x.device.type for x in inputs}))
    assert seen and all(s == ({"cpu"}, "cuda", "cuda") for s in seen), seen
    assert handed and all(h == {"cpu"} for h in handed)
    assert b["pattern_ok"] and abs(a["achieved_sparsity"] - b["achieved_sparsity"]) < 1e-3
    for (n, p), (_, q) in zip(kept.named_parameters(), offloaded.named_parameters()):
        assert p.device.type == q.device.type == "cpu"
        assert (p - q).norm() <= 1e-4 * p.norm() + 1e-6, n
    for x, y in zip(a["layers"], b["layers"]):
        assert y["rel_error"] == pytest.approx(x["rel_error"], rel=1e-3, abs=1e-6)


def test_cuda_fit_check_reads_free_device_memory():
    from lmprune.config import Job
    from lmprune.run.memory import check_fits, device_free_bytes, plan_memory
    from conftest import _config

    free = device_free_bytes("cuda")
    assert free is not None and 0 < free <= torch.cuda.get_device_properties(0).total_memory
    config = build_config(method="sparsegpt", sparsity=0.5, calib="c4", nsamples=4, seqlen=32, device="cuda")
    job = Job(model="tiny", out="x", config=config)
    check_fits(plan_memory(job, _config("llama"), runtime=0.0), current_rss=0)  # a tiny run fits


@pytest.mark.parametrize("offload", [False, True])
def test_cuda_batched_calibration_matches_one_window_at_a_time(tokenizer, calib_file, offload):
    torch.backends.cuda.matmul.allow_tf32 = False
    kw = dict(method="sparsegpt", sparsity=0.5, calib=str(calib_file), nsamples=5, seqlen=32, device="cuda",
              offload_activations=offload)
    one, batched = make_model("llama"), make_model("llama")
    a = api.prune(one, tokenizer, build_config(**kw), progress=False)
    b = api.prune(batched, tokenizer, build_config(calib_batch_size=4, **kw), progress=False)
    for (n, p), (_, q) in zip(one.named_parameters(), batched.named_parameters()):
        assert (p - q).norm() <= 1e-4 * p.norm() + 1e-6, n
    assert [r["rel_error"] for r in a["layers"]] == pytest.approx([r["rel_error"] for r in b["layers"]], rel=1e-3)
