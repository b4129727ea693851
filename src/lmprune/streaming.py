"""Pruning a model larger than memory: blocks are read from the safetensors shards one at a time.

The model is built with every decoder block on PyTorch's ``meta`` device (shapes, no storage); embeddings,
final norm and head are real. Before the engine touches block ``i`` its weights are read from the shards;
when block ``i`` is finished (pruned and propagated) it is written as its own output shard and returned to
``meta``. Peak memory is one block, the calibration activations and the non-block weights, whatever the depth.

An interrupted run resumes like an in-memory one (:mod:`lmprune.checkpoint`): the blocks finished before the
interruption are already output shards in the staging directory, so the checkpoint holds only the next block's
inputs and the records; a shard is written before the checkpoint names its block.

Limits of this mode: HF safetensors directories only (no GGUF, no pickles); uniform or ``FILE.json``
allocation (OWL and alpha read every weight up front); no perplexity or zero-shot evaluation in the same run
(evaluate the output directory afterwards on a machine that holds it); the reload check compares each written
tensor with the one in memory rather than reloading the whole model.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import ConfigError, PruneConfig
from .models.adapters import get_adapter
from .models.loading import (ModelLoadError, _dir_fingerprint, _dtype_arg, declared_dtype, ensure_pad_token,
                             resolve)
from .report.manifest import MANIFEST, REPORT, now_iso, peak_rss_mb, versions, write_json

INDEX = "model.safetensors.index.json"


class ShardReader:
    """Tensor name → its safetensors file, read one tensor at a time."""

    def __init__(self, path: Path):
        index = path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / "model.safetensors").is_file():
            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ModelLoadError(f"streaming needs safetensors weights in {path}")
        self.path = path
        self.weight_map = weight_map

    def get(self, name: str) -> torch.Tensor:
        with safe_open(str(self.path / self.weight_map[name]), framework="pt") as f:
            return f.get_tensor(name)

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.weight_map if n.startswith(prefix)]


def load_streaming(spec: str, dtype: str = "float32", trust_remote_code: bool = False):
    """``(model, tokenizer, source, reader)`` with real non-block weights and every block on ``meta``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = resolve(spec)
    if source.kind != "dir":
        raise ConfigError("--stream needs a local HF directory with safetensors weights")
    path = Path(source.path)
    source.sha256 = _dir_fingerprint(path)
    reader = ShardReader(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    want = _dtype_arg(dtype, False)
    if want == "auto":
        want = declared_dtype(config)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config, dtype=want, trust_remote_code=trust_remote_code)
    adapter = get_adapter(full)
    shallow = copy.deepcopy(config)
    shallow.num_hidden_layers = 0
    if hasattr(shallow, "layer_types") and shallow.layer_types is not None:
        shallow.layer_types = []
    model = AutoModelForCausalLM.from_config(shallow, dtype=want, trust_remote_code=trust_remote_code)
    parent, _, leaf = adapter.blocks_path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, adapter.blocks(full))
    for module in model.modules():
        if getattr(module, "config", None) is shallow:
            module.config = config
    prefix = adapter.blocks_path + "."
    state = {n: reader.get(n) for n in reader.names() if not n.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.startswith(prefix) and not _tied(model, m)]
    if missing or unexpected:
        raise ModelLoadError(f"streaming {spec}: weights missing {missing[:3]} or unexpected {unexpected[:3]}")
    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    note = ensure_pad_token(tokenizer, spec)
    if note:
        source.details["pad_token"] = note
    return model, tokenizer, source, reader


def _tied(model: nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


class BlockStream:
    """Loads block ``i`` before the engine uses it; writes it as a shard and frees it when it is done."""

    def __init__(self, model: nn.Module, reader: ShardReader, staging: Path):
        self.model = model
        self.adapter = get_adapter(model)
        self.reader = reader
        self.staging = staging
        self.blocks = self.adapter.blocks(model)
        self.n = len(self.blocks)
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.checked = 0

    def _shard(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.n + 1:05d}.safetensors"

    def _prefix(self, i: int) -> str:
        return f"{self.adapter.blocks_path}.{i}."

    @torch.no_grad()
    def load(self, i: int) -> None:
        block = self.blocks[i]
        dtype = next(self.model.parameters()).dtype
        block.to_empty(device="cpu")
        prefix = self._prefix(i)
        block.load_state_dict({k: self.reader.get(prefix + k).to(dtype) for k in block.state_dict()})
        for name, p in block.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise ModelLoadError(f"model weight {prefix}{name} contains NaN or Inf")

    @torch.no_grad()
    def done(self, i: int, inputs_next, records) -> None:
        block = self.blocks[i]
        tensors = {self._prefix(i) + k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        self._write(tensors, self._shard(i))
        block.to("meta")

    def adopt(self, finished: int) -> None:
        """Take blocks ``0..finished`` as already written (their shards are in the staging directory)."""
        for i in range(finished + 1):
            path = self.staging / self._shard(i)
            if not path.is_file():
                raise ConfigError(f"interrupted run at {self.staging} lacks the shard of finished block {i}; "
                                  "re-run with --no-resume")
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():
                    self.weight_map[k] = path.name
                    t = f.get_slice(k)
                    self.total += _nbytes(t.get_shape(), t.get_dtype())
                    self.checked += 1

    def _write(self, tensors: dict[str, torch.Tensor], shard: str) -> None:
        self.staging.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.staging / shard), metadata={"format": "pt"})
        back = load_file(str(self.staging / shard))
        for k, v in tensors.items():
            if not torch.equal(back[k], v):
                raise RuntimeError(f"written tensor {k} does not read back identically")
            self.weight_map[k] = shard
            self.total += v.numel() * v.element_size()
        self.checked += len(tensors)

    def finish(self) -> None:
        prefix = self.adapter.blocks_path + "."
        rest = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
                if not k.startswith(prefix) and not _tied(self.model, k) and k in self.reader.weight_map}
        self._write(rest, self._shard(self.n))
        write_json(self.staging / INDEX, {"metadata": {"total_size": self.total}, "weight_map": self.weight_map})


def _nbytes(shape: list[int], dtype: str) -> int:
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
    n = 1
    for d in shape:
        n *= d
    return n * size[dtype]


def run_streaming(
    model_spec: str, config: PruneConfig, out: str | Path, overwrite: bool = False, progress: bool = True,
    dtype: str = "float32", trust_remote_code: bool = False, invocation: dict[str, Any] | None = None,
    resume: bool | None = None,
) -> dict[str, Any]:
    """``lmprune prune --stream``: like :func:`lmprune.api.run` without evaluation, one block in memory.

    ``resume`` as in :func:`lmprune.api.run`: an interrupted streamed run of the same configuration continues
    from its last finished block."""
    from . import api
    from .checkpoint import open_checkpoint
    from .report.markdown import render_report

    if config.allocation in ("owl", "alpha"):
        raise ConfigError("--stream supports --allocation uniform or FILE.json only (OWL and alpha read every "
                          "weight first; compute one with lmprune allocate and pass its JSON)")
    out = Path(out)
    api.check_out_dir(out, model_spec, config, overwrite)
    key = api._config_key({"model": {"spec": model_spec}, "config": config.model_dump()})
    checkpoint = open_checkpoint(out, {**key, "dtype": dtype, "stream": True}, overwrite, resume, store_blocks=False)
    staging = checkpoint.staging
    if checkpoint.done_block() < 0:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a run killed before its first block
    model, tokenizer, source, reader = load_streaming(model_spec, dtype, trust_remote_code)
    checkpoint.fingerprint["model_sha256"] = source.sha256  # checked against the checkpoint's by api.prune
    stream = BlockStream(model, reader, staging)
    stream.adopt(checkpoint.done_block())
    manifest: dict[str, Any] = {"lmprune_version": __version__, "created": now_iso()}
    if invocation:
        manifest["invocation"] = invocation
    manifest["run_options"] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "stream": True,
                               "resume": resume}
    manifest.update(api.prune(model, tokenizer, config, progress, on_block_done=stream.done,
                              before_block=stream.load, checkpoint=checkpoint))
    stream.finish()
    checkpoint.discard()
    manifest["model"] = {
        "spec": model_spec, "kind": source.kind, "path": source.path, "sha256": source.sha256,
        "model_type": model.config.model_type, "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **source.details,
    }
    manifest["reload_check"] = {"ok": True, "mode": "each written tensor read back and compared",
                                "tensors": stream.checked}
    manifest["peak_rss_mb"] = peak_rss_mb()
    manifest["peak_cuda_mb"] = None
    manifest["versions"] = versions()
    model.config.save_pretrained(staging)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    write_json(staging / MANIFEST, manifest)
    (staging / REPORT).write_text(render_report(manifest, {}))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return manifest
