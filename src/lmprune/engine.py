"""The layer-sequential pruning driver. It owns devices, hooks, progress and records; methods own the math.

For calibration windows ``X⁰`` (the embeddings of ``nsamples`` token windows):

1. capture the hidden states entering block 0 and every keyword argument the block is called with
   (attention mask, position ids, rotary ``position_embeddings`` ...), by stopping the model at block 0;
2. for each block ``b`` (moved alone to the compute device):
   a. a *block strategy* prunes its linears -- by default: one pass of the inputs through the block with
      hooks accumulating ``H = Σ xxᵀ`` (float32) per shared input, then for every linear
      ``solver(W, H, pattern, target)`` → refiner → write back;
   b. the pruned block's outputs on the same inputs become the next block's inputs (error propagation).

Only the current block and the calibration activations live on the compute device. With
``offload_activations`` the activations stay on the host instead: the inputs and outputs of every window are
kept on the CPU and each window is moved to the device alone for the block passes, so the device holds one
block, one window and the Gram matrices (what a block strategy captures for itself -- SparseLLM's FFN inputs
of all windows -- still lives on the device while that block is solved). With ``offload_dir`` the activations
go one step further, into files there (:class:`~lmprune.activations.WindowFile`), so that the host too holds one
window at a time. The arithmetic is unchanged, so the weights are the same as without offload.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .activations import WindowFile, release, trim_host_memory
from .models.adapters import FamilyAdapter
from .patterns import Pattern
from .solvers.base import Gram, SolveResult, reconstruction_error

InnerSolve = Callable[[Tensor, Gram, float], SolveResult]


class _StopForward(Exception):
    pass


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


_DROPPED_KWARGS = ("past_key_value", "past_key_values", "cache", "use_cache", "output_attentions")


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: FamilyAdapter, windows: Tensor, progress: bool = True, sink: Any = None
) -> tuple[list[Tensor], dict[str, Any]]:
    """Hidden states entering block 0 for each window (1 x seqlen x d), and the block's keyword arguments.

    Runs on the model's current device (the CPU for large models): only the embedding and whatever precedes
    the first block are computed. The hidden states are appended to ``sink`` (a fresh list by default).
    """
    first = adapter.blocks(model)[0]
    inputs: Any = [] if sink is None else sink
    kwargs: dict[str, Any] = {}

    def grab(module, args, kw):
        hidden = args[0] if args else kw["hidden_states"]
        inputs.append(hidden.detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states" and k not in _DROPPED_KWARGS})
        raise _StopForward

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for row in tqdm(windows, desc="calibration", disable=not progress, leave=False):
            try:
                model(row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


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


class BlockContext:
    """What a block strategy may use: the block, its calibration inputs, Gram collection and the solver."""

    def __init__(
        self,
        index: int,
        block: nn.Module,
        adapter: FamilyAdapter,
        inputs: list[Tensor],
        kwargs: dict[str, Any],
        pattern: Pattern,
        targets: dict[str, float],
        inner: InnerSolve,
        device: torch.device,
        activation_device: torch.device | None = None,
        batch_windows: int = 1,
        new_store: Callable[[], Any] = list,
    ):
        self.index = index
        self.block = block
        self.adapter = adapter
        self.inputs = inputs
        self.kwargs = kwargs
        self.pattern = pattern
        self.targets = targets
        self.inner = inner
        self.device = device
        #: Where the inputs live and the outputs of :meth:`forward` are kept (the host when offloading).
        self.activation_device = device if activation_device is None else torch.device(activation_device)
        #: Windows per forward pass: more is faster on a GPU; the results agree up to float rounding.
        self.batch_windows = max(1, int(batch_windows))
        #: Makes the container the outputs of :meth:`forward` are appended to (a list, or a file on disk).
        self.new_store = new_store
        self.records: list[LayerRecord] = []
        self.pass_time_s = 0.0  # seconds spent running calibration inputs through the block
        self._linears = adapter.linears(block)

    def full_name(self, rel: str) -> str:
        return self.adapter.full_name(self.index, rel)

    def linear(self, rel: str) -> nn.Linear:
        return self._linears[rel]

    def target(self, rel: str) -> float:
        return self.targets[self.full_name(rel)]

    @torch.no_grad()
    def _run_inputs(self, keep_outputs: bool = False) -> list[Tensor]:
        """One pass of every window through the block, :attr:`batch_windows` windows at a time on the compute
        device; the outputs (when kept) go to :attr:`activation_device`, one ``1 x seqlen x d`` tensor per window.
        Both moves are no-ops when nothing is offloaded."""
        start = time.perf_counter()
        outs = self.new_store() if keep_outputs else []
        step = self.batch_windows
        for i in range(0, len(self.inputs), step):
            chunk = self.inputs[i : i + step]
            x = chunk[0] if len(chunk) == 1 else torch.cat(chunk)
            out = _block_output(self.block(x.to(self.device), **self.kwargs))
            if keep_outputs:
                outs.extend(o.to(self.activation_device) for o in out.split(1))
        if self.device.type == "cuda":  # else the queued kernels' time would be charged to the next solve
            torch.cuda.synchronize(self.device)
        self.pass_time_s += time.perf_counter() - start
        return outs

    def forward(self) -> list[Tensor]:
        """The block's outputs for every calibration input, with its current weights, on
        :attr:`activation_device`."""
        return self._run_inputs(keep_outputs=True)

    @contextmanager
    def _hooks(self, rels: Iterable[str], fn: Callable[[str, Tensor, Tensor], None]):
        handles = [
            self._linears[r].register_forward_hook(lambda m, a, o, r=r: fn(r, a[0], o)) for r in rels
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def collect_grams(self, rels: Iterable[str]) -> dict[str, Gram]:
        """One pass through the block; ``H = Σ xxᵀ`` (float32) of each linear's input.

        Linears of one input group share a single :class:`Gram` object (and its cached factorisations).
        """
        rels = list(rels)
        group_of = {r: g[0] for g in self.adapter.groups for r in g if r in rels}
        leaders = list(dict.fromkeys(group_of[r] for r in rels))
        acc: dict[str, list] = {}

        def add(rel: str, x: Tensor, _out: Tensor) -> None:
            x = x.reshape(-1, x.shape[-1]).float()
            if rel not in acc:
                d = x.shape[1]
                acc[rel] = [torch.zeros(d, d, device=x.device), torch.zeros(d, device=x.device), 0]
            h, s, _ = acc[rel]
            h.addmm_(x.T, x)
            s.add_(x.sum(0))
            acc[rel][2] += x.shape[0]

        with self._hooks(leaders, add):
            self._run_inputs()
        grams = {lead: Gram(h, n, s) for lead, (h, s, n) in acc.items()}
        return {r: grams[group_of[r]] for r in rels}

    @torch.no_grad()
    def capture(self, rels: Iterable[str], what: str = "input") -> dict[str, Tensor]:
        """One pass through the block; each linear's inputs (or outputs) stacked as ``tokens x features`` fp32.

        The result is on the compute device even when the block's inputs are offloaded (the callers solve on it).
        """
        if what not in ("input", "output"):
            raise ValueError("what must be 'input' or 'output'")
        got: dict[str, list[Tensor]] = {r: [] for r in rels}

        def keep(rel: str, x: Tensor, out: Tensor) -> None:
            t = x if what == "input" else out
            got[rel].append(t.reshape(-1, t.shape[-1]).float())

        with self._hooks(got, keep):
            self._run_inputs()
        return {r: torch.cat(v) for r, v in got.items()}

    def inner_solve(self, rel: str, weight: Tensor, gram: Gram, target: float | None = None) -> SolveResult:
        """The configured solver (and refiner) on one matrix; pure, nothing written."""
        return self.inner(weight, gram, self.target(rel) if target is None else target)

    @torch.no_grad()
    def commit(self, rel: str, result: SolveResult, gram: Gram, dense: Tensor | None = None, seconds: float = 0.0):
        """Write ``result.weight`` into the linear and record its sparsity and reconstruction error."""
        lin = self._linears[rel]
        dense = lin.weight.detach().clone() if dense is None else dense
        new = result.weight.to(lin.weight.dtype)
        if not torch.isfinite(new).all():
            raise FloatingPointError(f"solver produced NaN/Inf for {self.full_name(rel)}")
        lin.weight.copy_(new)
        target = self.target(rel)
        pattern = result.pattern or self.pattern
        check = pattern.verify(lin.weight.data, pattern.effective_sparsity(target))
        err, rel_err = reconstruction_error(dense, lin.weight.data, gram)
        stats = {k: v for k, v in result.stats.items() if isinstance(v, (int, float, str, bool))}
        self.records.append(
            LayerRecord(
                self.full_name(rel), self.index, list(lin.weight.shape), self.pattern.effective_sparsity(target),
                check.achieved_sparsity, rel_err, err, check.ok, seconds, stats,
            )
        )
        if not check.ok:
            raise AssertionError(f"{self.full_name(rel)} violates pattern {pattern.spec}: {check.detail}")


def prune_block_layerwise(ctx: BlockContext, options: dict | None = None) -> None:
    """The default strategy: Gram matrices from one pass of the block's current (dense) weights, then solve
    every linear. With ``sequential=True`` each input group is solved before the next group's Gram matrix
    is collected, so later layers see the earlier pruning (SparseGPT's "true sequential")."""
    sequential = bool((options or {}).get("sequential", False))
    groups = [list(g) for g in ctx.adapter.groups]
    stages = groups if sequential else [[r for g in groups for r in g]]
    for stage in stages:
        grams = ctx.collect_grams(stage)
        for rel in stage:
            start = time.perf_counter()
            dense = ctx.linear(rel).weight.detach().clone()
            result = ctx.inner_solve(rel, dense.float(), grams[rel])
            ctx.commit(rel, result, grams[rel], dense, time.perf_counter() - start)
        for g in {id(g): g for g in grams.values()}.values():
            g.release()


BlockStrategy = Callable[[BlockContext, dict], None]


@dataclass
class EngineResult:
    records: list[LayerRecord]
    block_times: list[float]
    calibration_time_s: float  # capturing block 0's inputs plus every pass of the inputs through a block


def run_engine(
    model: nn.Module,
    adapter: FamilyAdapter,
    windows: Tensor,
    pattern: Pattern,
    targets: dict[str, float],
    inner: InnerSolve,
    strategy: BlockStrategy = prune_block_layerwise,
    strategy_options: dict | None = None,
    blocks: Iterable[int] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    on_block_done: Callable[[int, list[Tensor], list[LayerRecord]], None] | None = None,
    start_block: int = 0,
    start_inputs: tuple[list[Tensor], dict[str, Any]] | None = None,
    before_block: Callable[[int], None] | None = None,
    offload_activations: bool = False,
    batch_windows: int = 1,
    offload_dir: str | Path | None = None,
    live: dict[str, float] | None = None,
) -> EngineResult:
    """Prune ``model`` in place, block by block. Blocks not in ``blocks`` are propagated but left dense.

    ``before_block(i)`` runs before block ``i`` is touched (streaming loads its weights there).
    ``offload_activations`` keeps the calibration activations on the CPU and moves one window at a time to
    ``device`` (the block's keyword arguments -- masks, rotary embeddings -- are one window's worth and stay
    there); ``on_block_done`` then receives CPU tensors. ``offload_dir`` keeps them in files in a temporary
    folder there instead, one window in host memory at a time (``on_block_done`` then receives a
    :class:`~lmprune.activations.WindowFile`). ``batch_windows`` windows go through a block at once (their keyword
    arguments broadcast over the batch). ``live``, when given, holds the running ``calibration_time_s`` before
    every ``on_block_done`` (a checkpoint records it).
    """
    device = torch.device(device)
    act_device = torch.device("cpu") if offload_activations or offload_dir is not None else device
    all_blocks = adapter.blocks(model)
    selected = set(range(len(all_blocks)) if blocks is None else blocks)
    records: list[LayerRecord] = []
    block_times: list[float] = []
    with _activation_stores(offload_dir) as new_store:
        t0 = time.perf_counter()
        inputs, kwargs = _first_inputs(model, adapter, windows, progress, start_inputs, new_store, act_device)
        kwargs = _to(kwargs, device)
        calib_time = time.perf_counter() - t0
        bar = tqdm(range(start_block, len(all_blocks)), desc="blocks", disable=not progress)
        for i in bar:
            start = time.perf_counter()
            if before_block is not None:
                before_block(i)
            block = all_blocks[i]
            home = next(block.parameters()).device
            block.to(device)
            ctx = BlockContext(i, block, adapter, inputs, kwargs, pattern, targets, inner, device, act_device,
                               batch_windows, new_store)
            if i in selected:
                strategy(ctx, strategy_options or {})
            outputs = ctx.forward()
            release(inputs)
            inputs = outputs
            block.to(home)
            records.extend(ctx.records)
            calib_time += ctx.pass_time_s
            block_times.append(time.perf_counter() - start)
            if live is not None:
                live["calibration_time_s"] = calib_time
            if on_block_done is not None:
                on_block_done(i, inputs, ctx.records)
            if ctx.records:
                bar.set_postfix(err=f"{sum(r.rel_error for r in ctx.records) / len(ctx.records):.4f}")
            trim_host_memory()  # after on_block_done, which may have written and dropped the block (streaming)
        release(inputs)
    return EngineResult(records, block_times, calib_time)


@contextmanager
def _activation_stores(offload_dir: str | Path | None):
    """The factory of activation containers: lists in memory, or files in a temporary folder in ``offload_dir``
    (removed with everything in it on exit, also after an error)."""
    if offload_dir is None:
        yield list
        return
    Path(offload_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lmprune-activations-", dir=offload_dir) as tmp:
        yield lambda: WindowFile(tmp)


def _first_inputs(model, adapter, windows, progress, start_inputs, new_store, act_device):
    """The inputs of the first block to run (captured, or a resumed checkpoint's) in a ``new_store()`` container
    on ``act_device``, and the blocks' keyword arguments."""
    if start_inputs is None:
        inputs, kwargs = capture_block_inputs(model, adapter, windows, progress, sink=new_store())
    else:
        resumed, kwargs = start_inputs
        inputs = new_store()
        inputs.extend(resumed)
    if isinstance(inputs, list):
        inputs = [x.to(act_device) for x in inputs]
    return inputs, kwargs


@torch.no_grad()
def collect_input_norms(
    model: nn.Module, adapter: FamilyAdapter, windows: Tensor, device: str | torch.device = "cpu",
    progress: bool = True, offload_activations: bool = False, batch_windows: int = 1,
    offload_dir: str | Path | None = None,
) -> dict[str, Tensor]:
    """``‖X_j‖₂`` of every prunable linear's input on the dense model (for OWL), block by block.

    ``offload_activations`` and ``offload_dir`` keep the activations on the CPU or on disk as in
    :func:`run_engine`.
    """
    device = torch.device(device)
    act_device = torch.device("cpu") if offload_activations or offload_dir is not None else device
    norms: dict[str, Tensor] = {}
    with _activation_stores(offload_dir) as new_store:
        inputs, kwargs = _first_inputs(model, adapter, windows, progress, None, new_store, act_device)
        kwargs = _to(kwargs, device)
        for i, block in enumerate(tqdm(adapter.blocks(model), desc="input norms", disable=not progress)):
            home = next(block.parameters()).device
            block.to(device)
            ctx = BlockContext(i, block, adapter, inputs, kwargs, None, {}, None, device,  # type: ignore[arg-type]
                               act_device, batch_windows, new_store)
            for rel, gram in ctx.collect_grams(adapter.linear_names()).items():
                norms[ctx.full_name(rel)] = gram.column_norms().cpu()
            outputs = ctx.forward()
            release(inputs)
            inputs = outputs
            trim_host_memory()
            block.to(home)
        release(inputs)
    return norms
