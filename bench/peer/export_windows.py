"""Export lmprune's own calibration windows for one seed, so that llm-compressor is fed exactly the same tokens.

Runs in lmprune's Python (``PYTHONPATH=src``). Writes ``OUT`` (a ``torch.save`` of a ``(nsamples, seqlen)`` int64
tensor) and prints its sha256, computed as lmprune's manifest computes ``calibration.windows_sha256``
(``sha256(windows.numpy().tobytes())``), so the two can be compared.

    python bench/peer/export_windows.py --model DIR --seed 0 --nsamples 32 --seqlen 512 --out windows_s0.pt
"""

from __future__ import annotations

import argparse
import hashlib

import torch
from transformers import AutoTokenizer

from lmprune.data.calibration import sample_windows
from lmprune.data.sources import load_source


def windows_sha256(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.numpy().tobytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    source = load_source(args.calib, "calib")  # $LMPRUNE_DATA_DIR, as `lmprune prune --calib` reads it
    windows = sample_windows(source, tokenizer, args.nsamples, args.seqlen, args.seed)
    torch.save(windows, args.out)
    print(windows_sha256(windows))


if __name__ == "__main__":
    main()
