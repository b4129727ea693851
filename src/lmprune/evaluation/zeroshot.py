"""Zero-shot accuracy through lm-evaluation-harness (its ``HFLM`` wrapper and evaluator, 0-shot).

Offline (a data directory given or in ``$LMPRUNE_DATA_DIR``), every task reads
``<data_dir>/zeroshot/<task>.jsonl``: a task YAML is written at run time into a temporary folder
(``dataset_path: json`` with the file's absolute path) carrying the harness's own prompt for that task over the
local field names (:mod:`lmprune.evaluation.prompts`), and a ``TaskManager`` indexes only that folder. Online (no data directory), the harness's own task definitions run.

lm-eval is an optional dependency: ``pip install 'lmprune[eval]'``.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from ..data.sources import data_dir as resolve_data_dir
from .prompts import DEFAULT_TASKS, TASKS, FunctionRef, task_spec

_INSTALL_HINT = "zero-shot evaluation needs lm-evaluation-harness: pip install 'lmprune[eval]'"
_HIGHER_IS_BETTER = {"acc": True, "acc_norm": True, "perplexity": False}
_AGGREGATION = {"acc": "mean", "acc_norm": "mean", "perplexity": "perplexity"}


def _require_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    return lm_eval, HFLM, TaskManager


def lm_eval_version() -> str | None:
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return None


def task_file(data_dir: Path, task: str) -> Path:
    """The JSONL file of ``task`` under ``data_dir``; a one-line ``ValueError`` naming it when absent."""
    task_spec(task)
    path = (Path(data_dir) / "zeroshot" / f"{task}.jsonl").resolve()
    if not path.is_file():
        raise ValueError(f"zero-shot task {task!r}: data file {path} not found")
    return path


def check_tasks(tasks: list[str], data_dir: Path | str | None = None) -> None:
    """Fail early (before hours of pruning) on an unknown task, a missing task file or a missing lm-eval."""
    _require_lm_eval()
    directory = resolve_data_dir(data_dir)
    if directory is not None:  # online, the harness itself knows which task names exist
        for task in tasks:
            task_file(directory, task)


def task_config(task: str, data_file: Path) -> dict[str, Any]:
    """The harness task config (YAML-ready) of ``task`` reading the local JSONL ``data_file``."""
    spec = task_spec(task)
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "num_fewshot": 0,
        "output_type": spec.output_type,
        **spec.harness,
        "metric_list": [
            {"metric": m, "aggregation": _AGGREGATION[m], "higher_is_better": _HIGHER_IS_BETTER[m]}
            for m in spec.metrics
        ],
        "metadata": {"version": 1.0, "source": "lmprune offline copy of the harness task"},
    }


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def _represent_str(dumper, text: str):
    # multi-line templates read best double-quoted, with "\n" escapes as in the harness's own YAMLs
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style='"' if "\n" in text else None)


_TaskDumper.add_representer(str, _represent_str)


def task_yaml(task: str, data_file: Path) -> str:
    """:func:`task_config` as YAML text."""
    return yaml.dump(task_config(task, data_file), Dumper=_TaskDumper, sort_keys=False, allow_unicode=True)


def write_task_yamls(tasks: list[str], data_dir: Path, out_dir: Path) -> list[Path]:
    """Write one harness task YAML per task into ``out_dir`` (usable with ``lm_eval --include_path``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in tasks:
        path = out_dir / f"{task}.yaml"
        path.write_text(task_yaml(task, task_file(data_dir, task)))
        paths.append(path)
    return paths


def _check_online_tasks(task_manager, tasks: list[str]) -> None:
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s): {', '.join(unknown)}")


def _summarise(raw: dict[str, Any], tasks: list[str]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from the harness's ``results`` block (keys like ``acc,none``)."""
    out: dict[str, dict[str, float]] = {}
    for task in tasks:
        scores = {}
        for key, value in raw["results"][task].items():
            metric, _, _filter = key.partition(",")
            if metric in ("alias", "sample_len") or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue
            scores[metric] = float(value)
        out[task] = scores
    return out


#: Bootstrap resamples for the harness's standard errors (its own default).
BOOTSTRAP_ITERS = 1000


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS,
    data_dir: Path | str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    log_samples: bool = False,
) -> dict[str, Any]:
    """Zero-shot scores of an in-memory causal LM on ``tasks``.

    ``data_dir`` defaults to ``$LMPRUNE_DATA_DIR``; with neither, the harness's own (online) tasks run.
    ``limit`` keeps the first ``limit`` documents of each task. Returns
    ``{task: {"acc": .., "acc_norm": .., "acc_stderr": .., ...}, "limit": limit, "n_docs": {task: n},
    "lm_eval_version": .., "time_s": ..}`` (LAMBADA: ``acc`` and ``perplexity``), plus ``"samples"`` when
    ``log_samples``. The model is moved to ``device`` and put in eval mode.
    """
    tasks = list(tasks)
    data_dir = resolve_data_dir(data_dir)
    if not tasks:
        raise ValueError("no zero-shot tasks given")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of documents, got {limit}")
    if data_dir is not None:
        for task in tasks:
            task_file(data_dir, task)  # fail on a missing file before loading anything heavy
    lm_eval, HFLM, TaskManager = _require_lm_eval()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)

    model.to(device).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmprune_tasks_") as tmp:
        if data_dir is not None:
            write_task_yamls(tasks, Path(data_dir), Path(tmp))
            manager = TaskManager(include_path=tmp, include_defaults=False)
        else:
            manager = TaskManager()
            _check_online_tasks(manager, tasks)
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=None if data_dir is not None else 0,  # offline YAMLs say 0 themselves
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            bootstrap_iters=BOOTSTRAP_ITERS,
            # evaluation is deterministic: leave the caller's RNG state alone
            random_seed=None,
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    elapsed = time.perf_counter() - start

    result: dict[str, Any] = _summarise(raw, tasks)
    result["limit"] = limit
    result["n_docs"] = {t: int(raw["n-samples"][t]["effective"]) for t in tasks}
    result["lm_eval_version"] = lm_eval_version()
    result["time_s"] = round(elapsed, 2)
    result["offline"] = data_dir is not None
    if log_samples:
        result["samples"] = raw.get("samples", {})
    return result


def score_table(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Only the ``{task: {metric: value}}`` entries of an :func:`evaluate_tasks` result."""
    return {k: v for k, v in result.items() if isinstance(v, dict) and ("acc" in v or "perplexity" in v)}


__all__ = ["DEFAULT_TASKS", "TASKS", "evaluate_tasks", "score_table", "task_config", "task_file", "write_task_yamls"]
