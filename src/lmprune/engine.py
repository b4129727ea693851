"""The block loop, and nothing else: it owns devices, hooks, progress and the per-layer records; methods own math.

For calibration windows ``X⁰`` (the embeddings of ``nsamples`` token windows):

1. :func:`capture_inputs` fills an :class:`~lmprune.activations.ActivationStore` with the hidden states entering
   block 0 and the keyword arguments the model calls its blocks with (attention mask, position ids, rotary
   ``position_embeddings`` ...), by stopping the model at block 0;
2. :func:`run_engine`, for each block ``b`` (moved alone to the compute device):
   a. the *block strategy* prunes its matrices through a :class:`BlockContext` -- by default one pass of the
      inputs through the block with hooks accumulating ``H = Σ xxᵀ`` (float64 sums of float32 window products,
      rounded once to float32) per shared input, then for every
      matrix the run's :class:`~lmprune.layer_pruner.LayerPruner` (solver → refiner at the run's pattern);
   b. the pruned block's outputs on the same inputs replace them in the store (error propagation);
   c. the ``events`` object hears of the block's start and end (streaming loads and writes a block there, the
      checkpoint saves the store there).

The seam is narrow: :class:`EngineOptions`, one :class:`BlockEvents`, one store, one layer pruner, one strategy.
Nothing here calls back into the pipeline or the API.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .activations import ActivationStore, TokenRows, trim_host_memory
from .distributed import SINGLE, World
from .gram_sum import GramSum
from .layer_pruner import LayerPruner
from .models.adapters import FamilyAdapter
from .models.discovery import call_blocks
from .models.experts import ExpertMatrix, tap_experts
from .solvers.base import Gram, SolveResult, all_finite, reconstruction_error


def _windows(x: Tensor) -> Iterable[Tensor]:
    """A hooked input as ``tokens x in`` float32 rows, one window at a time: a batched pass (``b x seq x in``)
    is split so that sums are added per window whatever the batch, or the rank, holds; routed expert tokens
    (already ``tokens x in``) come as they are."""
    for window in x if x.ndim == 3 else [x]:
        yield window.reshape(-1, window.shape[-1]).float()


@torch.no_grad()
def capture_inputs(
    model: nn.Module, adapter: FamilyAdapter, windows: Tensor, store: ActivationStore, progress: bool = True
) -> None:
    """Append the hidden states entering block 0 for each window (``1 x seqlen x d``) to ``store`` and set the
    keyword arguments the model calls each block with (from the first window; they are the same for every
    window of one length, and may differ between blocks: sliding-window and global attention masks).

    Runs on the model's current device (the CPU for large models); no block is run: the model's forward meets
    stubs in their place (:func:`~lmprune.models.discovery.call_blocks`), only the embedding and whatever
    precedes the blocks are computed.
    """
    blocks = adapter.blocks(model)
    device = next(model.parameters()).device
    per_block: list[dict[str, Any]] = []
    for k, row in enumerate(tqdm(windows, desc="calibration", disable=not progress, leave=False)):
        calls = call_blocks(model, blocks, row.unsqueeze(0).to(device), all_blocks=k == 0)
        store.append(calls[0].hidden.detach())
        if k == 0:
            per_block = [c.replay_kwargs() for c in calls]
    if per_block:
        same = all(kw.keys() == per_block[0].keys() and all(kw[n] is per_block[0][n] for n in kw)
                   for kw in per_block)
        store.set_kwargs(per_block[0], None if same else per_block)


def capture_kwargs(model: nn.Module, adapter: FamilyAdapter, window: Tensor, store: ActivationStore) -> None:
    """Only the block keyword arguments, from one window (a resumed run restores the hidden states itself)."""
    with ActivationStore("cpu") as scratch:
        capture_inputs(model, adapter, window.reshape(1, -1), scratch, progress=False)
        store.set_kwargs(scratch.kwargs, scratch.block_kwargs)


def _block_output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class LayerRecord:
    """One pruned matrix, as it appears in ``lmprune.json``'s ``layers`` list."""

    name: str
    block: int
    shape: list[int]
    target: float
    sparsity: float
    rel_error: float
    abs_error: float
    pattern_ok: bool
    time_s: float
    stats: dict[str, Any] = field(default_factory=dict)
    #: seconds spent computing ``rel_error`` / ``abs_error`` (as many ``out · in²`` products as a solve)
    error_time_s: float = 0.0


class BlockContext:
    """What a block strategy may use: the block, its calibration inputs, Gram collection and the layer pruner."""

    def __init__(self, index: int, block: nn.Module, adapter: FamilyAdapter, store: ActivationStore,
                 pruner: LayerPruner, batch_windows: int = 1, world: World = SINGLE):
        self.index = index
        #: The ranks: ``store`` holds this rank's share of the windows; sums are all-reduced over the ranks.
        self.world = world
        self.block = block
        self.adapter = adapter
        self.store = store
        self.pruner = pruner
        #: Windows per forward pass: more is faster on a GPU; the results agree up to float rounding.
        self.batch_windows = max(1, int(batch_windows))
        self.device = store.device
        self.records: list[LayerRecord] = []
        self.pass_time_s = 0.0  # seconds spent running calibration inputs through the block
        self._linears = adapter.linears(block)
        #: The adapter's input groups restricted to this block's matrices (blocks may differ: dense and MoE).
        self.groups = tuple(g for g in (tuple(r for r in group if r in self._linears) for group in adapter.groups) if g)
        #: Per expert matrix of the last Gram collection: routed tokens and the fallback used, if any.
        self.expert_notes: dict[str, dict[str, Any]] = {}

    @property
    def pattern(self):
        return self.pruner.pattern

    def full_name(self, rel: str) -> str:
        return self.adapter.full_name(self.index, rel)

    def linear(self, rel: str) -> nn.Linear:
        return self._linears[rel]

    @property
    def names(self) -> list[str]:
        """This block's prunable matrices, in forward order."""
        return list(self._linears)

    def target(self, rel: str) -> float:
        return self.pruner.targets[self.full_name(rel)]

    def _timed_sync(self, start: float) -> None:
        if self.device.type == "cuda":  # else the queued kernels' time would be charged to the next solve
            torch.cuda.synchronize(self.device)
        self.pass_time_s += time.perf_counter() - start

    @torch.no_grad()
    def _run_inputs(self) -> None:
        """One pass of every window through the block (outputs dropped; hooks collect what they need)."""
        start = time.perf_counter()
        for x in self.store.batches(self.batch_windows):
            self.block(x, **self.store.kwargs_for(self.index))
        self._timed_sync(start)

    @torch.no_grad()
    def propagate(self) -> None:
        """Replace the store's windows by the block's outputs with its current weights."""
        start = time.perf_counter()
        kwargs = self.store.kwargs_for(self.index)
        self.store.propagate(lambda x: _block_output(self.block(x, **kwargs)), self.batch_windows)
        self._timed_sync(start)

    @contextmanager
    def _hooks(self, rels: Iterable[str], fn: Callable[[str, Tensor, Tensor], None]):
        """``fn(rel, input, output)`` on every call of the matrices ``rels`` during the ``with`` body: forward
        hooks on modules, a product tap on slices of 3-D expert parameters (only the routed tokens reach either)."""
        rels = list(rels)
        slices = {r: m for r in rels if isinstance(m := self._linears[r], ExpertMatrix)}
        params = {str(id(m.param)): m.param for m in slices.values()}  # the tap names them by these keys
        sliced = {(str(id(m.param)), m.index): r for r, m in slices.items()}

        def on_expert(path: str, expert: int, _transposed: bool, x: Tensor, out: Tensor) -> None:
            rel = sliced.get((path, expert))
            if rel is not None:
                fn(rel, x, out)

        handles = [self._linears[r].register_forward_hook(lambda m, a, o, r=r: fn(r, a[0], o))
                   for r in rels if r not in slices]
        try:
            with tap_experts(self.block, params, on_expert):
                yield
        finally:
            for h in handles:
                h.remove()

    def _leaders(self, rels: list[str]) -> dict[str, str]:
        return {r: g[0] for g in self.groups for r in g if r in rels}

    @torch.no_grad()
    def collect_grams(self, rels: Iterable[str], expert_min_tokens: int = 1,
                      owners: Mapping[str, int] | None = None) -> dict[str, Gram | None]:
        """One pass through the block; ``H = Σ xxᵀ`` of each linear's input, summed in float64 over windows and
        ranks (:class:`~lmprune.gram_sum.GramSum`, lower triangle) and rounded once to float32.

        ``owners`` (the rank that solves each of ``rels``) limits each Gram matrix to the ranks whose matrices
        read it: summed into that rank alone when there is one, else over all ranks; the other ranks get None
        for it. Without ``owners`` every rank gets every Gram matrix.

        Linears of one input group share a single :class:`Gram` object (and its cached factorisations). An
        expert's matrices get the Gram matrix of the tokens routed to it; an expert that received fewer than
        ``expert_min_tokens`` of them falls back to ``H = I`` (every solver then prunes it by magnitude), noted
        in :attr:`expert_notes` and in its layer record.
        """
        rels = list(rels)
        group_of = self._leaders(rels)
        leaders = list(dict.fromkeys(group_of[r] for r in rels))
        acc: dict[str, list] = {}
        f64 = torch.float64
        for lead in leaders:
            d = self._linears[lead].in_features
            acc[lead] = [GramSum(d, self.device), torch.zeros(d, dtype=f64, device=self.device), 0]

        def add(rel: str, x: Tensor, _out: Tensor) -> None:
            h, s, _ = acc[rel]
            for window in _windows(x):
                h.add_(window)
                s.add_(window.sum(0))
                acc[rel][2] += window.shape[0]

        with self._hooks(leaders, add):
            self._run_inputs()
        members = {lead: [r for r in rels if group_of[r] == lead] for lead in leaders}
        mine = {lead: [r for r in m if not owners or owners[r] == self.world.rank] for lead, m in members.items()}
        needed = {lead: {owners[r] for r in m} if owners else set(range(self.world.size))
                  for lead, m in members.items()}
        if self.world.size > 1:
            for lead in leaders:
                h, s = acc[lead][:2]
                count = torch.tensor([acc[lead][2]], dtype=torch.float64, device=s.device)
                if len(needed[lead]) == 1:
                    self.world.all_reduce_([count])
                    self.world.reduce_([*h.panels, s], next(iter(needed[lead])))
                else:
                    self.world.all_reduce_([*h.panels, s, count])
                acc[lead][2] = int(count.item())
        self.expert_notes = {}
        grams: dict[str, Gram | None] = {}
        for lead in leaders:
            h, s, n = acc.pop(lead)
            if self.adapter.is_expert(lead):
                fallback = n < expert_min_tokens
                for r in members[lead]:
                    self.expert_notes[r] = {"routed_tokens": n, "fallback": "magnitude" if fallback else ""}
            else:
                fallback = False
            if not mine[lead]:  # no matrix of this rank reads it
                grams[lead] = None
                continue
            h, s = h.rounded(), s.float()  # one rounding to float32, after all windows and ranks are summed
            if fallback:
                h = torch.eye(h.shape[0], device=h.device)
                s, n = torch.zeros_like(s), 0
            grams[lead] = Gram(h, n, s, shared_by=len(mine[lead]))  # the readers this rank solves
        return {r: grams[group_of[r]] for r in rels}

    @torch.no_grad()
    def collect_input_norms(self, rels: Iterable[str]) -> dict[str, Tensor]:
        """One pass through the block; ``‖X_j‖₂`` of each linear's input (one per input group), summed in float64
        like the Gram matrices (see :mod:`~lmprune.gram_sum`) and returned in float32. An
        expert that no token was routed to gets unit norms (its matrices are then judged by magnitude)."""
        rels = list(rels)
        group_of = self._leaders(rels)
        leaders = list(dict.fromkeys(group_of.values()))
        acc = {lead: torch.zeros(self._linears[lead].in_features, dtype=torch.float64, device=self.device)
               for lead in leaders}

        def add(rel: str, x: Tensor, _out: Tensor) -> None:
            for window in _windows(x):
                acc[rel].add_(window.pow(2).sum(0))

        with self._hooks(leaders, add):
            self._run_inputs()
        self.world.all_reduce_([acc[lead] for lead in leaders])
        norms = {}
        for lead in leaders:
            if self.adapter.is_expert(lead) and not acc[lead].any():
                acc[lead].fill_(1.0)
            norms[lead] = acc[lead].sqrt().float()
        return {r: norms[group_of[r]] for r in rels}

    @torch.no_grad()
    def capture_rows(self, rel: str, directory: str | None = None) -> TokenRows:
        """One pass through the block; the inputs of the (non-expert) linear ``rel`` as ``tokens x features``
        float32 rows, every rank's tokens in window order, in memory on the compute device or (``directory``) in
        a file there, written a window (batch) at a time as the pass produces them."""
        if self.adapter.is_expert(rel):
            raise ValueError(f"{rel} is an expert matrix: its routed tokens are not known before the pass")
        rows = TokenRows(self.store.tokens, self._linears[rel].in_features, self.device, directory)
        filled = 0

        def keep(_rel: str, x: Tensor, _out: Tensor) -> None:
            nonlocal filled
            t = x.reshape(-1, x.shape[-1]).float()
            rows.write(slice(filled, filled + t.shape[0]), t)
            filled += t.shape[0]

        try:
            with self._hooks([rel], keep):
                self._run_inputs()
            if filled != rows.shape[0]:
                raise RuntimeError(f"{self.full_name(rel)} saw {filled} tokens, the store holds {rows.shape[0]}")
        except BaseException:
            rows.close()
            raise
        return self.world.gather_token_rows(rows, directory)

    def inner_solve(self, rel: str, weight: Tensor, gram: Gram, target: float | None = None) -> SolveResult:
        """The run's layer pruner on one matrix; pure, nothing written."""
        return self.pruner.solve(weight, gram, self.target(rel) if target is None else target)

    @torch.no_grad()
    def layer_error(self, rel: str, dense: Tensor, result: SolveResult, gram: Gram) -> LayerError:
        """The reconstruction error of ``result`` against ``dense`` as the linear will store it (in its dtype).

        Strategies that spread solves over ranks call it on the owner rank, so each rank pays for its own
        matrices' errors only, and pass it to :meth:`commit`."""
        start = time.perf_counter()
        lin = self._linears[rel]
        err, rel_err = reconstruction_error(dense, result.weight.to(dense.device, lin.weight.dtype), gram)
        return LayerError(err, rel_err, time.perf_counter() - start)

    @torch.no_grad()
    def commit(self, rel: str, result: SolveResult, error: LayerError, seconds: float = 0.0):
        """Write ``result.weight`` into the linear and record its sparsity and ``error`` (:meth:`layer_error`,
        measured before the write, by whichever rank solved the matrix)."""
        lin = self._linears[rel]
        new = result.weight.to(lin.weight.dtype)
        if not all_finite(new):
            raise FloatingPointError(f"solver produced NaN/Inf for {self.full_name(rel)}")
        lin.weight.copy_(new)
        target = self.target(rel)
        check = self.pruner.verify(lin.weight.data, target, result)
        stats = {k: v for k, v in result.stats.items() if isinstance(v, (int, float, str, bool))}
        stats.update(self.expert_notes.get(rel, {}))
        self.records.append(
            LayerRecord(
                self.full_name(rel), self.index, list(lin.weight.shape), self.pattern.effective_sparsity(target),
                check.achieved_sparsity, error.rel, error.abs, check.ok, seconds, stats, error.seconds,
            )
        )
        if not check.ok:
            raise AssertionError(f"{self.full_name(rel)} violates pattern {check.detail}")
        trim_host_memory()  # the solve's and the error's temporaries, so they do not pile up over a block's matrices


@dataclass(frozen=True)
class LayerError:
    """``tr((W−Ŵ) H (W−Ŵ)ᵀ)`` of one matrix, relative to ``tr(W H Wᵀ)``, and the seconds it took."""

    abs: float
    rel: float
    seconds: float


BlockStrategy = Callable[[BlockContext], None]


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs; none of it changes a result (beyond float rounding for ``batch_windows``)."""

    #: Blocks whose matrices the strategy prunes; the others are propagated dense. None: all.
    prune_blocks: frozenset[int] | None = None
    #: The first block to run (a resumed run starts after its last checkpoint) and the one to stop before
    #: (None: run to the last block).
    start_block: int = 0
    end_block: int | None = None
    #: Calibration windows per forward pass through a block.
    batch_windows: int = 1
    progress: bool = True
    desc: str = "blocks"
    #: The ranks the windows are split across (their store holds this rank's share).
    world: World = SINGLE


@dataclass
class BlockDone:
    """What the engine tells its events after block ``index``: the store now holds block ``index + 1``'s
    inputs."""

    index: int
    store: ActivationStore
    records: list[LayerRecord]
    pass_time_s: float  # calibration passes through this block
    block_time_s: float


class BlockEvents:
    """Hooks around every block; the default does nothing. Streaming loads a block's weights in
    :meth:`block_start` and writes them in :meth:`block_done`; the checkpoint saves the store there."""

    def block_start(self, index: int) -> None:
        pass

    def block_done(self, done: BlockDone) -> None:
        pass


class EventChain(BlockEvents):
    """Several events objects, called in order (a block is written before a checkpoint names it)."""

    def __init__(self, *events: BlockEvents | None):
        self.events = [e for e in events if e is not None]

    def block_start(self, index: int) -> None:
        for e in self.events:
            e.block_start(index)

    def block_done(self, done: BlockDone) -> None:
        for e in self.events:
            e.block_done(done)


@dataclass
class EngineResult:
    records: list[LayerRecord] = field(default_factory=list)
    block_times: list[float] = field(default_factory=list)
    calibration_time_s: float = 0.0  # every pass of the inputs through a block


def run_engine(
    model: nn.Module,
    adapter: FamilyAdapter,
    store: ActivationStore,
    pruner: LayerPruner | None,
    strategy: BlockStrategy,
    options: EngineOptions,
    events: BlockEvents,
) -> EngineResult:
    """Run ``store``'s windows through the blocks from ``options.start_block`` on, pruning each selected block
    with ``strategy`` (``pruner`` is what it solves with; None for a pass that only collects statistics) and
    propagating the pruned block's outputs. Blocks not selected are propagated unchanged."""
    blocks = adapter.blocks(model)
    result = EngineResult()
    end = len(blocks) if options.end_block is None else options.end_block
    bar = tqdm(range(options.start_block, end), desc=options.desc, disable=not options.progress)
    for i in bar:
        start = time.perf_counter()
        events.block_start(i)
        block = blocks[i]
        home = next(block.parameters()).device
        block.to(store.device)
        ctx = BlockContext(i, block, adapter, store, pruner, options.batch_windows, options.world)
        if options.prune_blocks is None or i in options.prune_blocks:
            strategy(ctx)
        ctx.propagate()
        block.to(home)
        result.records.extend(ctx.records)
        result.calibration_time_s += ctx.pass_time_s
        seconds = time.perf_counter() - start
        result.block_times.append(seconds)
        events.block_done(BlockDone(i, store, ctx.records, ctx.pass_time_s, seconds))
        if ctx.records:
            bar.set_postfix(err=f"{sum(r.rel_error for r in ctx.records) / len(ctx.records):.4f}")
        trim_host_memory()  # after the events, which may have written and dropped the block (streaming)
    return result
