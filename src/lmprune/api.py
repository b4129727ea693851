"""The Python API: a short facade over :mod:`lmprune.pipeline`.

    prune(model, tokenizer, config)         prune a model in memory; the manifest fields of the run
    run(job)                                the whole ``lmprune prune`` command into a run directory
    evaluate(model_spec, request, ...)      perplexity / zero-shot of a model or a finished run directory
    allocate(model_spec, config, out)       a layer-wise allocation (and its plot) without pruning
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from . import pipeline
from .allocation.base import Allocation
from .config import ConfigError, EvalRequest, Job, PruneConfig
from .run.rundir import RunExists
from .run.sources import LoadedModel

__all__ = ["ConfigError", "EvalRequest", "Job", "PruneConfig", "RunExists", "allocate", "evaluate", "prune", "run"]


def prune(model: nn.Module, tokenizer: Any, config: PruneConfig, progress: bool = True) -> dict[str, Any]:
    """Prune ``model`` in place according to ``config``; returns the manifest fields of the run."""
    return pipeline.prune(LoadedModel(model, tokenizer), config, progress)


def run(job: Job) -> dict[str, Any]:
    """Load → (dense eval) → prune → eval → save into ``job.out``; the manifest written there."""
    return pipeline.run(job)


def evaluate(model_spec: str, request: EvalRequest, data_dir: str | None = None, device: str = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """Perplexity and/or zero-shot accuracy of a model spec or a finished run directory."""
    from .data.sources import load_source
    from .evaluation.zeroshot import check_tasks
    from .models.loading import load_model
    from .report.manifest import MANIFEST, now_iso, read_manifest, versions
    from .run.evaluate import perplexities

    for ds in request.datasets:
        load_source(ds, "eval", data_dir)
    if request.tasks:
        check_tasks(request.tasks, data_dir)
    model, tokenizer, source = load_model(model_spec)
    model.to(device)
    result: dict[str, Any] = {"model": model_spec, "sha256": source.sha256, "created": now_iso()}
    if (Path(model_spec) / MANIFEST).is_file():
        done = read_manifest(model_spec)
        result["run"] = {k: done.get(k) for k in ("method", "sparsity", "pattern", "allocation", "achieved_sparsity")}
    if request.datasets:
        result["perplexity"] = perplexities(model, tokenizer, request, data_dir, device, progress)
    if request.tasks:
        from .evaluation.zeroshot import evaluate_tasks

        result["zeroshot"] = evaluate_tasks(model, tokenizer, request.tasks, data_dir, request.limit,
                                            batch_size=request.task_batch_size, device=device)
    result["versions"] = versions()
    return result


def allocate(model_spec: str, config: PruneConfig, out: str | Path | None = None,
             progress: bool = True) -> tuple[Allocation, list[Path]]:
    """Compute ``config``'s allocation (and its plot) without pruning; ``out`` is the JSON path."""
    from .allocation.plot import plot_allocation
    from .data.calibration import sample_windows
    from .data.sources import load_source
    from .models.adapters import get_adapter
    from .models.loading import default_seqlen, load_model
    from .registry import ALLOCATORS

    model, tokenizer, source = load_model(model_spec)
    adapter = get_adapter(model)
    windows = None
    if config.allocation in ALLOCATORS and "input_norms" in ALLOCATORS.get(config.allocation).needs:
        seqlen = config.seqlen or default_seqlen(model.config)
        windows = sample_windows(load_source(config.calib, "calib", config.data_dir), tokenizer, config.nsamples,
                                 seqlen, config.seed)
    blocks = list(range(len(adapter.blocks(model))))
    alloc = pipeline.allocate(LoadedModel(model, tokenizer, source), adapter, config, blocks, windows, progress)
    paths: list[Path] = []
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        alloc.to_json(path)
        paths += [path, Path(plot_allocation(alloc, path.with_suffix(".png")))]
    return alloc, paths
