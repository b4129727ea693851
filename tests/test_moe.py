"""Mixture-of-experts models (issue 17): every expert's matrices pruned against the Gram matrix of the tokens
its router sent it, a stated fallback for experts that get (almost) none, routers never pruned.

Tiny random models of transformers' MoE families (3-D expert parameters, stored ``out x in`` or, for gpt_oss,
``in x out``), and one model whose experts are separate ``nn.Linear`` modules. The brute-force checks know
the Mixtral/Qwen3-MoE expert arithmetic (``down(silu(gate) * up)`` with ``gate_up`` concatenated); lmprune
itself does not.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from conftest import VOCAB, assert_reloads_identically, prune_every_method, prune_tiny
from torch import nn
from transformers import AutoModelForCausalLM

from lmprune.activations import ActivationStore
from lmprune.cli import main
from lmprune.config import build_config
from lmprune.engine import BlockContext, capture_inputs
from lmprune.models.adapters import UnsupportedModelError, get_adapter
from lmprune.models.discovery import discover, is_matrix

T.logging.set_verbosity_error()

_C = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64)
E = 4  # experts per layer in every test model

CONFIGS = {
    "mixtral": lambda: T.MixtralConfig(**_C, num_local_experts=E, num_experts_per_tok=2),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_C, head_dim=16, num_experts=E, num_experts_per_tok=2,
                                          moe_intermediate_size=32),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_C, num_experts=E, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=64),
    "olmoe": lambda: T.OlmoeConfig(**_C, num_experts=E, num_experts_per_tok=2),
    "gpt_oss": lambda: T.GptOssConfig(**_C, head_dim=16, num_local_experts=E, num_experts_per_tok=2),
    "phimoe": lambda: T.PhimoeConfig(**_C, num_local_experts=E, num_experts_per_tok=2),
    "granitemoe": lambda: T.GraniteMoeConfig(**_C, num_local_experts=E, num_experts_per_tok=2),
    "deepseek_v3": lambda: T.DeepseekV3Config(**_C, n_routed_experts=E, num_experts_per_tok=2,
                                              moe_intermediate_size=32, first_k_dense_replace=0, n_group=1,
                                              topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                              qk_nope_head_dim=8, v_head_dim=16),
}
#: Matrices that score experts, which must never be pruned (a router Linear, a shared expert's gate).
ROUTERS = {"qwen2_moe": {"mlp.shared_expert_gate"}, "phimoe": {"mlp.router"}}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32).eval()
    model.config.use_cache = False
    return model


def _cubes(block: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in block.named_parameters() if p.ndim == 3}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_discovery_lists_every_expert_and_no_router(name):
    """Every slice of every 3-D expert parameter is a matrix (one group each, experts in loop order); the
    ordinary matrices are those the model's forward calls, minus the routers."""
    model = build(name)
    s = discover(model)
    block = model.get_submodule(s.blocks_path)[0]
    called = []
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: called.append(n))
               for n, m in block.named_modules() if n and is_matrix(m)]
    with torch.no_grad():
        model(torch.arange(12).unsqueeze(0) % VOCAB)
    for h in handles:
        h.remove()
    cubes = _cubes(block)
    assert cubes and not any(p.shape[0] != E for p in cubes.values())
    slices = [f"{p}.{e}" for e in range(E) for p in sorted(cubes, key=list(cubes).index)]
    ordinary = list(dict.fromkeys(c for c in called if c not in ROUTERS.get(name, set())))
    names = s.linear_names()
    assert sorted(names) == sorted(ordinary + slices)
    expert_groups = [g for g in s.groups if g[0] in slices]
    assert all(len(g) == 1 for g in expert_groups)
    assert [g[0] for g in expert_groups] == slices  # expert 0's matrices, then expert 1's, ...
    assert all(s.is_expert(r) for r in slices) and not any(s.is_expert(r) for r in ordinary)
    assert not s.ffn.verified and "mixture-of-experts" in s.ffn.reason
    if name in ROUTERS:
        assert set(s.details["routers"]) == ROUTERS[name]


def test_transposed_expert_storage_is_seen_out_x_in():
    model = build("gpt_oss")
    s = discover(model)
    assert {c.path: c.transposed for c in s.experts} == {"mlp.experts.gate_up_proj": True,
                                                         "mlp.experts.down_proj": True}
    stored = model.model.layers[0].mlp.experts.down_proj  # experts x in x out
    w = s.linears(model.model.layers[0])["mlp.experts.down_proj.2"]
    assert tuple(w.weight.shape) == (64, stored.shape[1])  # out x in
    assert w.weight.data_ptr() == stored[2].T.data_ptr()


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_every_method_prunes_moe_models(name, calib_file, tokenizer, tmp_path):
    def check(model, report):
        adapter = get_adapter(model)
        assert len(report["layers"]) == 2 * len(adapter.linear_names())
        for block in adapter.blocks(model):
            for rel, lin in adapter.linears(block).items():
                assert torch.isfinite(lin.weight).all()
                assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-9), rel
        assert report["experts"]["matrices"] == 2 * 2 * E

    model = prune_every_method(lambda: build(name), calib_file, tokenizer, check)
    assert_reloads_identically(model, tmp_path / "m")


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe", "gpt_oss", "phimoe", "granitemoe", "deepseek_v3"])
def test_other_moe_families_prune_with_sparsegpt(name, calib_file, tokenizer):
    model = build(name)
    routers = {n: p.detach().clone() for n, p in model.named_parameters()
               if any(f".{r}." in f".{n}" for r in ROUTERS.get(name, ())) or ".gate.weight" in n
               or ".router." in n}
    report = prune_tiny(model, "sparsegpt", "unstructured", calib_file, tokenizer)
    assert report["pattern_ok"] and report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert report["experts"]["matrices"] == 2 * 2 * E
    for n, before in routers.items():
        assert torch.equal(model.get_parameter(n), before), f"router {n} was changed"


def _block0_inputs(model, tokenizer, calib_file, n=3):
    text = calib_file.read_text()
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids[: n * 16].reshape(n, 16)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_per_expert_gram_is_the_gram_of_the_routed_tokens(name, calib_file, tokenizer):
    """H_e of gate_up and of down, by the engine, equals X_eᵀX_e computed by hand from the tokens the router
    selected (recorded at the experts' own call) -- including an expert the windows may route nothing to."""
    model = build(name)
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    experts = block.mlp.experts
    seen = []
    hook = experts.register_forward_pre_hook(lambda m, args: seen.append((args[0].detach(), args[1].detach())))
    with ActivationStore("cpu") as store:
        capture_inputs(model, adapter, _block0_inputs(model, tokenizer, calib_file), store, progress=False)
        ctx = BlockContext(0, block, adapter, store, None)
        rels = [r for r in adapter.linear_names() if adapter.is_expert(r)]
        grams = ctx.collect_grams(rels)
    hook.remove()
    x = torch.cat([h for h, _ in seen]).double()
    index = torch.cat([i for _, i in seen])
    for e in range(E):
        xe = x[(index == e).any(-1)]
        gate, up = F.linear(xe, experts.gate_up_proj[e].double()).chunk(2, dim=-1)
        z = F.silu(gate) * up
        for rel, inputs in ((f"mlp.experts.gate_up_proj.{e}", xe), (f"mlp.experts.down_proj.{e}", z)):
            gram = grams[rel]
            assert gram.n_tokens == xe.shape[0] == ctx.expert_notes[rel]["routed_tokens"]
            torch.testing.assert_close(gram.matrix.double(), inputs.T @ inputs, rtol=1e-4, atol=1e-4)


def _never_route_to(model, banned: int) -> None:
    """Make every router of ``model`` (Mixtral's top-k softmax router) skip expert ``banned``."""
    for block in model.model.layers:
        router = block.mlp.gate

        def forward(hidden, router=router):
            logits = F.linear(hidden.reshape(-1, router.hidden_dim), router.weight)
            logits[:, banned] = float("-inf")
            probs = logits.float().softmax(-1)
            top, index = probs.topk(router.top_k, dim=-1)
            return logits, top / top.sum(-1, keepdim=True), index

        router.forward = forward


def test_an_unrouted_expert_gets_the_fallback_and_is_reported(calib_file, tokenizer):
    model = build("mixtral")
    _never_route_to(model, 3)
    dense = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    report = prune_tiny(model, "sparsegpt", "unstructured", calib_file, tokenizer)
    fallback = report["experts"]["fallback"]
    assert sorted(fallback) == sorted(f"model.layers.{b}.mlp.experts.{p}.3" for b in range(2)
                                      for p in ("gate_up_proj", "down_proj"))
    assert set(fallback.values()) == {"magnitude"}
    assert report["experts"]["min_routed_tokens"] == 0
    for rec in report["layers"]:
        if rec["name"] in fallback:
            assert rec["stats"]["routed_tokens"] == 0
    for b in range(2):  # expert 3 pruned by magnitude: kept entries unchanged, and the largest ones
        for p in ("gate_up_proj", "down_proj"):
            w = model.get_parameter(f"model.layers.{b}.mlp.experts.{p}")[3]
            d = dense[f"model.layers.{b}.mlp.experts.{p}"][3]
            kept = w != 0
            assert torch.equal(w[kept], d[kept])
            assert d[kept].abs().min() >= d[~kept].abs().max()
            other = model.get_parameter(f"model.layers.{b}.mlp.experts.{p}")[0]
            assert not torch.equal(other[other != 0], dense[f"model.layers.{b}.mlp.experts.{p}"][0][other != 0])


def test_expert_min_tokens_sends_thin_experts_to_the_fallback(calib_file, tokenizer):
    report = prune_tiny(build("mixtral"), "wanda", "unstructured", calib_file, tokenizer,
                    method_options={"expert_min_tokens": 10**6})
    assert len(report["experts"]["fallback"]) == 2 * 2 * E
    assert report["resolved_options"]["method_options"]["expert_min_tokens"] == 10**6
    with pytest.raises(Exception, match="expert_min_tokens"):
        build_config(method="wanda", method_options={"expert_min_tokens": -1})


def test_sparsellm_refuses_moe_in_one_line(calib_file, tokenizer):
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts") as e:
        prune_tiny(build("mixtral"), "sparsellm", "unstructured", calib_file, tokenizer)
    assert "\n" not in str(e.value)


class _ExpertMLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate = nn.Linear(gate.shape[1], gate.shape[0], bias=False)
        self.up = nn.Linear(up.shape[1], up.shape[0], bias=False)
        self.down = nn.Linear(down.shape[1], down.shape[0], bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(gate)
            self.up.weight.copy_(up)
            self.down.weight.copy_(down)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class _LinearExperts(nn.Module):
    """Mixtral's experts as a list of modules of separate linears (as remote-code MoE models store them)."""

    def __init__(self, cube):
        super().__init__()
        gate, up = cube.gate_up_proj.detach().chunk(2, dim=1)
        self.experts = nn.ModuleList(_ExpertMLP(gate[e], up[e], cube.down_proj[e].detach()) for e in range(E))

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)
            if len(token):
                out.index_add_(0, token, expert(hidden[token]) * top_k_weights[token, slot, None])
        return out


def test_experts_stored_as_separate_linears(calib_file, tokenizer):
    cube_model = build("mixtral")
    model = build("mixtral")
    for block in model.model.layers:
        block.mlp.experts = _LinearExperts(block.mlp.experts)
    ids = torch.arange(12).unsqueeze(0) % VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, cube_model(ids).logits, rtol=1e-5, atol=1e-5)
    s = discover(model)
    expert_groups = [g for g in s.groups if "experts.experts" in g[0]]
    assert expert_groups == [g for e in range(E) for g in (
        (f"mlp.experts.experts.{e}.gate", f"mlp.experts.experts.{e}.up"), (f"mlp.experts.experts.{e}.down",))]
    # the same routed tokens as the 3-D layout: gate's Gram equals gate_up's, down's equals down_proj's
    windows = _block0_inputs(model, tokenizer, calib_file)
    grams = {}
    for m, rels in ((model, [f"mlp.experts.experts.{e}.{p}" for e in range(E) for p in ("gate", "down")]),
                    (cube_model, [f"mlp.experts.{p}.{e}" for e in range(E) for p in ("gate_up_proj", "down_proj")])):
        adapter = get_adapter(m)
        with ActivationStore("cpu") as store:
            capture_inputs(m, adapter, windows, store, progress=False)
            grams[id(m)] = BlockContext(0, adapter.blocks(m)[0], adapter, store, None).collect_grams(rels)
    for e in range(E):
        for a, b in ((f"mlp.experts.experts.{e}.gate", f"mlp.experts.gate_up_proj.{e}"),
                     (f"mlp.experts.experts.{e}.down", f"mlp.experts.down_proj.{e}")):
            ga, gb = grams[id(model)][a], grams[id(cube_model)][b]
            assert ga.n_tokens == gb.n_tokens
            torch.testing.assert_close(ga.matrix, gb.matrix, rtol=1e-4, atol=1e-4)
    report = prune_tiny(model, "sparsegpt", "2:4", calib_file, tokenizer)
    assert report["pattern_ok"] and report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert report["experts"]["matrices"] == 2 * 3 * E


def test_cli_prunes_a_saved_moe_model_and_refuses_to_stream_its_converted_layout(tmp_path, calib_file, tokenizer):
    """The command line on a saved Qwen3-MoE: the memory plan discovers the experts too (block 0 probed with
    storage, routing being value-dependent). transformers saves the experts as separate per-expert tensors and
    merges them into 3-D parameters when it loads; --stream, which reads tensors by the module's names, says so
    in one line before anything runs."""
    build("qwen3_moe").save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    common = ["--model", str(tmp_path / "moe"), "--method", "sparsegpt", "--sparsity", "0.5", "--calib",
              str(calib_file), "--nsamples", "2", "--seqlen", "16", "--quiet"]
    assert main(["prune", *common, "--out", str(tmp_path / "plan"), "--dry-run"]) == 0
    out = tmp_path / "memory"
    assert main(["prune", *common, "--out", str(out)]) == 0
    manifest = json.loads((out / "lmprune.json").read_text())
    assert manifest["experts"]["matrices"] == 2 * 2 * E
    assert manifest["structure"]["experts"][0]["num_experts"] == E
    back = AutoModelForCausalLM.from_pretrained(out)
    w = back.model.layers[1].mlp.experts.down_proj
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-9)
    assert main(["prune", *common, "--out", str(tmp_path / "stream"), "--stream"]) == 2


HETERO = {
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_C, head_dim=16, num_experts=E, num_experts_per_tok=2,
                                          moe_intermediate_size=32, mlp_only_layers=[0]),
    "deepseek_v3": lambda: T.DeepseekV3Config(**_C, n_routed_experts=E, num_experts_per_tok=2,
                                              moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                                              topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                              qk_nope_head_dim=8, v_head_dim=16),
}


@pytest.mark.parametrize("name", list(HETERO))
def test_dense_and_moe_blocks_in_one_model(name, calib_file, tokenizer, tmp_path):
    """Block 0 dense, block 1 mixture-of-experts: each block is probed as its own structure, gets its own
    matrices (and keyword arguments), and is pruned to the exact sparsity; the saved model reloads."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(HETERO[name](), dtype=torch.float32).eval()
    s = discover(model)
    assert s.block_kinds == ((0,), (1,))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(HETERO[name]())
    assert discover(meta).groups == s.groups  # the memory plan's and --stream's discovery
    blocks = s.blocks(model)
    dense, moe = (list(s.linears(b)) for b in blocks)
    assert not any(s.is_expert(r) for r in dense) and "mlp.down_proj" in dense
    assert sum(s.is_expert(r) for r in moe) == 2 * E and "mlp.down_proj" not in moe
    assert [r for r in s.linear_names() if r in dense] == dense  # each block's matrices in its forward order
    report = prune_tiny(model, "sparsegpt", "unstructured", calib_file, tokenizer)
    assert report["pattern_ok"] and report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert [r["name"].split(".", 3)[3] for r in report["layers"] if r["block"] == 0] == dense
    assert [r["name"].split(".", 3)[3] for r in report["layers"] if r["block"] == 1] == moe
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(HETERO[name](), dtype=torch.float32).eval()
    owl = prune_tiny(fresh, "wanda", "unstructured", calib_file, tokenizer, allocation="owl")
    assert owl["achieved_sparsity"] == pytest.approx(0.5, abs=1e-2)
    assert {r["block"] for r in owl["layers"]} == {0, 1}
    assert_reloads_identically(model, tmp_path / "m")
