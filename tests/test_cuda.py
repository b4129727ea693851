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
