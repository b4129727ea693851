"""Random-weight models with the exact shapes of LLaMA-2-7B/13B, LLaMA-3-8B and LLaMA-3-70B, written as bf16
safetensors shards (one per block) that ``lmprune prune --stream`` reads (issue 18).

Real weights of that size are not reachable here; random ones say nothing about quality and everything about
structure, memory and time. The model is never materialised: it is built on ``meta`` and each tensor is drawn
(normal, std 0.02; norms 1) and written shard by shard, so building a 7B model needs about one block of memory.
``--blocks N`` keeps N decoder blocks (the per-block tables need one or two; a whole-model run needs all).

    python bench/scale/shapes.py llama2-7b --blocks 2 --out /work/scale/llama2-7b-2
    python bench/scale/shapes.py llama3-70b --blocks 1 --out /work/scale/llama3-70b-1
    python bench/scale/shapes.py llama2-7b --out /work/scale/llama2-7b          # all 32 blocks, 13.5 GB
    python bench/scale/shapes.py llama3-70b --config-only --out /work/scale/llama3-70b-plan   # for --dry-run

The tokenizer is a small byte-level BPE (4096 tokens) trained on the WikiText-2 text of the data
directory (its test split: no evaluation of these random models is meaningful): any token id it produces is valid for every vocabulary here, and tokenisation cost is not what is
measured.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

#: The published shapes (config.json of each model).
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=500000.0),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0),
    # not a published model: LLaMA-2-7B's proportions (d_ff / d, head width) at a quarter of its width, for
    # measurements that scale a run's token count rather than its matrices
    "llama2-7b-quarter": dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=32, num_attention_heads=8,
                              num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096,
                              rms_norm_eps=1e-5),
}


def tokenizer(data_dir: Path, vocab: int = 4096) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = data_dir / "text" / "wikitext2_test.raw"  # structure only: which text trains it does not matter
    lines = text.read_text().splitlines() if text.exists() else ["the quick brown fox jumps over the lazy dog"]
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _draw(shape: tuple[int, ...], name: str, gen: torch.Generator) -> torch.Tensor:
    if "norm" in name:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def build(shape: str, out: Path, blocks: int | None, seed: int, data_dir: Path, config_only: bool = False) -> dict:
    sizes = dict(SHAPES[shape])
    if blocks is not None:
        sizes["num_hidden_layers"] = blocks
    config = LlamaConfig(**sizes, torch_dtype="bfloat16", tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    tokenizer(data_dir).save_pretrained(out)
    if config_only:  # what `lmprune prune --dry-run` reads: the memory plan of a model too large to write
        return {"shape": shape, "blocks": config.num_hidden_layers, "config_only": True}
    gen = torch.Generator().manual_seed(seed)
    n = config.num_hidden_layers
    shards: dict[str, dict[str, tuple]] = {}
    for name, p in model.state_dict().items():
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            shard = f"model-{index + 1:05d}-of-{n + 1:05d}.safetensors"
        else:
            shard = f"model-{n + 1:05d}-of-{n + 1:05d}.safetensors"
        shards.setdefault(shard, {})[name] = tuple(p.shape)
    weight_map, total = {}, 0
    start = time.perf_counter()
    for shard, tensors in shards.items():
        data = {name: _draw(shape, name, gen) for name, shape in tensors.items()}
        save_file(data, str(out / shard), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in data.values())
        weight_map.update({name: shard for name in tensors})
        del data
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    info = {"shape": shape, "blocks": n, "bytes": total, "parameters": total // 2, "seconds": time.perf_counter() - start}
    (out / "shape.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--blocks", type=int, default=None, help="decoder blocks to keep (default: the model's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("LMPRUNE_DATA_DIR", "../shared/data")))
    ap.add_argument("--config-only", action="store_true",
                    help="write the config and tokenizer only (enough for `lmprune prune --dry-run`)")
    args = ap.parse_args()
    print(json.dumps(build(args.shape, args.out, args.blocks, args.seed, args.data_dir, args.config_only)))


if __name__ == "__main__":
    main()
