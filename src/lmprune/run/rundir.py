"""The run directory: its identity, its lock, its staging, the save and the reload check.

A run into ``OUT`` works in the sibling ``.OUT.partial`` and renames it to ``OUT`` only when the model, the
manifest and the report are all written and the saved model reloaded and matched. Rules:

* ``OUT`` may hold nothing, an empty folder, or an lmprune run (a finished one is skipped when it is this very
  run); ``--overwrite`` replaces only an lmprune run -- never a user's folder or file.
* One run at a time: the staging folder (and ``OUT`` when it is replaced) is held with an OS lock
  (``fcntl.flock``), released when the process ends however it ends; a second run is refused at once, naming the
  holder's PID.
* A full disk ends the run with one line naming the folder and the space it needed; what was checkpointed
  stays resumable.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..config import RUN_PLACE_FIELDS, ConfigError, PruneConfig
from ..models.experts import weight_named
from ..report.manifest import MANIFEST, REPORT, read_manifest, write_json

MARKER = "INCOMPLETE"
LOCK_FILE = "LOCK"
MiB = 2**20


class RunExists(Exception):
    """The output directory already holds this very run, finished."""


class RunLocked(ConfigError):
    """Another process is running into the same output directory."""


class DiskFull(OSError):
    """No space left while writing the run; the message says where and how much was needed."""


def staging_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.partial")


def config_key(model_spec: str, config: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run's result: the model and the configuration less where and how it ran."""
    cfg = dict(config)
    for key in RUN_PLACE_FIELDS:
        cfg.pop(key, None)
    return {"model": model_spec, **cfg}


def is_run_dir(path: Path) -> bool:
    """A finished lmprune run, or an interrupted one (its marker)."""
    return path.is_dir() and ((path / MANIFEST).is_file() or (path / MARKER).is_file())


def check_out_dir(out: Path, model_spec: str, config: PruneConfig, overwrite: bool) -> None:
    """Refuse an ``out`` holding anything but an lmprune run; with ``overwrite`` an lmprune run is replaced, and
    without it a finished identical run raises :class:`RunExists`."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    empty = not any(out.iterdir())
    if overwrite:
        if empty or is_run_dir(out):
            return
        raise ConfigError(f"--out {out} is a non-empty directory that is not an lmprune run; --overwrite replaces "
                          "only lmprune runs")
    if (out / MANIFEST).is_file():
        old = config_key(read_manifest(out).get("model", {}).get("spec"), read_manifest(out).get("config", {}))
        new = config_key(model_spec, config.model_dump())
        if old == new:
            raise RunExists(f"{out} already holds this finished run; use --overwrite to redo it")
        diff = sorted(k for k in set(new) | set(old) if new.get(k) != old.get(k))
        raise ConfigError(f"--out {out} already holds a different run (differs in: {', '.join(diff)}); "
                          "use another --out or --overwrite")
    if not empty:
        raise ConfigError(f"--out {out} is a non-empty directory that is not an lmprune run")


def _holder(folder: Path) -> str:
    try:
        pid = (folder / LOCK_FILE).read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid else "another process"


def _flock(folder: Path, what: str) -> int:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLocked(f"{what} {folder} is in use by {_holder(folder)}; wait for it to finish or stop it") from None
    return fd


@contextmanager
def locked(out: Path) -> Iterator[Path]:
    """Hold the run's staging folder (created if needed) and, when it exists, ``out`` itself, for the whole
    run; yields the staging folder. The folders are never removed while held, only emptied, so a lock always
    refers to the folder other runs see."""
    staging = staging_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    fds = [_flock(staging, "the run's staging folder")]
    try:
        if out.is_dir():
            fds.append(_flock(out, "--out"))
        (staging / LOCK_FILE).write_text(f"{os.getpid()}\n")
        yield staging
    finally:
        if staging.is_dir() and {p.name for p in staging.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(staging)  # stopped before it wrote anything: leave nothing behind
        for fd in fds:
            os.close(fd)


def clear(folder: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove everything in ``folder`` except the names in ``keep``."""
    for child in folder.iterdir():
        if child.name not in keep:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def free_mib(path: Path) -> float:
    return shutil.disk_usage(path).free / MiB


@contextmanager
def disk_space(folder: Path, needed_bytes: float, what: str) -> Iterator[None]:
    """Turn "no space left on device" while writing ``what`` into ``folder`` into one line with the space
    needed (``DiskFull``)."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC or isinstance(e, DiskFull):
            raise
        raise DiskFull(errno.ENOSPC, f"no space left on device writing {what} in {folder}: about "
                                     f"{needed_bytes / MiB:.0f} MiB needed, {free_mib(folder):.0f} MiB free; free "
                                     "some and repeat the command to resume") from None


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def publish(staging: Path, out: Path) -> Path:
    """Rename the finished staging folder to ``out``, replacing an earlier run there; nothing is left behind."""
    (staging / MARKER).unlink(missing_ok=True)
    (staging / LOCK_FILE).unlink(missing_ok=True)
    old = out.with_name(f".{out.name}.replaced")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


# --- saving an in-memory model ---------------------------------------------------------------------------------

def saved_dtype(model_spec: str, save_dtype: str, trust_remote_code: bool = False) -> torch.dtype:
    """The dtype a run is saved in: ``"original"`` is the dtype the model's own config declares (float32 for a
    GGUF file, whose weights are dequantised, or a config that declares none)."""
    if save_dtype != "original":
        return getattr(torch, save_dtype)
    from ..models.loading import declared_dtype, load_config, resolve

    if resolve(model_spec).kind in ("alias", "gguf"):
        return torch.float32
    return declared_dtype(load_config(model_spec, trust_remote_code))


def achieved_sparsity(layers: list[dict[str, Any]]) -> float:
    """Fraction of zeros over all pruned matrices, from their per-layer records."""
    params = sum(r["shape"][0] * r["shape"][1] for r in layers)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers)
    return zeros / params if params else 0.0


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
        w = weight_named(params, rec["name"])
        achieved = 1 - torch.count_nonzero(w).item() / w.numel()
        new_zeros += round((achieved - rec["sparsity"]) * w.numel())
        rec["sparsity"] = achieved
    manifest["achieved_sparsity"] = achieved_sparsity(manifest["layers"])
    manifest["save_cast"] = {"from": str(before).removeprefix("torch."), "to": str(dtype).removeprefix("torch."),
                             "new_zeros": new_zeros,
                             "note": "perplexity and layer errors were measured before the cast"}


@torch.no_grad()
def reload_check(model: nn.Module, saved: Path, layers: list[dict], trust_remote_code: bool = False) -> dict[str, Any]:
    """Reload the saved model with plain transformers (and its own code, when the run trusted it); compare
    sparsity and logits with the one in memory."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype=next(model.parameters()).dtype,
                                                    trust_remote_code=trust_remote_code)
    reloaded.eval()
    params = dict(reloaded.named_parameters())
    mismatched = []
    for rec in layers:
        w = weight_named(params, rec["name"])
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


def save_model(model: nn.Module, tokenizer: Any, staging: Path, manifest: dict[str, Any],
               trust_remote_code: bool = False) -> None:
    """Write the model and tokenizer into ``staging`` and record the reload check in ``manifest``."""
    with disk_space(staging, 2 * tensor_bytes(model), "the pruned model"):
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    manifest["reload_check"] = reload_check(model, staging, manifest["layers"], trust_remote_code)


def write_report(staging: Path, manifest: dict[str, Any], name: str, plots: bool = True) -> None:
    """``lmprune.json``, ``report.md``, ``allocation.json`` and the plots, into ``staging``; ``name`` is the run's
    (what the plots' titles say, not the staging folder's)."""
    from ..allocation.base import Allocation
    from ..report.markdown import render_report

    write_json(staging / MANIFEST, manifest)
    plot_files = {}
    if plots:
        from ..report.plots import plot_run

        png = plot_run(staging, title=name)
        if png is not None:
            plot_files["per-block sparsity and reconstruction error"] = Path(png).name
    if "allocation_detail" in manifest:
        allocation = Allocation.from_dict(manifest["allocation_detail"])
        allocation.to_json(staging / "allocation.json")
        if plots:
            from ..allocation.plot import plot_allocation

            plot_allocation(allocation, staging / "allocation.png")
            what = "metric and target sparsity" if allocation.metric_name else "target sparsity"
            plot_files[f"allocation: {what} per block"] = "allocation.png"
    (staging / REPORT).write_text(render_report(manifest, plot_files))
