"""Perplexity of a streamed model, one block in memory at a time.

The evaluation windows take the same road as the calibration windows: their hidden states entering block 0 go
into an activation store, the engine runs them through every block but the last (each block read from the
shards by the model source's events and dropped again), and the last block runs inside the model's own forward
pass -- the module list temporarily holding only that block, fed the stored hidden states -- so that whatever
the model does after its blocks (final norm, head, logit scaling) is the model's own code. The windows are the
in-memory evaluation's (:func:`lmprune.evaluation.perplexity.windows_of`), scored the same way.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..activations import ActivationStore
from ..config import EvalRequest, PruneConfig
from ..engine import BlockDone, BlockEvents, EngineOptions, capture_inputs, run_engine
from ..evaluation.perplexity import PerplexityResult, eval_windows, window_nll
from ..models.adapters import FamilyAdapter, get_adapter
from ..models.loading import default_seqlen
from .sources import LoadedModel


class _FedBlock(nn.Module):
    """Stands in for the block list inside the model's forward: runs ``block`` on the stored hidden states of the
    current batch instead of what the (skipped) earlier blocks would have produced."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.hidden: Tensor | None = None

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.block(self.hidden, *args, **kwargs)


@contextmanager
def _only_block(model: nn.Module, adapter: FamilyAdapter, fed: _FedBlock) -> Iterator[None]:
    parent, _, leaf = adapter.blocks_path.rpartition(".")
    owner = model.get_submodule(parent)
    blocks = getattr(owner, leaf)
    setattr(owner, leaf, nn.ModuleList([fed]))
    try:
        yield
    finally:
        setattr(owner, leaf, blocks)


@torch.no_grad()
def _stream_ppl(loaded: LoadedModel, windows: Tensor, events: BlockEvents, config: PruneConfig,
                request: EvalRequest, progress: bool) -> float:
    model = loaded.model
    adapter = get_adapter(model)
    last = len(adapter.blocks(model)) - 1
    with ActivationStore("cpu", "device" if config.offload_dir is None else "files", config.offload_dir) as store:
        capture_inputs(model, adapter, windows, store, progress=False)
        options = EngineOptions(prune_blocks=frozenset(), end_block=last, batch_windows=request.ppl_batch_size,
                                progress=progress, desc="ppl blocks")
        run_engine(model, adapter, store, None, lambda ctx: None, options, events)
        events.block_start(last)
        fed = _FedBlock(adapter.blocks(model)[last])
        nll = torch.zeros((), dtype=torch.float64)
        step = request.ppl_batch_size
        with _only_block(model, adapter, fed):
            for i, hidden in zip(range(0, len(windows), step), store.batches(step)):
                batch = windows[i : i + step]
                fed.hidden = hidden
                nll += window_nll(model(batch, use_cache=False).logits, batch)
        events.block_done(BlockDone(last, store, [], 0.0, 0.0))
    return math.exp(nll.item() / len(windows))


def streamed_perplexities(loaded: LoadedModel, request: EvalRequest, config: PruneConfig, progress: bool,
                          after_pruning: bool) -> dict[str, Any]:
    """As :func:`lmprune.run.evaluate.perplexities`, reading each block from the source shards (dense) or from
    the pruned run's output shards (``after_pruning``)."""
    from ..data.sources import load_source

    seqlen = request.seqlen or default_seqlen(loaded.model.config)
    out: dict[str, Any] = {"eval_windows": request.windows, "seqlen": seqlen, "details": {}, "streamed": True}
    for ds in request.datasets:
        source = load_source(ds, "eval", config.data_dir)
        windows, available = eval_windows(source, loaded.tokenizer, ds, seqlen, request.windows)
        events = loaded.output_events() if after_pruning else loaded.read_events()
        ppl = _stream_ppl(loaded, windows, events, config, request, progress)
        n = windows.shape[0]
        out[ds] = ppl
        out["details"][ds] = PerplexityResult(ds, ppl, n, available, seqlen, n * seqlen, source.origin,
                                              source.sha256).to_dict()
    return out
