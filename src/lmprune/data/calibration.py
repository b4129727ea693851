"""Calibration windows: ``nsamples`` random token windows of ``seqlen`` tokens, reproducible from a seed.

Document sources (C4, JSONL files) follow the SparseGPT loader: pick a random document whose tokenisation is
longer than the window, then a random offset inside it. Stream sources (WikiText-2, PTB, a text file) and
document sources without any document long enough sample random offsets in the joined token stream.
"""

from __future__ import annotations

import random

import torch

from .sources import DataError, TextSource


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sample_windows(source: TextSource, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``(nsamples, seqlen)`` LongTensor of calibration windows."""
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    rng = random.Random(seed)
    if not source.stream:
        windows = _from_documents(source, tokenizer, nsamples, seqlen, rng)
        if windows is not None:
            return windows
    ids = _encode(tokenizer, source.joined())
    if len(ids) <= seqlen:
        raise DataError(
            f"calibration text {source.name!r} has {len(ids)} tokens, shorter than one window of {seqlen}"
        )
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return torch.tensor([ids[s : s + seqlen] for s in starts], dtype=torch.long)


def _from_documents(source: TextSource, tokenizer, nsamples: int, seqlen: int, rng: random.Random):
    cache: dict[int, list[int]] = {}
    long_enough = None
    windows = []
    while len(windows) < nsamples:
        i = rng.randint(0, len(source.documents) - 1)
        if i not in cache:
            cache[i] = _encode(tokenizer, source.documents[i])
        ids = cache[i]
        if len(ids) <= seqlen:
            if long_enough is None and len(cache) > min(len(source.documents), 200):
                long_enough = any(len(_encode(tokenizer, d)) > seqlen for d in source.documents)
                if not long_enough:
                    return None
            continue
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)
