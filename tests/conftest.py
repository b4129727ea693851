"""Tiny random-initialised models of each supported family, with an offline tokenizer trained in-process."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from lmprune.run.checkpoint import staging_dir

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LMPRUNE_DATA_DIR", REPO.parent / "shared" / "data"))
VOCAB = 384
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if DATA_DIR.is_dir():
    os.environ.setdefault("LMPRUNE_DATA_DIR", str(DATA_DIR))

_CORPUS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Pruning removes weights from a neural network while keeping its accuracy.",
    "A sparse matrix stores only the entries that are not zero.",
    "Language models predict the next token from the previous ones.",
    "Question: what is the capital of France?\nAnswer: Paris",
] * 20


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.pad_token = fast.eos_token
    return fast


def _config(family: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256)
    if family == "llama":
        return LlamaConfig(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=False, **common)
    if family == "qwen2":
        return Qwen2Config(intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True, **common)
    if family == "opt":
        return OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **common)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "opt")


def make_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family), dtype=torch.float32)
    model.eval()
    model.config.use_cache = False
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture
def tiny_model(family):
    return make_model(family)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A saved HF directory per family (model + tokenizer)."""
    root = tmp_path_factory.mktemp("tiny_models")
    out = {}
    for fam in FAMILIES:
        path = root / fam
        make_model(fam).save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[fam] = path
    return out


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny LLaMA with four blocks, saved with its tokenizer, so a run can stop in the middle."""
    cfg = _config("llama")
    cfg.num_hidden_layers = 4
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("deep") / "llama4"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "text" / "wikitext2_test.raw").is_file():
        pytest.skip(f"evaluation data not found at {DATA_DIR} (set LMPRUNE_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """A small calibration text file, independent of the data directory."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(_CORPUS * 4))
    return path


def assert_reloads_identically(model, path: Path) -> None:
    """``model`` saved to ``path`` and reloaded with plain transformers: the same weights and the same logits."""
    model.save_pretrained(path)
    back = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.arange(10).unsqueeze(0)
    for n, p in model.state_dict().items():
        assert torch.equal(p, back.state_dict()[n]), n
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def wait_for_hold(proc: subprocess.Popen, out: Path, block: int, timeout: float = 120.0) -> None:
    """Wait until a run started with ``HOLD_ENV=block`` has checkpointed ``block`` to the end.

    ``state.json`` names the block before the previous block's inputs are dropped, and only then does the process
    hold; a test that acted on ``state.json`` alone could catch it in between. Fails if the process ends first.
    """
    ckpt = staging_dir(out) / "checkpoint"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before holding after block {block}")
        try:
            done = json.loads((ckpt / "state.json").read_text()).get("done_block", -1)
        except (OSError, json.JSONDecodeError):
            done = -1
        if done == block and not any(ckpt.glob(f"inputs_{block - 1:04d}*")):
            return
        time.sleep(0.1)
    raise AssertionError(f"no hold after block {block} within {timeout:.0f} s")


def prune_tiny(model, method: str, pattern: str, calib_file: Path, tokenizer, **options) -> dict:
    """``api.prune`` at 50% on 2 calibration windows of 16 tokens: the discovery and MoE tests' run."""
    from lmprune import api
    from lmprune.config import build_config

    config = build_config(method=method, sparsity=0.5, pattern=pattern, calib=str(calib_file), nsamples=2,
                          seqlen=16, **options)
    return api.prune(model, tokenizer, config, progress=False)


def prune_every_method(build, calib_file: Path, tokenizer, check) -> torch.nn.Module:
    """magnitude, wanda, sparsegpt and alps × {unstructured, 2:4}, each on a fresh ``build()``: the pattern holds
    at exactly 50%, ``check(model, report)`` passes, and SparseGPT's summed layer error is below magnitude's.
    Returns the last pruned model (alps, 2:4)."""
    errors = {}
    for pattern in ("unstructured", "2:4"):
        for method in ("magnitude", "wanda", "sparsegpt", "alps"):
            model = build()
            report = prune_tiny(model, method, pattern, calib_file, tokenizer)
            assert report["pattern_ok"]
            assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
            check(model, report)
            errors[pattern, method] = sum(r["rel_error"] for r in report["layers"])
    for pattern in ("unstructured", "2:4"):
        assert errors[pattern, "sparsegpt"] < errors[pattern, "magnitude"]
    return model
