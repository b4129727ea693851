"""The run manifest ``lmprune.json`` and the environment facts it records."""

from __future__ import annotations

import json
import platform
import resource
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .runs import MANIFEST

__all__ = ["MANIFEST", "REPORT", "now_iso", "peak_cuda_mb", "peak_rss_mb", "read_manifest", "versions", "write_json"]

REPORT = "report.md"


def versions() -> dict[str, str]:
    """Library versions and torch's CPU thread count: both change the order of floating-point reductions, and at
    high sparsity that order moves the result (see bench/RESULTS.md), so a bit-identical rerun needs both."""
    out = {"python": sys.version.split()[0], "platform": platform.platform(), "torch_threads": str(torch.get_num_threads())}
    for pkg in ("lmprune", "torch", "transformers", "gguf", "safetensors", "datasets", "lm_eval"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of the process's own address space; ``ru_maxrss`` would include the peak of the parent
    it was forked from (it survives fork+exec), which is wrong when a large process launches lmprune.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_cuda_mb() -> float | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write then rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "model_dump"):
        return obj.model_dump()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """The manifest of a run directory; a one-line error naming the file when it is missing, unreadable or not a
    JSON object."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished lmprune run (no {MANIFEST})")
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a valid manifest: not UTF-8 text ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not a valid manifest (truncated or corrupt JSON: {e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a valid manifest: a JSON {type(data).__name__}, not an object")
    return data
