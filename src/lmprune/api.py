"""The library surface: ``prune`` a model in memory, ``run`` a whole job into a run directory, ``evaluate``.

The pipeline has three visible stages over one engine::

    allocator (per-matrix targets) → solver (per matrix, or a block strategy) → refiner (mask surgery)
"""

from __future__ import annotations

import hashlib
import importlib
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from . import __version__
from .allocation.base import Allocation, uniform
from .checkpoint import CHECKPOINT, MARKER, Checkpoint, open_checkpoint, staging_dir
from .config import BLOCK_METHODS, ConfigError, PruneConfig
from .data.calibration import sample_windows
from .data.sources import load_source
from .engine import EngineResult, collect_input_norms, prune_block_layerwise, run_engine
from .evaluation.perplexity import PerplexityResult, perplexity
from .models.adapters import FamilyAdapter, get_adapter
from .patterns import Pattern
from .report.labels import configuration_label
from .report.manifest import MANIFEST, REPORT, now_iso, peak_cuda_mb, peak_rss_mb, read_manifest, versions, write_json
from .report.markdown import render_report
from .solvers import get_solver
from .solvers.base import Gram, SolveResult


ALPHA_CACHE = Path("~/.cache/lmprune/alpha").expanduser()


def default_seqlen(model: nn.Module) -> int:
    return int(min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048))


def _validated(what: str, options_cls: Any, values: dict[str, Any]) -> dict[str, Any]:
    try:
        return options_cls(**values).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{what}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


def resolved_settings(config: PruneConfig) -> dict[str, Any]:
    """Every option each stage actually runs with (presets and defaults filled in), for the manifest."""
    spec = get_solver(config.solver_name)
    out: dict[str, Any] = {
        "solver": spec.name,
        "solver_options": _validated(f"solver_options for {spec.name}", lambda **kw: spec.options(kw),
                                     config.solver_options),
        "refiner": config.refine,
    }
    if config.refine != "none":
        refiner = importlib.import_module(f"lmprune.refiners.{config.refine}")
        out["refine_options"] = _validated(f"refine_options for {config.refine}", refiner.Options,
                                           config.refine_options)
    if config.method in BLOCK_METHODS:
        strategy = importlib.import_module(f"lmprune.strategies.{config.method}")
        out["method_options"] = _validated(f"method_options for {config.method}", strategy.StrategyOptions,
                                           config.method_options)
    return out


def achieved_sparsity(layers: list[dict[str, Any]]) -> float:
    """Fraction of zeros over all pruned matrices, from their per-layer records."""
    params = sum(r["shape"][0] * r["shape"][1] for r in layers)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers)
    return zeros / params if params else 0.0


def make_inner(
    config: PruneConfig, settings: dict[str, Any] | None = None,
) -> Callable[[Tensor, Gram, float], SolveResult]:
    """solver → refiner for one matrix, with validated options (``settings``: :func:`resolved_settings`) bound."""
    pattern = config.pattern_obj
    settings = settings or resolved_settings(config)
    solver_opts = settings["solver_options"]
    solve = get_solver(config.solver_name).solve_fn()
    refiner = None
    if config.refine != "none":
        refiner = importlib.import_module(f"lmprune.refiners.{config.refine}")
        refine_opts = settings["refine_options"]

    def inner(weight: Tensor, gram: Gram, target: float) -> SolveResult:
        result = solve(weight, gram, pattern, target, **solver_opts)
        if refiner is not None:
            result = refiner.refine(weight, result, gram, pattern, target, **refine_opts)
        return result

    return inner


def block_strategy(config: PruneConfig):
    if config.method in BLOCK_METHODS:
        module = importlib.import_module(f"lmprune.strategies.{config.method}")
        return module.prune_block, config.method_options
    return prune_block_layerwise, {"sequential": config.sequential}


def allocate(
    model: nn.Module, adapter: FamilyAdapter, config: PruneConfig, blocks: list[int],
    windows: Tensor | None = None, progress: bool = True,
) -> Allocation:
    """Per-matrix target sparsities (stage 1). N:M patterns are uniform by definition."""
    pattern: Pattern = config.pattern_obj
    chosen = [(n, b, lin) for n, b, lin in adapter.matrices(model) if b in set(blocks)]
    target = pattern.effective_sparsity(config.sparsity)
    start = time.perf_counter()
    kind = config.allocation
    if kind == "uniform":
        alloc = uniform([(n, lin.weight.numel(), b) for n, b, lin in chosen], target)
    elif kind.endswith(".json"):
        from .allocation import load_allocation_file

        alloc = load_allocation_file(kind, [n for n, _, _ in chosen])
    else:
        from .allocation.base import MatrixInfo

        infos = [MatrixInfo(n, b, lin.weight.detach()) for n, b, lin in chosen]
        module = importlib.import_module(f"lmprune.allocation.{kind}")
        options = dict(config.allocation_options)
        if kind == "alpha":
            options.setdefault("cache_dir", str(ALPHA_CACHE))
            options.setdefault("device", config.device)  # the SVDs run where the solvers do
        if kind == "owl":
            if windows is None:
                raise ValueError("OWL allocation needs calibration windows")
            norms = collect_input_norms(model, adapter, windows, config.device, progress,
                                        config.offload_activations, config.calib_batch_size, config.offload_dir)
            alloc = module.allocate(infos, norms, target, **options)
        else:
            alloc = module.allocate(infos, target, **options)
    alloc.time_s = time.perf_counter() - start  # includes OWL's calibration pass
    return alloc


def prune(
    model: nn.Module,
    tokenizer: Any,
    config: PruneConfig,
    progress: bool = True,
    on_block_done: Callable | None = None,
    checkpoint: Checkpoint | None = None,
    before_block: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place according to ``config``; returns the manifest fields of the run.

    With a ``checkpoint``, every finished block is checkpointed and a matching earlier checkpoint is resumed.
    """
    torch.manual_seed(config.seed)
    adapter = get_adapter(model)
    n_blocks = len(adapter.blocks(model))
    blocks = config.block_indices(n_blocks)
    seqlen = config.seqlen or default_seqlen(model)
    for name, b, lin in adapter.matrices(model):
        if b in blocks:
            try:
                config.pattern_obj.validate(tuple(lin.weight.shape))
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
    start = time.perf_counter()

    source = load_source(config.calib, "calib", config.data_dir)
    windows = sample_windows(source, tokenizer, config.nsamples, seqlen, config.seed)
    windows_sha = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    start_block, start_inputs, done_records, done_times = 0, None, [], []
    prior = {"elapsed_s": 0.0, "calibration_time_s": 0.0}
    live: dict[str, float] = {}
    if checkpoint is not None and checkpoint.done_block() >= 0:
        checkpoint.verify({"windows_sha256": windows_sha})
        start_block, start_inputs, done_records, done_times, alloc_dict = checkpoint.restore(model, adapter, windows)
        prior = checkpoint.prior_timings()
        alloc = Allocation.from_dict(alloc_dict)
    else:
        alloc = allocate(model, adapter, config, blocks, windows, progress)
    if checkpoint is not None:
        save_block = checkpoint.writer(model, adapter, alloc.to_dict(), {"windows_sha256": windows_sha}, start, live)
        user_callback = on_block_done

        def on_block_done(i, inputs_next, records):
            if user_callback is not None:  # first, so a checkpoint never names a block the callback did not finish
                user_callback(i, inputs_next, records)
            save_block(i, inputs_next, records)

    strategy, strategy_options = block_strategy(config)
    settings = resolved_settings(config)
    result: EngineResult = run_engine(
        model, adapter, windows, config.pattern_obj, alloc.targets, make_inner(config, settings), strategy,
        strategy_options, blocks, config.device, progress, on_block_done, start_block, start_inputs, before_block,
        offload_activations=config.offload_activations, batch_windows=config.calib_batch_size,
        offload_dir=config.offload_dir, live=live,
    )
    elapsed = time.perf_counter() - start
    all_records = done_records + result.records
    achieved = {r.name: r.sparsity for r in all_records}
    for m in alloc.matrices:
        m.achieved = achieved.get(m.name)
    layers = [asdict(r) for r in all_records]
    out = {
        "method": config.method,
        "sparsity": config.sparsity,
        "pattern": config.pattern,
        "allocation": config.allocation,
        "achieved_sparsity": achieved_sparsity(layers),
        "pattern_ok": all(r.pattern_ok for r in result.records),
        "pruned_blocks": blocks,
        "n_blocks": n_blocks,
        "layers": layers,
        "allocation_detail": alloc.to_dict(),
        "time_s": prior["elapsed_s"] + elapsed,  # a resumed run adds the interrupted one's, to its last checkpoint
        "time_this_process_s": elapsed,
        "calibration_time_s": prior["calibration_time_s"] + result.calibration_time_s,
        "solver_time_s": sum(r.time_s for r in all_records),
        "block_times_s": done_times + result.block_times,
        "resumed_from_block": start_block or None,
        "seed": config.seed,
        "resolved_options": settings,
        "calibration": {
            "source": source.origin,
            "sha256": source.sha256,
            "nsamples": config.nsamples,
            "seqlen": seqlen,
            "windows_sha256": windows_sha,
        },
        "config": config.model_dump(),
    }
    out["configuration"] = configuration_label(out)
    return out


def evaluate_perplexity(
    model: nn.Module, tokenizer: Any, datasets: list[str], seqlen: int, max_windows: int | None,
    data_dir: str | None, device: str = "cpu", progress: bool = True, batch_size: int = 1,
) -> dict[str, Any]:
    """``{dataset: ppl, ..., "eval_windows": K, "seqlen": L, "details": {dataset: PerplexityResult}}``.

    ``batch_size`` windows per forward pass (see :func:`~lmprune.evaluation.perplexity.stream_perplexity`)."""
    out: dict[str, Any] = {"eval_windows": max_windows, "seqlen": seqlen, "details": {}}
    for ds in datasets:
        r: PerplexityResult = perplexity(model, tokenizer, ds, seqlen, max_windows, data_dir, device, progress,
                                         batch_size)
        out[ds] = r.perplexity
        out["details"][ds] = r.to_dict()
    return out


def _config_key(manifest: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(manifest.get("config", {}))
    cfg.pop("device", None)  # where it runs and where activations live do not change the result
    cfg.pop("offload_activations", None)
    cfg.pop("offload_dir", None)
    cfg.pop("calib_batch_size", None)
    cfg.pop("data_dir", None)
    return {"model": manifest.get("model", {}).get("spec"), **cfg}


class RunExists(Exception):
    """The output directory already holds this very run, finished."""


def check_out_dir(out: Path, model_spec: str, config: PruneConfig, overwrite: bool) -> None:
    """Refuse a directory holding something else; let an identical finished run be skipped."""
    if not out.exists() or overwrite:
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        new = _config_key({"model": {"spec": model_spec}, "config": config.model_dump()})
        if _config_key(old) == new:
            raise RunExists(f"{out} already holds this finished run; use --overwrite to redo it")
        diff = sorted(k for k in set(new) | set(_config_key(old)) if new.get(k) != _config_key(old).get(k))
        raise ConfigError(f"--out {out} already holds a different run (differs in: {', '.join(diff)}); "
                          "use another --out or --overwrite")
    if any(out.iterdir()):
        raise ConfigError(f"--out {out} is a non-empty directory that is not an lmprune run")


def saved_dtype(model_spec: str, save_dtype: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a run is saved in: ``"original"`` is the dtype the model's own config declares (float32 for a
    GGUF file, whose weights are dequantised, or a config that declares none)."""
    if save_dtype != "original":
        return getattr(torch, save_dtype)
    from .models.loading import declared_dtype, load_config, resolve

    if resolve(model_spec).kind in ("alias", "gguf"):
        return torch.float32
    return declared_dtype(load_config(model_spec, trust_remote_code))


@torch.no_grad()
def cast_for_saving(model: nn.Module, dtype: torch.dtype, manifest: dict[str, Any]) -> None:
    """Cast ``model`` to ``dtype`` and bring the manifest's sparsity figures in line with the cast weights
    (a weight too small for a half-precision format becomes an extra zero)."""
    before = next(model.parameters()).dtype
    if before == dtype:
        return
    for param in model.parameters():  # parameters only: buffers such as rotary frequencies keep their dtype
        param.data = param.data.to(dtype)
    params = dict(model.named_parameters())
    new_zeros = 0
    for rec in manifest["layers"]:
        w = params[rec["name"] + ".weight"]
        achieved = 1 - torch.count_nonzero(w).item() / w.numel()
        new_zeros += round((achieved - rec["sparsity"]) * w.numel())
        rec["sparsity"] = achieved
    manifest["achieved_sparsity"] = achieved_sparsity(manifest["layers"])
    manifest["save_cast"] = {"from": str(before).removeprefix("torch."), "to": str(dtype).removeprefix("torch."),
                             "new_zeros": new_zeros,
                             "note": "perplexity and layer errors were measured before the cast"}


def save_run(model: nn.Module, tokenizer: Any, manifest: dict[str, Any], out: Path, plots: bool = True) -> Path:
    """Write model, tokenizer, manifest and report into a sibling temp dir, check the reload, then rename."""
    out = Path(out)
    staging = staging_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    for child in staging.iterdir():  # leftovers of an earlier attempt; the checkpoint stays until the end
        if child.name not in (CHECKPOINT, MARKER):
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    manifest["reload_check"] = reload_check(model, staging, manifest["layers"])
    write_json(staging / MANIFEST, manifest)
    plot_files = {}
    if plots:
        from .report.plots import plot_run

        png = plot_run(staging)
        if png is not None:
            plot_files["per-block sparsity and reconstruction error"] = Path(png).name
    if "allocation_detail" in manifest:
        from .allocation.plot import plot_allocation

        allocation = Allocation.from_dict(manifest["allocation_detail"])
        allocation.to_json(staging / "allocation.json")
        if plots:
            plot_allocation(allocation, staging / "allocation.png")
            plot_files["allocation: metric and target sparsity per block"] = "allocation.png"
    (staging / REPORT).write_text(render_report(manifest, plot_files))
    shutil.rmtree(staging / CHECKPOINT, ignore_errors=True)
    (staging / MARKER).unlink(missing_ok=True)
    old = out.with_name(f".{out.name}.replaced")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


@torch.no_grad()
def reload_check(model: nn.Module, saved: Path, layers: list[dict]) -> dict[str, Any]:
    """Reload the saved model with plain transformers; compare sparsity and logits with the one in memory."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=next(model.parameters()).dtype)
    reloaded.eval()
    params = dict(reloaded.named_parameters())
    mismatched = []
    for rec in layers:
        w = params[rec["name"] + ".weight"]
        if abs((1 - torch.count_nonzero(w).item() / w.numel()) - rec["sparsity"]) > 1e-9:
            mismatched.append(rec["name"])
    device = next(model.parameters()).device
    ids = torch.arange(1, 17).unsqueeze(0) % model.config.vocab_size
    a = model(ids.to(device)).logits.float().cpu()
    b = reloaded(ids).logits.float()
    diff = (a - b).abs().max().item()
    ok = not mismatched and diff <= 1e-4 * max(1.0, a.abs().max().item())
    if not ok:
        raise RuntimeError(f"saved model does not match the pruned one: max logit diff {diff:g}, "
                           f"sparsity mismatch in {mismatched[:3]}")
    return {"ok": ok, "max_abs_logit_diff": diff}


def run(
    model_spec: str,
    config: PruneConfig,
    out: str | Path,
    eval_datasets: list[str] | None = None,
    eval_windows: int | None = None,
    eval_seqlen: int | None = None,
    eval_dense: bool = False,
    tasks: list[str] | None = None,
    task_limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    resume: bool | None = None,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    trust_pickle: bool = False,
    memory_check: bool = True,
    invocation: dict[str, Any] | None = None,
    save_dtype: str = "original",
) -> dict[str, Any]:
    """Load → (dense eval) → prune → eval → save. Returns the manifest written to ``out/lmprune.json``.

    An interrupted run of the same configuration into ``out`` is resumed from its last finished block
    (``resume=None``: when there is one; ``True``: require one; ``False``: discard it and start over).
    ``dtype`` is the precision the model is loaded and propagated in ("auto": as saved); solves are float32
    whatever it is. ``save_dtype`` is the precision it is saved in ("original": the model's own, so a float16
    model pruned on the float32 path is saved as float16 again). With ``memory_check`` a run whose estimated
    peak exceeds the available memory stops before loading the weights.
    """
    from .models.loading import load_model

    out = Path(out)
    check_out_dir(out, model_spec, config, overwrite)
    key = _config_key({"model": {"spec": model_spec}, "config": config.model_dump()})
    checkpoint = open_checkpoint(out, {**key, "dtype": dtype}, overwrite, resume)
    if eval_datasets:
        for ds in eval_datasets:  # fail on a missing data file before hours of pruning
            load_source(ds, "eval", config.data_dir)
    if tasks:
        from .evaluation.zeroshot import check_tasks

        check_tasks(tasks, config.data_dir)
    memory_plan = None
    if memory_check:
        from .memory import check_fits, plan_for_spec

        memory_plan = plan_for_spec(model_spec, config, dtype, eval_datasets, eval_seqlen, trust_remote_code)
        check_fits(memory_plan)
    model, tokenizer, source = load_model(model_spec, dtype, trust_remote_code, trust_pickle)
    if config.device != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device} requested but CUDA is not available")
    seqlen = eval_seqlen or config.seqlen or default_seqlen(model)
    manifest: dict[str, Any] = {"lmprune_version": __version__, "created": now_iso()}
    if invocation:
        manifest["invocation"] = invocation
    manifest["run_options"] = {"dtype": dtype, "save_dtype": save_dtype, "trust_remote_code": trust_remote_code,
                               "trust_pickle": trust_pickle, "resume": resume}
    if memory_plan is not None:
        manifest["memory_plan"] = memory_plan.to_dict()
    dense_ppl = None
    if eval_dense and eval_datasets:
        model.to(config.device)
        dense_ppl = evaluate_perplexity(model, tokenizer, eval_datasets, seqlen, eval_windows, config.data_dir,
                                        config.device, progress)
        model.to("cpu")
    checkpoint.fingerprint["model_sha256"] = source.sha256
    manifest.update(prune(model, tokenizer, config, progress, checkpoint=checkpoint))
    manifest["model"] = {
        "spec": model_spec, "kind": source.kind, "path": source.path, "sha256": source.sha256,
        "model_type": model.config.model_type, "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **source.details,
    }
    if eval_datasets:
        model.to(config.device)
        manifest["perplexity"] = evaluate_perplexity(model, tokenizer, eval_datasets, seqlen, eval_windows,
                                                     config.data_dir, config.device, progress)
        if dense_ppl is not None:
            manifest["dense_perplexity"] = {k: v for k, v in dense_ppl.items() if k in eval_datasets}
        model.to("cpu")
    if tasks:
        from .evaluation.zeroshot import evaluate_tasks

        manifest["zeroshot"] = evaluate_tasks(model, tokenizer, tasks, config.data_dir, task_limit, device=config.device)
    manifest["peak_rss_mb"] = peak_rss_mb()
    manifest["peak_cuda_mb"] = peak_cuda_mb()
    manifest["versions"] = versions()
    cast_for_saving(model, saved_dtype(model_spec, save_dtype, trust_remote_code), manifest)
    save_run(model, tokenizer, manifest, out)
    return manifest


def evaluate(
    model_spec: str,
    ppl_datasets: list[str] | None = None,
    eval_windows: int | None = None,
    seqlen: int | None = None,
    tasks: list[str] | None = None,
    limit: int | None = None,
    data_dir: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    ppl_batch_size: int = 1,
) -> dict[str, Any]:
    """Perplexity and/or zero-shot accuracy of a model spec or a finished run directory.

    ``batch_size`` is the zero-shot batch, ``ppl_batch_size`` the perplexity windows per forward pass."""
    from .models.loading import load_model

    for ds in ppl_datasets or []:
        load_source(ds, "eval", data_dir)
    model, tokenizer, source = load_model(model_spec)
    model.to(device)
    result: dict[str, Any] = {"model": model_spec, "sha256": source.sha256, "created": now_iso()}
    if (Path(model_spec) / MANIFEST).is_file():
        run = read_manifest(model_spec)
        result["run"] = {k: run.get(k) for k in ("method", "sparsity", "pattern", "allocation", "achieved_sparsity")}
    if ppl_datasets:
        L = seqlen or default_seqlen(model)
        result["perplexity"] = evaluate_perplexity(model, tokenizer, ppl_datasets, L, eval_windows, data_dir, device,
                                                   progress, ppl_batch_size)
    if tasks:
        from .evaluation.zeroshot import evaluate_tasks

        result["zeroshot"] = evaluate_tasks(model, tokenizer, tasks, data_dir, limit, batch_size=batch_size,
                                            device=device)
    result["versions"] = versions()
    return result


def allocate_only(
    model_spec: str, kind: str, sparsity: float, out: str | None = None, calib: str = "c4", nsamples: int = 128,
    seqlen: int | None = None, seed: int = 0, options: dict | None = None, data_dir: str | None = None,
    device: str = "cpu", progress: bool = True,
) -> tuple[Allocation, list[Path]]:
    """Compute an allocation (and its plot) without pruning; ``out`` is the JSON path."""
    from .config import build_config
    from .models.loading import load_model

    config = build_config(method="magnitude", sparsity=sparsity, allocation=kind, allocation_options=options or {},
                          calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed, data_dir=data_dir, device=device)
    model, tokenizer, _ = load_model(model_spec)
    adapter = get_adapter(model)
    windows = None
    if kind == "owl":
        L = seqlen or default_seqlen(model)
        windows = sample_windows(load_source(calib, "calib", data_dir), tokenizer, nsamples, L, seed)
    alloc = allocate(model, adapter, config, list(range(len(adapter.blocks(model)))), windows, progress)
    paths: list[Path] = []
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        alloc.to_json(path)
        paths.append(path)
        from .allocation.plot import plot_allocation

        paths.append(Path(plot_allocation(alloc, path.with_suffix(".png"))))
    return alloc, paths
