"""Architecture discovery on tiny random models of many decoder-only families (issue 17).

Each family is built from its transformers config class (2 blocks, hidden 64); discovery's block list, matrices,
order and input groups are checked with hooks against the model's own forward, and every per-matrix method
prunes it at 50% and 2:4 to the exact sparsity, saving a model plain transformers reloads with the same logits.
The closed family table lmprune used before discovery lives on here, only as a cross-check.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import VOCAB, assert_reloads_identically, prune_every_method, prune_tiny
from transformers import AutoModelForCausalLM

from lmprune.activations import ActivationStore
from lmprune.engine import EngineOptions, BlockEvents, capture_inputs, run_engine
from lmprune.models.adapters import FamilyAdapter, FFNSpec, UnsupportedModelError, get_adapter
from lmprune.models.discovery import discover, is_matrix, structure_of

T.logging.set_verbosity_error()

_C = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64)


def family_config(name: str, layers: int = 2):
    c = dict(_C, num_hidden_layers=layers)
    return {
        "llama": lambda: T.LlamaConfig(**c),
        "mistral": lambda: T.MistralConfig(**c),
        "qwen2": lambda: T.Qwen2Config(**c),
        "qwen3": lambda: T.Qwen3Config(**c, head_dim=16),
        "opt": lambda: T.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64),
        "gemma": lambda: T.GemmaConfig(**c, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**c, head_dim=16, sliding_window=4),
        "phi": lambda: T.PhiConfig(**c),
        "phi3": lambda: T.Phi3Config(**c, pad_token_id=0),
        "gpt2": lambda: T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=64),
        "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=layers, num_attention_heads=4,
                                            max_position_embeddings=64),
        "falcon": lambda: T.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers,
                                         num_attention_heads=4),
        "stablelm": lambda: T.StableLmConfig(**c),
        "olmo2": lambda: T.Olmo2Config(**c),
        "granite": lambda: T.GraniteConfig(**c),
        "starcoder2": lambda: T.Starcoder2Config(**c),
        "mixtral": lambda: T.MixtralConfig(**c, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**c, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32),
    }[name]()


MOE = ("mixtral", "qwen3_moe")
DENSE = ("llama", "mistral", "qwen2", "qwen3", "opt", "gemma", "gemma2", "phi", "phi3", "gpt2", "gpt_neox", "falcon",
         "stablelm", "olmo2", "granite", "starcoder2")
#: Families whose FFN discovery verifies (SparseLLM runs); the others are refused with a reason.
FFN_VERIFIED = set(DENSE) - {"phi3"}

#: The closed table lmprune used before discovery: a cross-check only.
_LLAMA = FamilyAdapter("llama", "model.layers", (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    FFNSpec("swiglu", up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj", act="silu"))
_OPT = FamilyAdapter("opt", "model.decoder.layers", (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    FFNSpec("relu", up="fc1", down="fc2", act="relu"))
TABLE = {"llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "opt": _OPT}


def build(name: str, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(name, layers), dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


def _real_forward_calls(model, blocks_path):
    """Block 0's matrices as the model's own forward calls them: names in order, and each one's input tensor."""
    block = model.get_submodule(blocks_path)[0]
    order, inputs = [], {}

    def hook(name):
        def fn(module, args):
            if name not in inputs:
                order.append(name)
                inputs[name] = args[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in block.named_modules() if n and is_matrix(m)]
    with torch.no_grad():
        model(torch.arange(12).unsqueeze(0) % VOCAB, use_cache=False)
    for h in handles:
        h.remove()
    return order, inputs


@pytest.mark.parametrize("name", DENSE)
def test_discovery_matches_the_models_own_forward(name):
    """(Mixture-of-experts models: tests/test_moe.py.)"""
    model = build(name)
    s = discover(model)
    blocks = model.get_submodule(s.blocks_path)
    assert isinstance(blocks, torch.nn.ModuleList) and len(blocks) == 2
    order, inputs = _real_forward_calls(model, s.blocks_path)
    names = s.linear_names()
    assert sorted(names) == sorted(order)  # every matrix the forward calls, nothing else (no router, no head)
    assert not any("embed" in n or "lm_head" in n or "norm" in n or "router" in n for n in names)
    for g in s.groups:  # members of a group read one tensor, in forward order
        assert all(inputs[r] is inputs[g[0]] for r in g)
        assert [r for r in order if r in g] == list(g)
    leaders = [g[0] for g in s.groups]
    assert leaders == [r for r in order if r in leaders]  # groups in forward order
    for a in leaders:  # different groups read different tensors
        assert sum(inputs[b] is inputs[a] for b in leaders) == 1
    if name in TABLE:
        old = TABLE[name]
        assert (s.blocks_path, s.groups, s.linear_names()) == (old.blocks_path, old.groups, old.linear_names())
        assert (s.ffn.kind, s.ffn.up, s.ffn.gate, s.ffn.down, s.ffn.act) == (
            old.ffn.kind, old.ffn.up, old.ffn.gate, old.ffn.down, old.ffn.act)
    assert s.ffn.verified == (name in FFN_VERIFIED)
    assert not s.moe
    assert (s.transposed != frozenset()) == (name == "gpt2")


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "phi", "mixtral"])
def test_discovery_on_meta_gives_the_same_groups(name):
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(family_config(name))
    s = discover(meta)
    assert s.groups == discover(build(name)).groups
    assert not s.ffn.verified and ("not in memory" in s.ffn.reason or name in MOE)
    assert all(p.device.type == "meta" for p in meta.parameters())  # the probe's storage was given back


def test_fused_and_parallel_layouts():
    assert discover(build("phi3")).groups == (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                                              ("mlp.down_proj",))
    assert "fused gate/up" in discover(build("phi3")).ffn.reason
    assert discover(build("phi")).groups[0] == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "mlp.fc1")  # parallel attention and MLP read one norm
    neox = discover(build("gpt_neox"))
    assert neox.groups[0] == ("attention.query_key_value",) and neox.ffn.act == "gelu"


@pytest.mark.parametrize("name", ["gemma2", "llama", "gpt2", "falcon", "phi3"])
def test_replayed_block_inputs_reproduce_the_models_hidden_states(name):
    """Blocks run by the engine on the captured inputs and keyword arguments give the hidden states the model's
    own forward gives (gemma2: sliding-window and global layers get their own masks)."""
    model = build(name, layers=3)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    ids = (torch.arange(16) * 5 % VOCAB).unsqueeze(0)
    seen = {}
    def grab(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    h = blocks[2].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    with ActivationStore("cpu") as store:
        capture_inputs(model, adapter, ids, store, progress=False)
        if name == "gemma2":
            assert store.block_kwargs and not torch.equal(store.block_kwargs[0]["attention_mask"],
                                                          store.block_kwargs[1]["attention_mask"])
        run_engine(model, adapter, store, None, lambda ctx: None,
                   EngineOptions(prune_blocks=frozenset(), end_block=2, progress=False), BlockEvents())
        torch.testing.assert_close(next(iter(store)), seen["x"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", DENSE)
def test_every_method_prunes_every_family(name, calib_file, tokenizer, tmp_path):
    def check(model, report):
        assert len(report["layers"]) == 2 * len(get_adapter(model).linear_names())
        for rec in report["layers"]:
            w = model.get_submodule(rec["name"]).weight
            assert torch.isfinite(w).all()
            assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-9)
        assert all(torch.isfinite(p).all() for p in model.parameters())

    model = prune_every_method(lambda: build(name), calib_file, tokenizer, check)
    # the last model (alps, 2:4): saved and reloaded with plain transformers, same weights and logits
    assert_reloads_identically(model, tmp_path / "m")


@pytest.mark.parametrize("name", DENSE)
def test_sparsellm_runs_where_the_ffn_is_verified_and_refuses_elsewhere(name, calib_file, tokenizer):
    model = build(name)
    if name in FFN_VERIFIED:
        report = prune_tiny(model, "sparsellm", "unstructured", calib_file, tokenizer)
        assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
        assert len(report["layers"]) == 2 * len(get_adapter(model).linear_names())
    else:
        with pytest.raises(UnsupportedModelError, match="sparsellm needs a verified feed-forward shape") as e:
            prune_tiny(model, "sparsellm", "unstructured", calib_file, tokenizer)
        assert "\n" not in str(e.value)


def test_a_model_without_block_list_is_refused():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="no decoder block list"):
        get_adapter(NoBlocks())


def test_conv1d_matrices_are_pruned_through_a_transposed_view(calib_file, tokenizer):
    model = build("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    report = prune_tiny(model, "sparsegpt", "2:4", calib_file, tokenizer)
    rec = next(r for r in report["layers"] if r["name"].endswith("attn.c_attn"))
    assert rec["shape"] == [192, 64]  # out x in, as the solvers saw it
    assert conv.weight.shape == (64, 192)  # stored in x out, untouched layout
    groups = conv.weight.T.reshape(192, 16, 4)  # 2:4 along the input dimension of the out x in matrix
    assert ((groups != 0).sum(-1) <= 2).all()


_PHI3_ADAPTER = """\
blocks: model.layers
groups:
  - [self_attn.qkv_proj]
  - [self_attn.o_proj]
  - [mlp.gate_up_proj]
  - [mlp.down_proj]
"""


def test_adapter_file_declares_the_structure(tmp_path, calib_file, tokenizer):
    from lmprune.models.declared import use_adapter_file

    path = tmp_path / "phi3.yaml"
    path.write_text(_PHI3_ADAPTER)
    model = build("phi3")
    use_adapter_file(model, path)
    s = structure_of(model)
    assert s.origin == "declared" and s.ffn.kind == "unknown" and "declares no 'ffn'" in s.ffn.reason
    report = prune_tiny(model, "wanda", "2:4", calib_file, tokenizer)
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9) and len(report["layers"]) == 8


@pytest.mark.parametrize("text, message", [
    ("blocks: model.nowhere\nmatrices: [mlp.down_proj]\n", "has no module 'model.nowhere'"),
    ("blocks: model.layers\nmatrices: [mlp.nothing]\n", "block 0 has no matrix 'mlp.nothing'"),
    ("blocks: model.layers\nmatrices: [input_layernorm]\n", "neither a Linear nor a Conv1D"),
    ("blocks: model.layers\ngroups: [[self_attn.o_proj, mlp.down_proj]]\n", "mixes input widths"),
    ("blocks: model.layers\nmatrices: [mlp.down_proj, mlp.down_proj]\n", "named twice"),
    ("blocks: model.layers\nmatrices: [mlp.down_proj]\ncolour: red\n", "unknown key 'colour'"),
    ("blocks: model.layers\nmatrices: [mlp.down_proj]\nffn: {kind: swiglu, up: mlp.down_proj, down: mlp.down_proj}\n",
     "ffn.gate must name one of the declared matrices"),
    ("blocks: [\n", "cannot parse adapter file"),
    (_PHI3_ADAPTER + "ffn: {kind: relu, up: mlp.gate_up_proj, down: mlp.down_proj}\n", "input width 128"),
])
def test_adapter_file_is_checked_against_the_model(tmp_path, text, message):
    from lmprune.models.declared import load_adapter_file

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UnsupportedModelError, match=message) as e:
        load_adapter_file(path, build("phi3"))
    assert "\n" not in str(e.value)


def test_cli_adapter_file_and_stream(tmp_path, calib_file, tokenizer):
    """--adapter through the command line, in memory and streamed, on a model saved to disk (gpt2: Conv1D)."""
    import json

    from lmprune.cli import main

    model_dir = tmp_path / "gpt2"
    build("gpt2").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    adapter = tmp_path / "gpt2.yaml"
    adapter.write_text("blocks: transformer.h\ngroups: [[attn.c_attn], [attn.c_proj], [mlp.c_fc], [mlp.c_proj]]\n")
    runs = {}
    for name, extra in (("plain", []), ("declared", ["--adapter", str(adapter)]),
                        ("stream", ["--stream"])):
        out = tmp_path / name
        argv = ["prune", "--quiet", "--model", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.5",
                "--out", str(out), "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "16", *extra]
        assert main(argv) == 0, name
        runs[name] = json.loads((out / "lmprune.json").read_text())
        back = AutoModelForCausalLM.from_pretrained(out)
        runs[name]["weights"] = {n: p for n, p in back.state_dict().items()}
    assert runs["plain"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert runs["plain"]["structure"]["conv1d"] and runs["plain"]["structure"]["origin"] == "discovered"
    assert runs["declared"]["structure"]["origin"] == "declared"
    for other in ("declared", "stream"):  # the same structure whichever way it was found: the same weights
        assert [r["name"] for r in runs[other]["layers"]] == [r["name"] for r in runs["plain"]["layers"]]
        for n, p in runs["plain"]["weights"].items():
            torch.testing.assert_close(runs[other]["weights"][n], p, rtol=1e-5, atol=1e-6)


# --- every architecture transformers' GGUF loader maps to a model ---------------------------------------------

_SMALL = dict(vocab_size=VOCAB, hidden_size=64, n_embd=64, intermediate_size=128, num_hidden_layers=2, n_layer=2,
              num_attention_heads=4, n_head=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
              n_positions=64, moe_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
              shared_expert_intermediate_size=64, sliding_window=8, state_size=8, time_step_rank=8,
              global_head_dim=16)


#: Architectures refused in one line, and why: Gemma 4 feeds each block per-layer token embeddings as a second
#: input (and shares key/value states across layers), which the block-by-block engine does not replay yet.
REFUSED_GGUF = {"gemma4_text": "second input beside the hidden states"}


def _gguf_model_types() -> list[str]:
    """The transformers model types of the architectures its GGUF loader reads (the loader's own renames)."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    renamed = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
    return sorted(renamed.get(a, a) for a in GGUF_CONFIG_MAPPING if a not in ("general", "tokenizer"))


def _tiny_config(model_type: str):
    """The family's config class at tiny sizes: only the size fields this config has are passed."""
    cls = T.CONFIG_MAPPING[model_type]
    base = cls()
    kw = {k: v for k, v in _SMALL.items() if k in vars(base) and not isinstance(getattr(cls, k, None), property)}
    if getattr(base, "pad_token_id", None) is not None:
        kw["pad_token_id"] = 0
    return cls(**kw)


@pytest.mark.parametrize("model_type", _gguf_model_types())
def test_every_gguf_architecture_is_discovered_and_pruned(model_type, calib_file, tokenizer):
    """A GGUF file is loaded by transformers into its own model class and then goes through the same discovery
    as any model: every architecture the loader maps to a decoder-only causal LM is discovered and pruned here
    (as a tiny random model of that class; `smollm2-135m` is the GGUF file the other tests load)."""
    if model_type not in T.CONFIG_MAPPING:
        pytest.skip(f"{model_type}: transformers has no model class for it (remote code only)")
    config = _tiny_config(model_type)
    if type(config) not in T.MODEL_FOR_CAUSAL_LM_MAPPING:
        pytest.skip(f"{model_type}: not a causal LM in transformers (encoder-decoder)")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if model_type in REFUSED_GGUF:
        with pytest.raises(UnsupportedModelError, match=REFUSED_GGUF[model_type]) as e:
            discover(model)
        assert "\n" not in str(e.value)
        return
    s = discover(model)
    assert s.linear_names()
    report = prune_tiny(model, "sparsegpt", "unstructured", calib_file, tokenizer)
    assert report["pattern_ok"] and report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_streamed_perplexity_on_sliding_and_global_layers(tmp_path, calib_file, tokenizer, data_dir):
    """gemma2 (sliding-window and global layers, final logit soft-capping): perplexity evaluated block by block
    from the shards, dense and pruned, equals the in-memory figures, and the weights are the same."""
    import json

    from lmprune.cli import main

    model_dir = tmp_path / "gemma2"
    build("gemma2", layers=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    runs = {}
    for mode, extra in (("memory", []), ("stream", ["--stream"])):
        out = tmp_path / mode
        argv = ["prune", "--quiet", "--model", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.5",
                "--out", str(out), "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "16", "--eval",
                "wikitext2", "--eval-windows", "2", "--eval-seqlen", "32", "--eval-dense", "--data-dir",
                str(data_dir), *extra]
        assert main(argv) == 0, mode
        runs[mode] = json.loads((out / "lmprune.json").read_text())
    assert runs["stream"]["perplexity"]["streamed"]
    for key in ("perplexity", "dense_perplexity"):
        assert runs["stream"][key]["wikitext2"] == pytest.approx(runs["memory"][key]["wikitext2"], rel=1e-5), key
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
