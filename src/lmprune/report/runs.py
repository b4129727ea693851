"""One reader of finished runs: a :class:`Run` record from a run directory's ``lmprune.json`` and its sidecars.

Everything that shows runs side by side reads them here: ``lmprune compare``, the plots and ``bench/tables.py``.
The reader accepts manifests of every lmprune version so far: keys a version did not write yet (inner solver,
block set, seed, world size, the split of a resumed run's time ...) come back as ``None`` or their defaults.

This module imports nothing else of lmprune, so every other part of the report can depend on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "lmprune.json"
ZEROSHOT_SIDECAR = "zeroshot.json"  # `lmprune eval --out RUN/zeroshot.json`, used when the manifest has none
PPL_META = frozenset({"eval_windows", "seqlen", "tokens", "tokens_evaluated", "windows", "windows_available",
                      "details"})
ZS_METRICS = ("acc", "acc_norm", "perplexity")
BLOCK_METHODS = frozenset({"sparsellm"})  # methods that run a per-matrix solver inside (``inner``)


@dataclass
class Run:
    """What the report and the benchmark tables show of one run.

    ``method`` is the method as ``lmprune compare`` names it, a refiner joined as ``"wanda+dsnot"``;
    :attr:`base_method`, :attr:`refiner` and :attr:`inner` hold the parts. ``seqlen`` and ``eval_windows`` are the
    perplexity windows; the calibration's are ``nsamples`` and ``calib_seqlen``.
    """

    name: str  # the run directory's name (the comparison's "run" column)
    path: Path
    method: str
    allocation: str
    pattern: str
    sparsity: float
    achieved_sparsity: float | None
    perplexity: dict[str, float]
    eval_windows: Any
    seqlen: Any
    zeroshot: dict[str, dict[str, float]]
    zeroshot_limit: Any
    time_s: float | None
    peak_rss_mb: float | None
    layers: list[dict] = field(default_factory=list)
    dense_perplexity: dict[str, float] = field(default_factory=dict)  # --eval-dense figures, same windows/seqlen
    model: str | None = None  # the pruned model's sha256 (or spec) and dtype: which dense model those figures are of
    refiner: str = "none"
    inner: str | None = None  # the per-matrix solver of a block method (sparsellm), else None
    allocation_options: dict[str, Any] = field(default_factory=dict)
    allocation_time_s: float | None = None
    blocks: str = "all"  # the block set asked for: "all", "first-half", "0-14" ...
    pruned_blocks: list[int] | None = None
    seed: int | None = None
    nsamples: int | None = None
    calib_seqlen: int | None = None
    calibration_time_s: float | None = None
    solver_time_s: float | None = None
    time_this_process_s: float | None = None
    block_times_s: list[float] | None = None
    resumed_from_block: int | None = None
    mean_rel_error: float | None = None
    peak_cuda_mb: float | None = None
    world_size: int = 1
    threads: int | None = None  # torch's thread count (versions.torch_threads)
    device: str | None = None
    created: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def label(self) -> str:
        """The configuration in a few words, e.g. ``sparsellm(alps)+dsnot, alpha ε=0.3``: :attr:`method_label`,
        then a non-uniform allocation. Delegates to ``lmprune.report.labels.configuration_label`` where that
        exists (and this run was read from a manifest)."""
        try:
            from .labels import configuration_label  # type: ignore[import-not-found]
        except ImportError:
            configuration_label = None
        if configuration_label is not None and self.manifest:
            return configuration_label(self.manifest)
        alloc = self.allocation_label
        return self.method_label + (f", {alloc}" if alloc not in ("uniform", "-", "") else "")

    @property
    def base_method(self) -> str:
        return self.method.split("+", 1)[0]

    @property
    def method_label(self) -> str:
        """The method as the benchmark tables name it: a block method's inner solver in brackets, a refiner after
        a "+" (``sparsellm(alps)``, ``wanda+dsnot``)."""
        inner = f"({self.inner})" if self.inner and self.base_method in BLOCK_METHODS else ""
        return self.base_method + inner + (f"+{self.refiner}" if self.refiner not in ("none", "") else "")

    @property
    def allocation_label(self) -> str:
        eps = self.allocation_options.get("epsilon")
        return self.allocation + (f" ε={eps:g}" if self.allocation == "alpha" and eps is not None else "")

    @property
    def is_dense(self) -> bool:
        return self.method == "dense" or self.sparsity == 0

    @property
    def is_nm(self) -> bool:
        return ":" in self.pattern and self.pattern != "unstructured:row"

    @property
    def setting(self) -> str:
        """The pattern for N:M runs, the target sparsity otherwise; "–" for the dense model."""
        if self.is_dense:
            return "–"
        return self.pattern if self.is_nm else f"{self.sparsity:.0%}"

    @property
    def blocks_label(self) -> str:
        """``all``, or the block set with the blocks it meant for this model (``first-half (blocks 0–14)``)."""
        if self.blocks == "first-half" and self.pruned_blocks:
            return f"first-half (blocks {min(self.pruned_blocks)}–{max(self.pruned_blocks)})"
        return self.blocks

    @property
    def wall_time(self) -> tuple[float | None, bool]:
        """Pruning wall time, and whether it had to be rebuilt from per-block times: manifests of resumed runs
        written before ``time_this_process_s`` existed hold only the resuming process's time."""
        if self.resumed_from_block and self.time_this_process_s is None and self.block_times_s:
            return sum(self.block_times_s), True
        return self.time_s, False

    @property
    def series(self) -> str:
        """The curve a run belongs to in plots: its method, qualified by a non-default allocation or pattern."""
        extras = [x for x in (self.allocation, self.pattern) if x not in ("uniform", "unstructured", "", "-")]
        return f"{self.method} ({', '.join(extras)})" if extras else self.method


def name_of(value: Any, default: str = "-") -> str:
    """A short label for a manifest field that may be a string, a number, None or a dict with a name."""
    if value is None:
        return default
    if isinstance(value, dict):
        for key in ("name", "method", "kind", "type"):
            if key in value:
                return str(value[key])
        return json.dumps(value, sort_keys=True)
    return str(value)


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value: Any) -> int | None:
    n = number(value)
    return int(n) if n is not None else None


def perplexities(block: dict | None) -> dict[str, float]:
    """Perplexity per dataset, without the evaluation settings stored beside them."""
    return {k: float(v) for k, v in (block or {}).items() if k not in PPL_META and number(v) is not None}


def zeroshot_scores(block: dict | None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from a manifest's ``zeroshot`` entry (flat or nested under ``tasks``)."""
    block = block or {}
    per_task = block.get("tasks") if isinstance(block.get("tasks"), dict) else block
    return {
        task: {m: float(s[m]) for m in ZS_METRICS if number(s.get(m)) is not None}
        for task, s in per_task.items()
        if isinstance(s, dict) and any(number(s.get(m)) is not None for m in ZS_METRICS)
    }


def _sidecar_zeroshot(path: Path) -> dict:
    """Zero-shot scores from an evaluation file: its ``zeroshot`` entry, or the file itself (a plain
    ``evaluate_tasks`` result)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("zeroshot") or data


def _mean_rel_error(data: dict) -> float | None:
    errors = [e for layer in data.get("layers") or [] if (e := number(layer.get("rel_error"))) is not None]
    return sum(errors) / len(errors) if errors else number(data.get("mean_rel_error"))


def _eval_seqlen(data: dict, ppl: dict) -> Any:
    return ppl.get("seqlen", data.get("eval_seqlen", data.get("seqlen")))


def run_from_manifest(data: dict[str, Any], path: Path, zeroshot: dict | None = None) -> Run:
    """A :class:`Run` from a manifest's content; ``path`` is its run directory (its name names the run).
    ``zeroshot`` replaces the manifest's zero-shot entry when the manifest has none (a sidecar file)."""
    path = Path(path)
    cfg = data.get("config") or {}
    calib = data.get("calibration") or {}
    ppl = data.get("perplexity") or {}
    zs = data.get("zeroshot") or zeroshot or {}
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    model_id = model.get("sha256") or model.get("spec")
    method = name_of(data.get("method"))
    refiner = name_of(data.get("refine") or cfg.get("refine"), "none")
    sparsity = number(data.get("sparsity"))
    alloc_detail = data.get("allocation_detail") or {}
    threads = (data.get("versions") or {}).get("torch_threads")
    return Run(
        name=path.name,
        path=path,
        method=method if refiner == "none" else f"{method}+{refiner}",
        allocation=name_of(data.get("allocation"), "uniform"),
        pattern=name_of(data.get("pattern"), "unstructured"),
        sparsity=sparsity if sparsity is not None else 0.0,
        achieved_sparsity=number(data.get("achieved_sparsity")),
        perplexity=perplexities(ppl),
        eval_windows=ppl.get("eval_windows", data.get("eval_windows")),
        seqlen=_eval_seqlen(data, ppl),
        zeroshot=zeroshot_scores(zs),
        zeroshot_limit=zs.get("limit"),
        time_s=number(data.get("time_s")),
        peak_rss_mb=number(data.get("peak_rss_mb")),
        layers=list(data.get("layers") or []),
        dense_perplexity=perplexities(data.get("dense_perplexity")),
        model=f"{model_id} {model.get('dtype', '')}".strip() if model_id else None,
        refiner=refiner,
        inner=(data.get("inner") or cfg.get("inner")) if method in BLOCK_METHODS else None,
        allocation_options=dict(cfg.get("allocation_options") or data.get("allocation_options") or {}),
        allocation_time_s=number(alloc_detail.get("time_s", data.get("allocation_time_s"))),
        blocks=str(cfg.get("blocks") or data.get("blocks") or "all"),
        pruned_blocks=data.get("pruned_blocks"),
        seed=_int(data.get("seed", cfg.get("seed"))),
        nsamples=_int(calib.get("nsamples", cfg.get("nsamples", data.get("nsamples")))),
        calib_seqlen=_int(calib.get("seqlen", cfg.get("seqlen", data.get("calib_seqlen")))),
        calibration_time_s=number(data.get("calibration_time_s")),
        solver_time_s=number(data.get("solver_time_s")),
        time_this_process_s=number(data.get("time_this_process_s")),
        block_times_s=data.get("block_times_s"),
        resumed_from_block=_int(data.get("resumed_from_block")),
        mean_rel_error=_mean_rel_error(data),
        peak_cuda_mb=number(data.get("peak_cuda_mb")),
        world_size=_int(data.get("world_size")) or 1,
        threads=int(threads) if isinstance(threads, str) and threads.isdigit() else _int(threads),
        device=data.get("device") or cfg.get("device"),
        created=data.get("created"),
        manifest=data,
    )


def load_run(path: str | Path) -> Run:
    """Read a run directory (or its ``lmprune.json``); a one-line ``ValueError`` when the manifest is missing."""
    path = Path(path)
    manifest = path if path.is_file() else path / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{path}: no {MANIFEST} (not a run directory)")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{manifest}: not valid JSON ({err})") from None
    sidecar = None if data.get("zeroshot") else _sidecar_zeroshot(manifest.parent / ZEROSHOT_SIDECAR)
    return run_from_manifest(data, manifest.parent, sidecar)


def is_finished(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a finished run (lmprune writes the manifest last, then renames the directory)."""
    return (Path(run_dir) / MANIFEST).is_file()


def load_runs(paths: list[str | Path], skip_unfinished: bool = False) -> list[Run]:
    """Every run directory of ``paths``, in order; unfinished ones are an error unless ``skip_unfinished``."""
    return [load_run(p) for p in paths if not skip_unfinished or is_finished(p)]


def common_tasks(runs: list[Run]) -> list[str]:
    """Tasks with an accuracy in every run that has zero-shot results (the average is taken over these)."""
    scored = [r for r in runs if r.zeroshot]
    if not scored:
        return []
    first = [t for t in scored[0].zeroshot if "acc" in scored[0].zeroshot[t]]
    return [t for t in first if all("acc" in r.zeroshot.get(t, {}) for r in scored)]


def zeroshot_average(run: Run, tasks: list[str]) -> float | None:
    """Mean ``acc`` over ``tasks`` (None when the run has no zero-shot results)."""
    if not tasks or not run.zeroshot:
        return None
    return sum(run.zeroshot[t]["acc"] for t in tasks) / len(tasks)
