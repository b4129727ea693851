"""Architecture discovery across decoder-only families: what it finds and how long it takes (issue 17).

Each family is a tiny random model built from its transformers config class (2 blocks, hidden 64); the table
gives the block list, the matrices of a block with their input groups, the FFN shape discovery verified (or why
not), and the time of one discovery (the model probe to collect block inputs plus the probe of block 0; best of
``--repeat``). With ``--smollm2``, the discovered structure of ``smollm2-135m`` is compared with the family table
lmprune used before discovery, and one SparseGPT run on its first blocks is made with each (same seed, same
thread count) to compare the pruned weights' hashes.

    python bench/layer/discovery.py                          # the family table (seconds)
    python bench/layer/discovery.py --smollm2 --blocks 0-3   # + bit-identity with the old table (minutes)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import time

import torch
import transformers as T
from transformers import AutoModelForCausalLM

from lmprune.models.adapters import FamilyAdapter, FFNSpec
from lmprune.models.discovery import declare, discover

T.logging.set_verbosity_error()
_C = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": lambda: T.LlamaConfig(**_C),
    "mistral": lambda: T.MistralConfig(**_C),
    "qwen2": lambda: T.Qwen2Config(**_C),
    "qwen3": lambda: T.Qwen3Config(**_C, head_dim=16),
    "opt": lambda: T.OPTConfig(vocab_size=384, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64),
    "gemma": lambda: T.GemmaConfig(**_C, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**_C, head_dim=16, sliding_window=4),
    "phi": lambda: T.PhiConfig(**_C),
    "phi3": lambda: T.Phi3Config(**_C, pad_token_id=0),
    "gpt2": lambda: T.GPT2Config(vocab_size=384, n_embd=64, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64),
    "falcon": lambda: T.FalconConfig(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "stablelm": lambda: T.StableLmConfig(**_C),
    "olmo2": lambda: T.Olmo2Config(**_C),
    "granite": lambda: T.GraniteConfig(**_C),
    "starcoder2": lambda: T.Starcoder2Config(**_C),
    "mixtral": lambda: T.MixtralConfig(**_C, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**_C, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**_C, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                          shared_expert_intermediate_size=64),
    "olmoe": lambda: T.OlmoeConfig(**_C, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": lambda: T.GptOssConfig(**_C, head_dim=16, num_local_experts=4, num_experts_per_tok=2),
    "phimoe": lambda: T.PhimoeConfig(**_C, num_local_experts=4, num_experts_per_tok=2),
    "granitemoe": lambda: T.GraniteMoeConfig(**_C, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": lambda: T.DeepseekV3Config(**_C, n_routed_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32, first_k_dense_replace=0, n_group=1,
                                              topk_group=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                              qk_nope_head_dim=8, v_head_dim=16),
}

#: The table lmprune used for LLaMA-like models before discovery.
OLD_LLAMA = FamilyAdapter("llama", "model.layers", (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",)),
    FFNSpec("swiglu", up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj", act="silu"))


def _short(rel: str) -> str:
    """The name inside its attention or MLP module (``self_attn.q_proj`` -> ``attn.q_proj``)."""
    parts = rel.split(".")
    return ".".join([parts[-2].removeprefix("self_"), parts[-1]] if len(parts) > 1 else parts)


def family_table(repeat: int) -> str:
    rows = ["| family | blocks | matrices of a block (forward order) | input groups | FFN | discovery (ms) |",
            "|---|---|---|---|---|---:|"]
    for name, make in FAMILIES.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make()).eval()
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            s = discover(model)
            best = min(best, time.perf_counter() - start)
        names = [r for r in s.linear_names() if not s.is_expert(r)]
        conv = " (Conv1D)" if s.transposed else ""
        groups = " · ".join("{" + ", ".join(_short(r) for r in g) + "}" for g in s.groups if not s.is_expert(g[0]))
        if s.ffn.verified:
            ffn = f"{s.ffn.kind}: " + (f"{_short(s.ffn.down)}({s.ffn.act}({_short(s.ffn.gate)}) * {_short(s.ffn.up)})"
                                       if s.ffn.gate else f"{_short(s.ffn.down)}({s.ffn.act}({_short(s.ffn.up)}))")
        else:
            ffn = f"not verified: {s.ffn.reason}"
        experts = ""
        if s.experts:
            stored = {c.transposed for c in s.experts}
            experts = (f" + experts: {s.experts[0].num_experts} × {{{', '.join(c.path.split('.')[-1] for c in s.experts)}}}"
                       f" (3-D, stored {'in x out' if True in stored else 'out x in'}), one Gram matrix each")
        if s.details.get("routers"):
            experts += f"; routers not pruned: {', '.join(s.details['routers'])}"
        rows.append(f"| {name} | `{s.blocks_path}` × {len(model.get_submodule(s.blocks_path))} | "
                    f"{len(names)}{conv}: {', '.join(_short(r) for r in names)}{experts} | {groups} | {ffn} | "
                    f"{best * 1000:.0f} |")
    return "\n".join(rows)


def _weights_sha(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def smollm2(blocks: str, nsamples: int, seqlen: int, data_dir: str | None) -> str:
    import lmprune
    from lmprune import api
    from lmprune.config import build_config

    model, tok, _ = lmprune.load_model("smollm2-135m")
    start = time.perf_counter()
    s = discover(model)
    took = time.perf_counter() - start
    same = (s.blocks_path, s.groups, s.ffn.kind, s.ffn.up, s.ffn.gate, s.ffn.down, s.ffn.act) == (
        OLD_LLAMA.blocks_path, OLD_LLAMA.groups, "swiglu", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj", "silu")
    config = build_config(method="sparsegpt", sparsity=0.5, calib="c4", nsamples=nsamples, seqlen=seqlen,
                          blocks=blocks, data_dir=data_dir)
    hashes = {}
    for label, adapter in (("old table", OLD_LLAMA), ("discovered", None)):
        m = copy.deepcopy(model)
        if adapter is not None:
            declare(m, adapter)
        api.prune(m, tok, config, progress=False)
        hashes[label] = _weights_sha(m)
    return (f"smollm2-135m: discovery {took * 1000:.0f} ms, {len(model.get_submodule(s.blocks_path))} blocks, "
            f"groups and FFN {'identical to' if same else 'DIFFERENT from'} the old table; SparseGPT 50% on blocks "
            f"{blocks} ({nsamples} x {seqlen} C4 tokens, {torch.get_num_threads()} threads): weights sha256 "
            f"old table {hashes['old table']}, discovered {hashes['discovered']} -> "
            f"{'bit-identical' if len(set(hashes.values())) == 1 else 'DIFFERENT'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--smollm2", action="store_true")
    ap.add_argument("--blocks", default="0-3")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    print(family_table(args.repeat))
    if args.smollm2:
        print()
        print(smollm2(args.blocks, args.nsamples, args.seqlen, args.data_dir))


if __name__ == "__main__":
    main()
