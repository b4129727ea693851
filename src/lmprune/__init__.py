"""lmprune: one-shot pruning of pretrained causal language models.

    import lmprune
    model, tokenizer, _ = lmprune.load_model("smollm2-135m")
    report = lmprune.prune(model, tokenizer, method="alps", sparsity=0.7, nsamples=32, seqlen=512)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def prune(model: Any, tokenizer: Any, config: Any = None, *, progress: bool = True, **fields: Any) -> dict[str, Any]:
    """Prune ``model`` in place; returns the run's manifest fields (per-layer records, timings, settings).

    ``config`` is a :class:`lmprune.config.PruneConfig`; or give its fields as keywords (they override the
    fields of ``config`` when both are given). See :func:`lmprune.pipeline.prune`.
    """
    from .api import prune as prune_model
    from .config import build_config

    if config is None:
        config = build_config(**fields)
    elif fields:
        config = build_config(**{**config.model_dump(), **fields})
    return prune_model(model, tokenizer, config, progress=progress)


def load_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, source)`` from an HF directory, hub id, ``.gguf`` file or alias."""
    from .models.loading import load_model as load

    return load(spec, dtype, trust_remote_code)
