"""Peak memory of one window through one decoder block, by attention implementation, against the memory plan's
"block forward intermediates" term (issue 18: the plan counted the attention scores, which SDPA never forms).

    python bench/scale/forward_memory.py --d 4096 --dff 11008 --heads 32 --seqlen 2048 --attn sdpa eager

A LLaMA-shaped block is built from transformers' config class with random weights in ``--dtype``; one window of
random hidden states goes through it under ``torch.no_grad`` (as in the engine's passes), with the causal mask
the model would pass (none for SDPA, whose kernel is causal by itself; an additive one for eager attention).
Peak RSS above the baseline is sampled every millisecond; one JSON line per implementation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matrix_memory import PeakRSS  # noqa: E402


def block_forward_peak(d: int, dff: int, heads: int, seqlen: int, dtype: torch.dtype, attn: str) -> float:
    """MiB above the baseline while one ``seqlen``-token window goes through a fresh block."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=d, intermediate_size=dff, num_attention_heads=heads, num_key_value_heads=heads,
                      num_hidden_layers=1)
    cfg._attn_implementation = attn
    with torch.device("meta"):
        layer = LlamaDecoderLayer(cfg, 0)
    layer.to_empty(device="cpu")
    layer.to(dtype)
    for p in layer.parameters():
        p.data.normal_(0, 0.02)
    x = torch.randn(1, seqlen, d, dtype=dtype)
    positions = torch.arange(seqlen).unsqueeze(0)
    rope = LlamaRotaryEmbedding(cfg)(x, positions)
    mask = None
    if attn == "eager":
        mask = torch.full((seqlen, seqlen), float("-inf")).triu(1)[None, None].to(dtype)
    with torch.no_grad(), PeakRSS(every=0.001) as peak:
        layer(x, attention_mask=mask, position_embeddings=rope, position_ids=positions)
    return peak.above_base_mib


def planned_mib(d: int, dff: int, heads: int, seqlen: int, width: int, attn: str) -> float:
    from lmprune.run.memory import _forward_bytes

    return _forward_bytes(attn, heads, seqlen, d, dff, width) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--dff", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--attn", nargs="+", default=["sdpa", "eager"])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    width = torch.finfo(dtype).bits // 8
    for attn in a.attn:
        peak = block_forward_peak(a.d, a.dff, a.heads, a.seqlen, dtype, attn)
        print(json.dumps({"d": a.d, "dff": a.dff, "heads": a.heads, "seqlen": a.seqlen, "dtype": a.dtype,
                          "attn": attn, "peak_above_base_mib": round(peak, 1),
                          "planned_mib": round(planned_mib(a.d, a.dff, a.heads, a.seqlen, width, attn), 1)}),
              flush=True)


if __name__ == "__main__":
    main()
