"""Prune a model with llm-compressor (``oneshot`` + ``SparseGPTModifier`` / ``WandaPruningModifier``) on windows
exported by ``export_windows.py``, and save it as a plain HF directory that ``lmprune eval`` reads.

Runs in llm-compressor's own virtual environment (see ``bench/peer/README.md``); imports nothing of lmprune.
The windows are fed through a ``DataLoader`` of batch size 1 in their stored order (no shuffling, no
length-sorting sampler); a pre-forward hook on the embedding records every calibration window the model sees,
and the sha256 of the first ``nsamples`` of them is written to ``llmc.json`` (``seen_windows_sha256``) to be
compared with lmprune's manifest. Every ``Linear`` inside the decoder blocks is pruned; ``lm_head`` is ignored
(SmolLM2 ties it to the embedding, and lmprune does not prune it either).

    python bench/peer/llmc_prune.py --model DIR --windows w.pt --method sparsegpt --sparsity 0.7 --out OUT
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch


def sha256(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.contiguous().numpy().tobytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--windows", required=True)
    ap.add_argument("--method", choices=["sparsegpt", "wanda"], required=True)
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--pattern", default="unstructured", help="unstructured or N:M")
    ap.add_argument("--dampening", type=float, default=0.01, help="SparseGPT dampening_frac (its default 0.01)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

    windows = torch.load(args.windows)
    assert windows.dtype == torch.long and windows.dim() == 2, windows.shape
    nsamples = windows.shape[0]
    t_start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    seen: list[torch.Tensor] = []
    handle = model.get_input_embeddings().register_forward_pre_hook(
        lambda _m, inputs: seen.append(inputs[0].detach().clone()) if torch.is_tensor(inputs[0]) else None)

    mask_structure = "0:0" if args.pattern == "unstructured" else args.pattern
    common = dict(sparsity=args.sparsity, mask_structure=mask_structure, targets=["Linear"],
                  ignore=["re:.*lm_head"])
    if args.method == "sparsegpt":
        modifier = SparseGPTModifier(block_size=args.block_size, dampening_frac=args.dampening, **common)
    else:
        modifier = WandaPruningModifier(**common)

    loader = DataLoader([{"input_ids": w} for w in windows], batch_size=1, shuffle=False)
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, recipe=[modifier], dataset=loader, num_calibration_samples=nsamples,
            max_seq_length=windows.shape[1], shuffle_calibration_samples=False, pipeline="sequential")
    prune_s = time.perf_counter() - t0
    handle.remove()

    calls = [s.reshape(-1) for s in seen if s.device.type != "meta" and s.numel() == windows.shape[1]]  # not the tracer's
    seen_sha = sha256(torch.stack(calls[:nsamples])) if len(calls) >= nsamples else None

    # plain HF directory: the source's config and tokenizer files, the pruned weights under the source's own keys
    out = Path(args.out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(Path(args.model) / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    state = model.state_dict()
    save_file({k: state[k].detach().to(torch.float32).contiguous() for k in keys}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    for p in Path(args.model).iterdir():
        if p.is_file() and p.name != "model.safetensors":
            shutil.copy2(p, tmp / p.name)

    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            layers[name] = float((mod.weight == 0).float().mean())
    pruned = [v for v in layers.values()]
    report = {
        "tool": "llm-compressor",
        "versions": {"llmcompressor": llmcompressor.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "torch_threads": torch.get_num_threads()},
        "method": args.method, "sparsity": args.sparsity, "pattern": args.pattern,
        "options": {"block_size": args.block_size, "dampening_frac": args.dampening} if args.method == "sparsegpt"
        else {},
        "windows_file": str(args.windows), "windows_sha256": sha256(windows),
        "seen_windows_sha256": seen_sha, "embedding_calls": len(calls),
        "nsamples": nsamples, "seqlen": windows.shape[1],
        "prune_s": prune_s, "load_and_prune_s": time.perf_counter() - t_start,
        "peak_rss_mb_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "achieved_sparsity_mean": sum(pruned) / len(pruned), "pruned_matrices": len(pruned),
        "layers": layers,
    }
    (tmp / "llmc.json").write_text(json.dumps(report, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(json.dumps({k: report[k] for k in ("windows_sha256", "seen_windows_sha256", "embedding_calls", "prune_s",
                                              "achieved_sparsity_mean", "pruned_matrices")}))


if __name__ == "__main__":
    main()
