"""Evaluation inside a run: perplexity and zero-shot accuracy of the loaded model, in memory or streamed."""

from __future__ import annotations

from typing import Any

from ..config import EvalRequest, PruneConfig
from ..evaluation.perplexity import EvalSpec, PerplexityResult, perplexity
from ..models.loading import default_seqlen
from .sources import LoadedModel


def perplexities(model, tokenizer, request: EvalRequest, data_dir: str | None, device: str,
                 progress: bool = True) -> dict[str, Any]:
    """``{dataset: ppl, ..., "eval_windows": K, "seqlen": L, "details": {dataset: PerplexityResult}}``."""
    seqlen = request.seqlen or default_seqlen(model.config)
    out: dict[str, Any] = {"eval_windows": request.windows, "seqlen": seqlen, "details": {}}
    for ds in request.datasets:
        spec = EvalSpec(ds, seqlen, request.windows, request.ppl_batch_size)
        r: PerplexityResult = perplexity(model, tokenizer, spec, data_dir, device, progress)
        out[ds] = r.perplexity
        out["details"][ds] = r.to_dict()
    return out


def evaluate_loaded(loaded: LoadedModel, request: EvalRequest, config: PruneConfig, progress: bool,
                    after_pruning: bool) -> dict[str, Any]:
    """The manifest's ``perplexity`` (and ``zeroshot``) entries for ``request``; perplexity windows default to the
    calibration window length."""
    if request.seqlen is None and config.seqlen is not None:
        request = request.model_copy(update={"seqlen": config.seqlen})
    out: dict[str, Any] = {}
    if loaded.streamed:
        if request.datasets:
            from .streamed_eval import streamed_perplexities

            out["perplexity"] = streamed_perplexities(loaded, request, config, progress, after_pruning)
        return out  # zero-shot tasks are refused for streamed runs before anything runs
    with loaded.weights_on(config.device) as model:
        if request.datasets:
            out["perplexity"] = perplexities(model, loaded.tokenizer, request, config.data_dir, config.device,
                                             progress)
        if request.tasks:
            from ..evaluation.zeroshot import evaluate_tasks

            out["zeroshot"] = evaluate_tasks(model, loaded.tokenizer, request.tasks, config.data_dir, request.limit,
                                             device=config.device)
    return out
