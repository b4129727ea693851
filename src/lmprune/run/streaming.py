"""A model larger than memory as a run's source: blocks are read from the safetensors shards one at a time.

The model is built with every decoder block on PyTorch's ``meta`` device (shapes, no storage); embeddings,
final norm and head are real. Engine events load block ``i``'s weights before the engine touches it; after a
pruning pass they write it as its own output shard, after any other pass (OWL's statistics, an evaluation)
they drop it, and either way the block returns to ``meta``. The input embeddings and the head are not read while
the blocks are pruned (block 0's inputs are captured before): they go to ``meta`` for the pruning pass and are
read back from the source shards before any later pass or the final write, unchanged. Peak memory is one block,
the activations and the norms, whatever the depth. AlphaPruning reads one matrix at a time from the shards.

An interrupted run resumes like an in-memory one (:mod:`lmprune.run.checkpoint`): the blocks finished before the
interruption are already output shards in the staging directory, so the checkpoint holds only the next block's
inputs and the records; a shard is written before the checkpoint names its block.

Limits of this mode: HF safetensors directories only (no GGUF, no pickles); the reload check compares each
written tensor with the one in memory rather than reloading the whole model.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import ConfigError
from ..engine import BlockDone, BlockEvents
from ..models.adapters import FamilyAdapter, get_adapter
from ..models.declared import use_adapter_file
from ..models.discovery import declare, embeddings_and_head, find_blocks_path, remembered, structure_of
from ..models.loading import ModelLoadError, _dir_fingerprint, _dtype_arg, declared_dtype, ensure_pad_token, resolve
from ..report.manifest import write_json
from .rundir import disk_space
from .sources import LoadedModel

INDEX = "model.safetensors.index.json"


class ShardReader:
    """Tensor name → its safetensors file, read one tensor at a time."""

    def __init__(self, path: Path, weight_map: dict[str, str] | None = None):
        index = path / INDEX
        if weight_map is not None:
            pass
        elif index.is_file():
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


def open_streamed(spec: str, staging: Path, dtype: str = "float32", trust_remote_code: bool = False,
                  adapter: Path | None = None) -> "StreamedModel":
    """The model of ``spec`` with real non-block weights and every block on ``meta``; finished blocks are written
    as shards into ``staging``."""
    from accelerate import init_empty_weights
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
    use_adapter_file(full, adapter)
    blocks_path = structure_of(full).blocks_path if adapter else find_blocks_path(full)
    shallow = copy.deepcopy(config)
    shallow.num_hidden_layers = 0
    if hasattr(shallow, "layer_types") and shallow.layer_types is not None:
        shallow.layer_types = []
    # parameters on meta (buffers such as rotary frequencies built as usual), then each source tensor assigned in
    # place of its parameter: the non-block weights are held once, not once randomly initialised and once read
    # (an 8B shape's embeddings and head are 2 GB; loading them peaked 4.9 GB above the process's start)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(shallow, dtype=want, trust_remote_code=trust_remote_code)
    parent, _, leaf = blocks_path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, full.get_submodule(blocks_path))
    for module in model.modules():
        if getattr(module, "config", None) is shallow:
            module.config = config
    prefix = blocks_path + "."
    state = {n: reader.get(n).to(want) for n in reader.names() if not n.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    del state
    if any(_tied(model, m) for m in missing):
        model.tie_weights()  # the head is the embedding's parameter again, now that it was assigned
    missing = [m for m in missing if not m.startswith(prefix) and not _tied(model, m)]
    if missing or unexpected:
        raise ModelLoadError(f"streaming {spec}: weights missing {missing[:3]} or unexpected {unexpected[:3]}")
    model.eval()
    model.config.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    note = ensure_pad_token(tokenizer, spec)
    if note:
        source.details["pad_token"] = note
    if adapter:
        declare(model, structure_of(full))
    return StreamedModel(model, tokenizer, source, stream=BlockStream(model, reader, staging))


def _tied(model: nn.Module, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


class BlockStream:
    """Block ``i``'s weights in and out of memory: read from the source shards, written as output shards."""

    def __init__(self, model: nn.Module, reader: ShardReader, staging: Path):
        self.model = model
        self.reader = reader
        self.staging = staging
        known = remembered(model)  # declared by an adapter file
        self.blocks_path = known.blocks_path if known else find_blocks_path(model)
        self.blocks = model.get_submodule(self.blocks_path)
        self.dtype = next(model.parameters()).dtype  # the run's: blocks and parked weights are read in it
        self._parked: list[tuple[nn.Module, str, str, bool]] = []  # (module, attribute, tensor name, grad)
        self.load(0)  # the structure is discovered on block 0's real weights (the FFN is checked numerically)
        try:
            self.adapter = get_adapter(model)
        finally:
            self.drop(0)
        self.n = len(self.blocks)
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.checked = 0

    def _shard(self, index: int) -> str:
        return f"model-{index + 1:05d}-of-{self.n + 1:05d}.safetensors"

    def _prefix(self, i: int) -> str:
        return f"{self.blocks_path}.{i}."

    @torch.no_grad()
    def load(self, i: int, reader: "ShardReader | None" = None) -> None:
        """Read block ``i`` from ``reader`` (default: the source shards)."""
        reader = reader or self.reader
        block = self.blocks[i]
        block.to_empty(device="cpu")
        prefix = self._prefix(i)
        missing = [k for k in block.state_dict() if prefix + k not in reader.weight_map]
        if missing:
            raise ModelLoadError(
                f"--stream reads each block's tensors by the model's own names, and the checkpoint has no "
                f"{prefix + missing[0]}: it stores these weights in another layout, which transformers converts "
                "when it loads the whole model (such as per-expert matrices it merges into 3-D parameters); "
                "prune this model without --stream")
        block.load_state_dict({k: reader.get(prefix + k).to(self.dtype) for k in block.state_dict()})
        for name, p in block.named_parameters():
            if p.is_floating_point() and not torch.isfinite(p).all():
                raise ModelLoadError(f"model weight {prefix}{name} contains NaN or Inf")

    def drop(self, i: int) -> None:
        self.blocks[i].to("meta")

    def park_outer(self) -> None:
        """The parameters of the embeddings and head to ``meta`` until :meth:`restore_outer` (their buffers, such
        as an embedding scale, stay)."""
        if self._parked:
            return
        for name, module in embeddings_and_head(self.model).items():
            for key, p in list(module.named_parameters(recurse=False)):
                self._parked.append((module, key, f"{name}.{key}", p.requires_grad))
                setattr(module, key, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))

    @torch.no_grad()
    def restore_outer(self) -> None:
        """The parked parameters read back from the source shards, unchanged; one the source does not store is a
        tied head's, which gets the embedding's parameter back."""
        read: dict[str, nn.Parameter] = {}
        for module, key, full, grad in self._parked:
            if full in self.reader.weight_map:
                read[full] = nn.Parameter(self.reader.get(full).to(self.dtype), requires_grad=grad)
                setattr(module, key, read[full])
        for module, key, full, _ in self._parked:
            if full not in read:
                if not _tied(self.model, full) or len(read) != 1:
                    raise ModelLoadError(f"streaming: {full} could not be read back from the source shards")
                setattr(module, key, next(iter(read.values())))
        self._parked = []

    @torch.no_grad()
    def write(self, i: int) -> None:
        """Write block ``i`` as its output shard and drop it."""
        block = self.blocks[i]
        tensors = {self._prefix(i) + k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
        self._write(tensors, self._shard(i))
        self.drop(i)

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
        with disk_space(self.staging, sum(v.numel() * v.element_size() for v in tensors.values()), shard):
            save_file(tensors, str(self.staging / shard), metadata={"format": "pt"})
        for k, v in tensors.items():
            # one tensor at a time, the file reopened for each: a mapping left open keeps every page read so far
            # resident, and the last shard (embeddings and head) is 2–4 GB at 8B–70B shapes
            with safe_open(str(self.staging / shard), framework="pt") as f:
                back = f.get_tensor(k)
            if not torch.equal(back, v):
                raise RuntimeError(f"written tensor {k} does not read back identically")
            del back
            self.weight_map[k] = shard
            self.total += v.numel() * v.element_size()
        self.checked += len(tensors)

    def finish(self) -> None:
        self.restore_outer()
        prefix = self.adapter.blocks_path + "."
        rest = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
                if not k.startswith(prefix) and not _tied(self.model, k) and k in self.reader.weight_map}
        self._write(rest, self._shard(self.n))
        write_json(self.staging / INDEX, {"metadata": {"total_size": self.total}, "weight_map": self.weight_map})

    def output_reader(self) -> "ShardReader":
        """The shards written so far, read like a source."""
        return ShardReader(self.staging, dict(self.weight_map))


class _ReadEvents(BlockEvents):
    """Each block read before the engine uses it and dropped after (from ``reader``: the source, or the output)."""

    def __init__(self, stream: BlockStream, reader: ShardReader | None = None):
        self.stream, self.reader = stream, reader

    def block_start(self, index: int) -> None:
        self.stream.load(index, self.reader)

    def block_done(self, done: BlockDone) -> None:
        self.stream.drop(done.index)


class _PruneEvents(BlockEvents):
    """Each block read before it is pruned and, once it is done, written as an output shard (``write``: rank 0)
    or dropped (the other ranks); the embeddings and head are parked meanwhile."""

    def __init__(self, stream: BlockStream, write: bool):
        self.stream, self.write = stream, write

    def block_start(self, index: int) -> None:
        self.stream.park_outer()
        self.stream.load(index)

    def block_done(self, done: BlockDone) -> None:
        if self.write:
            self.stream.write(done.index)
        else:
            self.stream.drop(done.index)


class StreamedMatrix:
    """A prunable matrix as an allocator sees it, whose weight is read from the shards when it is asked for."""

    def __init__(self, name: str, block: int, reader: ShardReader, like: torch.Tensor, transposed: bool = False,
                 expert: int | None = None):
        self.name, self.block, self.reader = name, block, reader
        self.shape, self.dtype = tuple(like.shape), like.dtype
        self.transposed = transposed  # stored in x out (Conv1D, some experts)
        self.expert = expert  # a slice of the 3-D parameter named by the name's prefix

    @property
    def weight(self) -> torch.Tensor:
        """``out x in``, in the dtype the run computes in, as an in-memory model would hold it."""
        if self.expert is None:
            w = self.reader.get(self.name + ".weight")
        else:
            w = self.reader.get(self.name.rpartition(".")[0])[self.expert]
        w = w.to(self.dtype)
        return w.T if self.transposed else w

    @property
    def params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class StreamedModel(LoadedModel):
    """A model whose blocks stay on ``meta`` except while the engine works on one."""

    stream: BlockStream | None = None

    streamed = True

    def read_events(self) -> BlockEvents:
        self.stream.restore_outer()
        return _ReadEvents(self.stream)

    def prune_events(self, write: bool = True) -> BlockEvents:
        return _PruneEvents(self.stream, write)

    def output_events(self) -> BlockEvents:
        """Events for a pass over the pruned blocks written so far (evaluation after pruning)."""
        self.stream.restore_outer()
        return _ReadEvents(self.stream, self.stream.output_reader())

    def matrix_infos(self, adapter: FamilyAdapter, blocks: list[int]) -> list[StreamedMatrix]:
        chosen = set(blocks)
        return [StreamedMatrix(n, b, self.stream.reader, lin.weight, getattr(lin, "transposed", False),
                               getattr(lin, "index", None))
                for n, b, lin in adapter.matrices(self.model) if b in chosen]

    def weights_on(self, device):
        raise ConfigError("a streamed model is never whole in memory")


def _nbytes(shape: list[int], dtype: str) -> int:
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
    n = 1
    for d in shape:
        n *= d
    return n * size[dtype]
