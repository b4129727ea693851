"""One pruning job, whatever the model source: calibration → allocation → engine → evaluation → run directory.

:func:`prune` is the job on a model already loaded (in memory, or streamed block by block); :func:`run` is the
whole command: validate everything, lock and stage the run directory, plan memory, load, prune, evaluate, save,
reload-check and publish. Both sources take every allocation and evaluation option.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from . import __version__, distributed
from .activations import ActivationStore
from .allocation import load_allocation_file
from .allocation.base import Allocation
from .config import ConfigError, Job, PruneConfig
from .data.calibration import sample_windows
from .data.sources import TextSource, load_source
from .engine import BlockEvents, EngineOptions, EventChain, capture_inputs, capture_kwargs, run_engine
from .layer_pruner import LayerPruner
from .models.adapters import FamilyAdapter, get_adapter
from .models.loading import default_seqlen
from .registry import ALLOCATORS, BLOCK_METHODS, REFINERS, SOLVERS
from .report.labels import configuration_label
from .report.manifest import now_iso, peak_cuda_mb, peak_rss_mb, versions
from .run import rundir
from .run.checkpoint import Checkpoint, RunClock, open_checkpoint
from .run.evaluate import evaluate_loaded
from .run.sources import LoadedModel
from .strategies.statistics import InputNorms

ALPHA_CACHE = Path("~/.cache/lmprune/alpha").expanduser()


def resolved_settings(config: PruneConfig) -> dict[str, Any]:
    """Every option each stage runs with (presets and defaults filled in, validated), for the manifest."""
    method = config.block_method
    return {
        "solver": config.solver_name,
        "solver_options": SOLVERS.resolved(config.solver_name, config.solver_options),
        "refiner": config.refine,
        "refine_options": REFINERS.resolved(config.refine, config.refine_options),
        "block_method": method,
        "method_options": BLOCK_METHODS.resolved(method, config.block_method_options),
    }


def _store(config: PruneConfig) -> ActivationStore:
    if config.offload_dir is not None:
        return ActivationStore(config.device, "files", config.offload_dir)
    return ActivationStore(config.device, "host" if config.offload_activations else "device")


def _engine_options(config: PruneConfig, progress: bool, **over: Any) -> EngineOptions:
    world = distributed.current()
    return EngineOptions(batch_windows=config.calib_batch_size, progress=progress and world.is_main, world=world,
                         **over)


def _share(windows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows (all of them in a single process)."""
    world = distributed.current()
    if world.size > len(windows):
        raise ConfigError(f"{world.size} ranks need at least {world.size} calibration windows, not {len(windows)}; "
                          "raise --nsamples or use fewer processes")
    return windows[world.shard(len(windows))]


def input_norms(loaded: LoadedModel, adapter: FamilyAdapter, windows: torch.Tensor, config: PruneConfig,
                progress: bool) -> dict[str, torch.Tensor]:
    """``‖X_j‖₂`` of every prunable matrix's input on the dense model, by one statistics pass of the engine."""
    collector = InputNorms()
    with _store(config) as store:
        capture_inputs(loaded.model, adapter, _share(windows), store, progress and distributed.current().is_main)
        run_engine(loaded.model, adapter, store, None, collector, _engine_options(config, progress, desc="input norms"),
                   loaded.read_events() or BlockEvents())
    return collector.norms


def allocate(loaded: LoadedModel, adapter: FamilyAdapter, config: PruneConfig, blocks: list[int],
             windows: torch.Tensor | None, progress: bool = True) -> Allocation:
    """Per-matrix target sparsities (stage 1). N:M patterns are uniform by definition."""
    start = time.perf_counter()
    infos = loaded.matrix_infos(adapter, blocks)
    if config.allocation.endswith(".json"):
        alloc = load_allocation_file(config.allocation, [m.name for m in infos])
    else:
        plugin = ALLOCATORS.get(config.allocation)
        options = dict(config.allocation_options)
        needs: dict[str, Any] = {}
        if "input_norms" in plugin.needs:
            if windows is None:
                raise ValueError(f"{plugin.name} allocation needs calibration windows")
            needs["input_norms"] = input_norms(loaded, adapter, windows, config, progress)
        if plugin.name == "alpha":
            options.setdefault("cache_dir", str(ALPHA_CACHE))
            options.setdefault("device", config.device)  # the SVDs run where the solvers do
        target = config.pattern_obj.effective_sparsity(config.sparsity)
        if plugin.name == "alpha" and distributed.current().size > 1:
            options["fits"] = _spread_alphas(infos, options)
        alloc = plugin.function()(infos, sparsity=target, **needs, **options)
    alloc.time_s = time.perf_counter() - start  # includes OWL's calibration pass
    return alloc


def _spread_alphas(infos, options: dict[str, Any]) -> dict[str, Any]:
    """AlphaPruning's per-matrix spectra, each computed by one owner rank (by ``out · in · min(out, in)``, the
    SVD's cost) and gathered on every rank."""
    from .allocation.alpha import compute_alphas

    world = distributed.current()
    costs = [float(m.weight.shape[0] * m.weight.shape[1] * min(m.weight.shape)) for m in infos]
    owners = distributed.assign_owners(costs, world.size)
    from .allocation.alpha import Options, weights_hash
    from .solvers.base import validate_options

    opt = validate_options(Options, options, "alpha allocation")
    # the cache is keyed by the whole model's hash, not by one rank's share
    model_hash = opt.model_hash or (weights_hash(infos) if opt.cache_dir is not None else None)
    kwargs = dict(xmin_rule=opt.xmin_rule, cache_dir=opt.cache_dir, model_hash=model_hash, device=opt.device,
                  dtype=opt.dtype)
    mine = [m for m, o in zip(infos, owners) if o == world.rank]
    fits, _ = compute_alphas(mine, **kwargs) if mine else ({}, {})
    merged: dict[str, Any] = {}
    for part in world.all_gather_object(fits):
        merged.update(part)
    return merged


def _check_patterns(adapter: FamilyAdapter, model: torch.nn.Module, config: PruneConfig, blocks: list[int]) -> None:
    chosen = set(blocks)
    for name, b, lin in adapter.matrices(model):
        if b in chosen:
            try:
                config.pattern_obj.validate(tuple(lin.weight.shape))
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None


@dataclass
class Calibration:
    """The calibration windows of a run, sampled once, with what the manifest and a resume check need."""

    source: TextSource
    windows: torch.Tensor
    seqlen: int

    @classmethod
    def sample(cls, config: PruneConfig, tokenizer: Any, seqlen: int) -> "Calibration":
        source = load_source(config.calib, "calib", config.data_dir)
        return cls(source, sample_windows(source, tokenizer, config.nsamples, seqlen, config.seed), seqlen)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()

    def manifest(self) -> dict[str, Any]:
        return {"source": self.source.origin, "sha256": self.source.sha256, "nsamples": self.windows.shape[0],
                "seqlen": self.seqlen, "windows_sha256": self.sha256}


@dataclass
class _Start:
    """Where the engine starts: block 0 of a fresh run, or the block after a resumed run's last checkpoint."""

    block: int
    allocation: Allocation
    clock: RunClock
    records: list = field(default_factory=list)
    block_times: list[float] = field(default_factory=list)


def _start(loaded: LoadedModel, adapter: FamilyAdapter, config: PruneConfig, calib: Calibration,
           store: ActivationStore, checkpoint: Checkpoint | None, started: float, progress: bool) -> _Start:
    """Fill ``store`` with the first block's inputs and settle the allocation: from a matching checkpoint when there
    is one, else by allocating and capturing the calibration windows' entry into block 0."""
    model = loaded.model
    if checkpoint is not None and checkpoint.done_block() >= 0:
        checkpoint.verify({"windows_sha256": calib.sha256})
        block = checkpoint.restore(model, adapter, store)
        capture_kwargs(model, adapter, calib.windows[0], store)
        return _Start(block, Allocation.from_dict(checkpoint.allocation()), RunClock(checkpoint.prior_timings(), started),
                      checkpoint.records(), checkpoint.block_times())
    blocks = config.block_indices(len(adapter.blocks(model)))
    allocation = allocate(loaded, adapter, config, blocks, calib.windows, progress)
    t0 = time.perf_counter()
    capture_inputs(model, adapter, _share(calib.windows), store, progress and distributed.current().is_main)
    return _Start(0, allocation, RunClock({"elapsed_s": 0.0, "calibration_time_s": 0.0}, started,
                                          time.perf_counter() - t0))


def _strategy(settings: dict[str, Any]):
    """The run's block method with its validated options bound: ``strategy(ctx)``."""
    prune_block = BLOCK_METHODS.get(settings["block_method"]).function()
    options = BLOCK_METHODS.options(settings["block_method"], settings["method_options"])

    def strategy(ctx) -> None:
        prune_block(ctx, options)

    return strategy


def prune(loaded: LoadedModel, config: PruneConfig, progress: bool = True,
          checkpoint: Checkpoint | None = None) -> dict[str, Any]:
    """Prune ``loaded`` in place according to ``config``; returns the manifest fields of the run.

    With a ``checkpoint``, every finished block is checkpointed and a matching earlier checkpoint is resumed.
    """
    torch.manual_seed(config.seed)
    model = loaded.model
    adapter = get_adapter(model)
    n_blocks = len(adapter.blocks(model))
    blocks = config.block_indices(n_blocks)
    _check_patterns(adapter, model, config, blocks)
    settings = resolved_settings(config)
    method = BLOCK_METHODS.get(settings["block_method"]).load()
    if hasattr(method, "check_structure"):
        method.check_structure(adapter)  # a block method that needs more than the matrices refuses before calibrating
    started = time.perf_counter()
    calib = Calibration.sample(config, loaded.tokenizer, config.seqlen or default_seqlen(model.config))
    world = distributed.current()
    with _store(config) as store:
        begin = _start(loaded, adapter, config, calib, store, checkpoint, started, progress)
        alloc, clock = begin.allocation, begin.clock
        saving = None
        if checkpoint is not None:
            saving = checkpoint.events(model, adapter, alloc.to_dict(), {"windows_sha256": calib.sha256}, clock)
        pruner = LayerPruner.build(config.solver_name, config.refine, config.pattern_obj, alloc.targets, settings)
        options = _engine_options(config, progress, prune_blocks=frozenset(blocks), start_block=begin.block)
        result = run_engine(model, adapter, store, pruner, _strategy(settings), options,
                            EventChain(loaded.prune_events(write=world.is_main), clock,
                                       saving))
    elapsed = time.perf_counter() - started
    records = begin.records + result.records
    achieved = {r.name: r.sparsity for r in records}
    for m in alloc.matrices:
        m.achieved = achieved.get(m.name)
    layers = [asdict(r) for r in records]
    out = {
        "method": config.method,
        "sparsity": config.sparsity,
        "pattern": config.pattern,
        "allocation": config.allocation,
        "achieved_sparsity": rundir.achieved_sparsity(layers),
        "pattern_ok": all(r.pattern_ok for r in result.records),
        "pruned_blocks": blocks,
        "n_blocks": n_blocks,
        "structure": adapter.summary() if hasattr(adapter, "summary") else None,
        "layers": layers,
        "experts": _experts_summary(layers),
        "allocation_detail": alloc.to_dict(),
        "time_s": clock.prior["elapsed_s"] + elapsed,  # a resumed run adds the interrupted one's
        "time_this_process_s": elapsed,
        "calibration_time_s": clock.totals()["calibration_time_s"],
        "solver_time_s": sum(r.time_s for r in records),
        "error_time_s": sum(r.error_time_s for r in records),  # the layer-error report, apart from the solves
        "block_times_s": begin.block_times + result.block_times,
        "resumed_from_block": begin.block or None,
        "seed": config.seed,
        "resolved_options": settings,
        "calibration": calib.manifest(),
        "config": config.model_dump(),
    }
    io = checkpoint.io() if checkpoint is not None else None
    if io:
        out["checkpoint_io"] = io
    out["configuration"] = configuration_label(out)
    return out


def _experts_summary(layers: list[dict]) -> dict | None:
    """Mixture of experts: how many expert matrices, the fewest routed tokens, and those pruned by the fallback."""
    experts = [r for r in layers if "routed_tokens" in r["stats"]]
    if not experts:
        return None
    return {"matrices": len(experts), "min_routed_tokens": min(r["stats"]["routed_tokens"] for r in experts),
            "fallback": {r["name"]: r["stats"]["fallback"] for r in experts if r["stats"]["fallback"]},
            "weighting": "routed tokens counted once each, router scores not applied"}


def validate(job: Job) -> None:
    """Everything that can be checked before a weight is read: data files, tasks, an allocation file's mean."""
    config = job.config
    for ds in job.evaluation.datasets:
        load_source(ds, "eval", config.data_dir)
    if job.evaluation.tasks:
        from .evaluation.zeroshot import check_tasks

        check_tasks(job.evaluation.tasks, config.data_dir)
    if config.allocation.endswith(".json"):
        mean = Allocation.from_json(config.allocation).weighted_mean()
        target = config.pattern_obj.effective_sparsity(config.sparsity)
        if abs(mean - target) > 1e-4:
            raise ConfigError(f"--allocation {config.allocation} averages {mean:.4f} sparsity, not the --sparsity "
                              f"{target}; pass --sparsity {mean:.4f} or another allocation")
    if job.stream and job.evaluation.tasks:
        raise ConfigError("--stream evaluates perplexity block by block; zero-shot --tasks need the whole model in "
                          "memory: run lmprune eval on the output")
    if job.stream and job.save_dtype != "original":
        raise ConfigError("--stream writes each block in the --dtype it was pruned in; use --dtype, not --save-dtype")
    if config.device != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device} requested but CUDA is not available")


def load(job: Job, staging: Path) -> LoadedModel:
    if job.stream:
        from .run.streaming import open_streamed

        return open_streamed(job.model, staging, job.dtype, job.trust_remote_code, job.adapter)
    from .models.declared import use_adapter_file
    from .models.loading import load_model

    model, tokenizer, source = load_model(job.model, job.dtype, job.trust_remote_code, job.trust_pickle)
    use_adapter_file(model, job.adapter)
    return LoadedModel(model, tokenizer, source)


def run(job: Job) -> dict[str, Any]:
    """Load → (dense eval) → prune → eval → save → publish. Returns the manifest written to ``out/lmprune.json``;
    raises :class:`~lmprune.run.rundir.RunExists` when ``out`` already holds this very run.

    Distributed (:mod:`lmprune.distributed`), rank 0 does all of this and the other ranks only load and prune
    their share (:func:`_follow`): they write nothing but their checkpointed windows."""
    validate(job)
    world = distributed.current()
    if not world.is_main:
        return _follow(job, world)
    out = Path(job.out)
    with _Release(world) as release, rundir.locked(out) as staging:
        rundir.check_out_dir(out, job.model, job.config, job.overwrite)
        checkpoint = open_checkpoint(out, _fingerprint(job, world), job.overwrite, job.resume,
                                     store_blocks=not job.stream, world=world)
        release.go(checkpoint.state())  # the other ranks start from rank 0's checkpoint state
        manifest: dict[str, Any] = {"lmprune_version": __version__, "created": now_iso()}
        if job.invocation:
            manifest["invocation"] = job.invocation
        manifest["run_options"] = {"dtype": job.dtype, "save_dtype": job.save_dtype, "stream": job.stream,
                                   "trust_remote_code": job.trust_remote_code, "trust_pickle": job.trust_pickle,
                                   "resume": job.resume}
        if job.memory_check:
            from .run.memory import check_fits, plan_for_job

            plan = plan_for_job(job, world.size)
            check_fits(plan, ranks_here=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
            manifest["memory_plan"] = plan.to_dict()
        loaded = load(job, staging)
        if loaded.streamed:
            loaded.stream.adopt(checkpoint.done_block())
        request = job.evaluation
        if request.dense and request.datasets:
            dense = evaluate_loaded(loaded, request.perplexity_only(), job.config, job.progress, after_pruning=False)
            manifest["dense_perplexity"] = {k: v for k, v in dense["perplexity"].items() if k in request.datasets}
        checkpoint.fingerprint["model_sha256"] = loaded.source.sha256
        manifest.update(prune(loaded, job.config, job.progress, checkpoint))
        rss = world.all_gather_object(peak_rss_mb())
        manifest["model"] = loaded.describe(job.model)
        manifest.update(evaluate_loaded(loaded, request, job.config, job.progress, after_pruning=True))
        manifest["peak_rss_mb"] = peak_rss_mb()
        manifest["peak_cuda_mb"] = peak_cuda_mb()
        manifest["versions"] = versions()
        manifest["world_size"] = world.size
        if world.size > 1:
            manifest["distributed"] = {"backend": world.backend, "peak_rss_mb_per_rank": rss,
                                       "windows_per_rank": [distributed.shard_bounds(job.config.nsamples,
                                                                                     world.size, r)
                                                            for r in range(world.size)]}
        _save(loaded, job, staging, manifest)
        rundir.write_report(staging, manifest, out.name)
        checkpoint.discard()
        rundir.publish(staging, out)
    return manifest


_GO = "go"


def _fingerprint(job: Job, world: distributed.World) -> dict[str, Any]:
    fingerprint = job.fingerprint()
    if world.size > 1:  # each rank checkpoints its own share of the windows
        fingerprint["world_size"] = world.size
    return fingerprint


class _Release:
    """Rank 0 tells the other ranks to go once the run directory is locked and its checkpoint opened; an error (or
    a finished run) before that tells them to stop instead -- rank 0 reports it -- so no rank waits in vain."""

    def __init__(self, world: distributed.World):
        self.world, self.sent = world, False

    def go(self, state: dict[str, Any] | None) -> None:
        self.world.broadcast_object((_GO, state))
        self.sent = True

    def __enter__(self) -> "_Release":
        return self

    def __exit__(self, *exc) -> None:
        if not self.sent:
            self.world.broadcast_object(("stop", None))


def _follow(job: Job, world: distributed.World) -> dict[str, Any]:
    """A rank other than 0: prune its share of the windows alongside rank 0, writing no run directory."""
    signal, state = world.broadcast_object(None)
    if signal != _GO:
        return {}
    out = Path(job.out)
    checkpoint = open_checkpoint(out, _fingerprint(job, world), job.overwrite, job.resume,
                                 store_blocks=not job.stream, world=world)
    checkpoint.follow(state)
    loaded = load(job, rundir.staging_dir(out))
    checkpoint.fingerprint["model_sha256"] = loaded.source.sha256
    prune(loaded, job.config, False, checkpoint)
    world.all_gather_object(peak_rss_mb())
    checkpoint.drop_own()
    return {}


def _save(loaded: LoadedModel, job: Job, staging: Path, manifest: dict[str, Any]) -> None:
    """The pruned weights, config and tokenizer into ``staging``: written block by block already when streamed."""
    rundir.clear(staging, keep=(rundir.LOCK_FILE, rundir.MARKER, "checkpoint") +
                 (tuple(loaded.stream.weight_map.values()) if loaded.streamed else ()))
    _own_code(loaded, job, staging)
    if loaded.streamed:
        loaded.stream.finish()
        manifest["reload_check"] = {"ok": True, "mode": "each written tensor read back and compared",
                                    "tensors": loaded.stream.checked}
        model = loaded.model
        model.config.save_pretrained(staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        loaded.tokenizer.save_pretrained(staging)
        return
    dtype = rundir.saved_dtype(job.model, job.save_dtype, job.trust_remote_code)
    rundir.cast_for_saving(loaded.model, dtype, manifest)
    rundir.save_model(loaded.model, loaded.tokenizer, staging, manifest, job.trust_remote_code)


def _own_code(loaded: LoadedModel, job: Job, staging: Path) -> None:
    """A model that names its own code keeps it (copied beside the saved config) when it ran with it, and loses
    the reference (``auto_map`` dropped) when it ran with transformers' stock class."""
    import shutil

    from .models.loading import own_code_files

    files = own_code_files(loaded.model.config, loaded.source) if loaded.source is not None else []
    if job.trust_remote_code:
        for f in files:
            shutil.copy2(f, staging / f.name)
    elif getattr(loaded.model.config, "auto_map", None):
        del loaded.model.config.auto_map
