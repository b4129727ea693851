"""Perplexity by the SparseGPT/Wanda protocol: one token stream, non-overlapping windows, exp(mean NLL).

The stream is the tokenised evaluation text (see :mod:`lmprune.data.sources` for how each dataset is joined);
it is cut into ``seqlen``-token windows, the last partial window is dropped, and the perplexity is
``exp`` of the mean next-token negative log-likelihood over all windows evaluated. C4 uses at most the first
256 windows, as in the papers. ``max_windows`` caps the count; the cap is always reported.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.sources import TextSource, load_source

C4_MAX_WINDOWS = 256


@dataclass
class PerplexityResult:
    dataset: str
    perplexity: float
    windows: int
    windows_available: int
    seqlen: int
    tokens_evaluated: int
    source: str
    sha256: str | None

    def to_dict(self) -> dict:
        return asdict(self)


_STREAMS: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def token_stream(source: TextSource, tokenizer) -> torch.Tensor:
    """The whole evaluation text tokenised once, as the papers do (special tokens as the tokenizer adds them).

    Kept per tokenizer object, so the dense and pruned evaluations of one process tokenise each text once.
    """
    cache = _STREAMS.setdefault(tokenizer, {})
    key = (source.origin, source.sha256)
    if key not in cache:
        cache[key] = tokenizer(source.joined(), return_tensors="pt").input_ids
    return cache[key]


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Sum over the windows of ``batch`` of each window's mean next-token negative log-likelihood (float64)."""
    nll = F.cross_entropy(logits.float()[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none").mean(dim=1)
    return nll.double().sum().cpu()


def split_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> tuple[torch.Tensor, int]:
    """``(windows n x seqlen, windows available)``: non-overlapping windows of the stream, the last partial one
    dropped, the first ``max_windows`` kept."""
    available = ids.shape[1] // seqlen
    if available == 0:
        raise ValueError(f"evaluation text has {ids.shape[1]} tokens, fewer than one window of {seqlen}")
    n = available if max_windows is None else min(available, max_windows)
    return ids[0, : n * seqlen].view(n, seqlen), available


def eval_windows(source: TextSource, tokenizer, dataset: str, seqlen: int,
                 max_windows: int | None = None) -> tuple[torch.Tensor, int]:
    """The evaluation windows of a dataset under the protocol (C4: at most 256 windows)."""
    ids = token_stream(source, tokenizer)
    if dataset == "c4":
        ids = ids[:, : C4_MAX_WINDOWS * seqlen]
    return split_windows(ids, seqlen, max_windows)


@torch.no_grad()
def stream_perplexity(
    model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None, device: str | torch.device = "cpu",
    progress: bool = True, desc: str = "ppl", batch_size: int = 1,
) -> tuple[float, int, int]:
    """``(ppl, windows evaluated, windows available)`` of ``model`` on the token stream ``ids`` (1 x N).

    ``batch_size`` windows go through the model at once (faster on a GPU; each window is still scored on its own,
    so the figure agrees with ``batch_size=1`` up to float rounding).
    """
    windows, available = split_windows(ids, seqlen, max_windows)
    n = windows.shape[0]
    nll_sum = torch.zeros((), dtype=torch.float64)
    step = max(1, int(batch_size))
    for w in tqdm(range(0, n, step), desc=desc, disable=not progress, leave=False):
        batch = windows[w : w + step].to(device)
        nll_sum += window_nll(model(batch, use_cache=False).logits, batch)
    return math.exp(nll_sum.item() / n), n, available


@dataclass(frozen=True)
class EvalSpec:
    """One perplexity evaluation: dataset, window length, window cap, and windows per forward pass."""

    dataset: str
    seqlen: int
    max_windows: int | None = None
    batch_size: int = 1


def perplexity(model, tokenizer, spec: EvalSpec, data_dir=None, device: str | torch.device = "cpu",
               progress: bool = True) -> PerplexityResult:
    source = load_source(spec.dataset, "eval", data_dir)
    windows, available = eval_windows(source, tokenizer, spec.dataset, spec.seqlen, spec.max_windows)
    ppl, n, _ = stream_perplexity(model, windows.reshape(1, -1), spec.seqlen, None, device, progress,
                                  f"ppl {spec.dataset}", spec.batch_size)
    return PerplexityResult(spec.dataset, ppl, n, available, spec.seqlen, n * spec.seqlen, source.origin,
                            source.sha256)
