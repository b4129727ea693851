"""Ranks, sharding of calibration windows, collectives and owner assignment, on ``torch.distributed``.

A run under ``torchrun`` (or ``lmprune prune --nproc N``, which launches it) is data parallel:

* every rank samples the same calibration windows and keeps its contiguous share (:meth:`World.shard`);
* every rank holds the current block, propagates its share of the activations through it, and contributes its
  partial sums (Gram matrices ``Σxxᵀ``, ``Σx``, token counts, ``Σx²`` norms) through :meth:`World.all_reduce_`,
  or through :meth:`World.reduce_` to the one rank that solves every matrix reading a Gram matrix;
* each matrix (or SparseLLM feed-forward problem) is solved by one owner rank, assigned by estimated cost so the
  ranks finish together (:func:`assign_owners`); the result is broadcast (:meth:`World.spread`), so every rank
  writes the same weights and records the same layer records;
* rank 0 alone writes the run directory (:attr:`World.is_main`).

A single process is a :class:`World` of size one: every collective is the identity and every matrix is owned by
rank 0, so single-process runs take the same code path and give bit-identical results.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Hashable, Iterator, Sequence, TypeVar

import torch
from torch import Tensor

from .activations import TokenRows, row_slices

K = TypeVar("K", bound=Hashable)
R = TypeVar("R")

#: Seconds a rank waits in a collective for the others (dense evaluation on rank 0 runs before the first one).
TIMEOUT_ENV = "LMPRUNE_DIST_TIMEOUT"


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous share of ``n`` items: shares differ by at most one item, the
    first ``n % size`` ranks take the larger ones, and the shares cover every item exactly once, in order."""
    base, extra = divmod(n, size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def assign_owners(costs: Sequence[float], size: int) -> list[int]:
    """Owner rank of each item: longest processing time first, each to the least loaded rank (lowest rank on a
    tie); deterministic, so every rank computes the same assignment."""
    load = [0.0] * size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += float(costs[i])
    return owners


@dataclass(frozen=True)
class World:
    """One process: rank 0 of 1. Every collective is the identity."""

    rank: int = 0
    size: int = 1
    #: The device collectives run on (NCCL needs the rank's GPU; gloo the CPU).
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str | None:
        return None

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` calibration windows."""
        return slice(*shard_bounds(n, self.size, self.rank))

    def owners(self, costs: Sequence[float]) -> list[int]:
        """The owner rank of each of the items with these ``costs`` (:func:`assign_owners`), as :meth:`spread`
        assigns them."""
        return assign_owners(costs, self.size)

    # collectives (identity here) -----------------------------------------------------------------------------
    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over the ranks, in place."""

    def reduce_(self, tensors: Sequence[Tensor], dst: int) -> None:
        """Sum each tensor over the ranks into rank ``dst``'s copy, in place (the others' are left partial)."""

    def gather_token_rows(self, local: TokenRows, directory: str | None = None,
                          rows_per_message: int = 4096) -> TokenRows:
        """The ranks' token rows concatenated in rank order (the single-process order), in memory or (with
        ``directory``) in a file there, sent ``rows_per_message`` rows at a time; ``local`` is closed. In one
        process that is ``local`` itself."""
        return local

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        pass

    def spread(self, keys: Sequence[K], costs: Sequence[float], solve: Callable[[K], R],
               share: Callable[[R | None, int], R] | None = None) -> Iterator[tuple[K, R]]:
        """``(key, solve(key))`` for every key, in order: each key is solved by one owner rank (by ``costs``) and
        its result shared with every rank by ``share(result_or_None, owner)`` (default :meth:`share_result`).

        In one process each key is solved just before it is yielded, so nothing is held longer than today."""
        for k in keys:
            yield k, solve(k)

    def share_result(self, result: Any, src: int) -> Any:
        return result

    def close(self) -> None:
        pass


class TorchWorld(World):
    """A rank of a ``torch.distributed`` process group (gloo on the CPU, NCCL on CUDA)."""

    @property
    def backend(self) -> str | None:
        import torch.distributed as dist

        return dist.get_backend()

    def _dev(self, t: Tensor) -> Tensor:
        return t if t.device == self.device else t.to(self.device)

    def all_reduce_(self, tensors: Sequence[Tensor]) -> None:
        import torch.distributed as dist

        for t in tensors:
            moved = self._dev(t)
            dist.all_reduce(moved)
            if moved is not t:
                t.copy_(moved)

    def reduce_(self, tensors: Sequence[Tensor], dst: int) -> None:
        import torch.distributed as dist

        for t in tensors:
            moved = self._dev(t)
            dist.reduce(moved, dst)
            if moved is not t and self.rank == dst:
                t.copy_(moved)

    def gather_token_rows(self, local, directory=None, rows_per_message=4096):
        try:
            counts = self.all_gather_object(local.shape[0])
            out = TokenRows(sum(counts), local.shape[1], local.device, directory)
            try:
                start = 0
                for src, count in enumerate(counts):
                    for sl in row_slices(count, rows_per_message):
                        part = self.share_result(local.read(sl) if self.rank == src else None, src)
                        out.write(slice(start + sl.start, start + sl.stop), part)
                    start += count
            except BaseException:
                out.close()
                raise
        finally:
            local.close()
        return out

    def all_gather_object(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def spread(self, keys, costs, solve, share=None):
        share = share or self.share_result
        owners = self.owners(costs)
        mine = {i: solve(k) for i, (k, o) in enumerate(zip(keys, owners)) if o == self.rank}
        for i, k in enumerate(keys):
            yield k, share(mine.pop(i, None), owners[i])

    def share_result(self, result: Any, src: int) -> Any:
        """``result`` (held by rank ``src``) on every rank: its tensors broadcast as tensors, the rest pickled.

        Works for a tensor, a :class:`~lmprune.solvers.base.SolveResult`, or dicts/lists/tuples of them."""
        import torch.distributed as dist

        tensors: list[Tensor] = []
        skeleton = _strip(result, tensors) if self.rank == src else None
        meta = [(tuple(t.shape), t.dtype, str(t.device)) for t in tensors] if self.rank == src else None
        skeleton, meta = self.broadcast_object((skeleton, meta), src)
        got = []
        for i, (shape, dtype, device) in enumerate(meta):
            wire_dtype = torch.uint8 if dtype == torch.bool else dtype
            if self.rank == src:
                buf = self._dev(tensors[i].to(wire_dtype).contiguous())
            else:
                buf = torch.empty(shape, dtype=wire_dtype, device=self.device)
            dist.broadcast(buf, src=src)
            local = tensors[i].device if self.rank == src else _local_device(device, self.device)
            got.append(buf.to(dtype).to(local))
        return _fill(skeleton, got)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _local_device(device: str, comm: torch.device) -> torch.device:
    return comm if device.startswith("cuda") else torch.device(device)


class _Slot:
    def __init__(self, i: int):
        self.i = i


def _strip(obj: Any, out: list[Tensor]) -> Any:
    """``obj`` with every tensor replaced by a slot numbered in ``out``."""
    from .solvers.base import SolveResult

    if isinstance(obj, Tensor):
        out.append(obj.detach())
        return _Slot(len(out) - 1)
    if isinstance(obj, SolveResult):
        return SolveResult(_strip(obj.weight, out), _strip(obj.mask, out), obj.stats, obj.pattern)
    if isinstance(obj, dict):
        return {k: _strip(v, out) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_strip(v, out) for v in obj)
    return obj


def _fill(obj: Any, tensors: list[Tensor]) -> Any:
    from .solvers.base import SolveResult

    if isinstance(obj, _Slot):
        return tensors[obj.i]
    if isinstance(obj, SolveResult):
        return SolveResult(_fill(obj.weight, tensors), _fill(obj.mask, tensors), obj.stats, obj.pattern)
    if isinstance(obj, dict):
        return {k: _fill(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fill(v, tensors) for v in obj)
    return obj


SINGLE = World()
_current: World = SINGLE


def launched() -> bool:
    """Is this process a worker started by torchrun (``WORLD_SIZE`` set)?"""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: str = "cpu") -> World:
    """The process's world: a :class:`TorchWorld` under torchrun (the process group initialised once, NCCL for
    a CUDA ``device``, gloo otherwise), else :data:`SINGLE`."""
    global _current
    if _current is not SINGLE or not launched():
        return _current
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = str(device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        comm = torch.device("cuda", local)
    else:
        comm = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo",
                                timeout=timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "7200"))))
    _current = TorchWorld(rank, size, comm) if size > 1 else World(rank, 1, comm)
    return _current


def current() -> World:
    """The world :func:`init` set up (:data:`SINGLE` in a plain process)."""
    return _current


def shutdown() -> None:
    global _current
    _current.close()
    _current = SINGLE
