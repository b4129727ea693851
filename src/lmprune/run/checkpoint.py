"""Per-block checkpoints, so an interrupted run continues where it stopped.

A run writes everything into the staging directory ``.OUT.partial`` beside ``OUT`` and renames it to ``OUT``
only when the model, the manifest and the report are all written (:mod:`lmprune.run.rundir`). While it
prunes, ``.OUT.partial/checkpoint/`` holds, after every finished block ``k``:

* ``block_KKKK.safetensors``: the pruned block's state dict (blocks left dense are not stored);
* ``inputs_KKKK/window_NNNNN.safetensors``: the inputs of block ``k + 1`` (the pruned block's outputs), one file
  per calibration window, written from the activation store window by window and read back the same way, so
  neither side ever holds more than one window beyond the store itself;
* ``state.json``: the configuration fingerprint, the last finished block, the per-layer records, block times,
  the run's cumulative wall and calibration time and the allocation, written last and atomically, so it only
  ever names files that are complete.

Tensors go through safetensors only; nothing is ever unpickled. The block keyword arguments (attention mask,
rotary embeddings) are not stored: the pipeline recaptures them from one calibration window, which runs the
embedding only and is deterministic. A resumed run is therefore bit-identical to an uninterrupted one.

The checkpoint is a :class:`~lmprune.engine.BlockEvents`: the engine tells it of every finished block.

``.OUT.partial/INCOMPLETE`` says in words that the directory is an interrupted run.

For tests, ``LMPRUNE_TEST_HOLD_AFTER_BLOCK=k`` makes the process sleep after checkpointing block ``k``, so a
test can kill it with SIGKILL at a known point.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..activations import ActivationStore
from ..config import ConfigError
from ..distributed import SINGLE, World
from ..engine import BlockDone, BlockEvents, LayerRecord
from ..models.adapters import FamilyAdapter
from ..report.manifest import write_json
from .rundir import LOCK_FILE, MARKER, clear, disk_space, staging_dir, tensor_bytes

CHECKPOINT = "checkpoint"
STATE = "state.json"
FORMAT = 2
HOLD_ENV = "LMPRUNE_TEST_HOLD_AFTER_BLOCK"


class ResumeMismatch(ConfigError):
    """The staging directory holds an interrupted run of a different configuration."""


def _save(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def open_checkpoint(
    out: str | Path, fingerprint: dict[str, Any], overwrite: bool, resume: bool | None, store_blocks: bool = True,
    world: World = SINGLE,
) -> "Checkpoint":
    """The checkpoint of a run into ``out``, after applying the resume choice: ``overwrite`` or ``resume=False``
    discards an interrupted run, ``resume=True`` requires one, ``None`` resumes one when there is one. An
    interrupted run of a different configuration is refused, naming the difference."""
    checkpoint = Checkpoint(staging_dir(out), fingerprint, store_blocks, world)
    if not world.is_main:  # rank 0 applies the resume choice and hands its state over (Checkpoint.follow)
        return checkpoint
    if overwrite or resume is False:
        clear(checkpoint.staging, keep=(LOCK_FILE,))
    elif resume and checkpoint.done_block() < 0:
        raise ConfigError(f"--resume: no interrupted run to resume at {checkpoint.staging}")
    checkpoint.verify(keys=list(checkpoint.fingerprint))
    return checkpoint


class Checkpoint:
    """The checkpoint of one run: ``fingerprint`` is what must match for a resume (config, model, data).

    ``store_blocks=False`` is for runs that write every finished block elsewhere themselves (streaming writes
    it as an output shard): the checkpoint then holds only the next block's inputs and the records.
    """

    def __init__(self, staging: str | Path, fingerprint: dict[str, Any], store_blocks: bool = True,
                 world: World = SINGLE):
        self.staging = Path(staging)
        #: Every rank checkpoints its own share of the windows; rank 0 alone the blocks and ``state.json``.
        self.world = world
        self.store_blocks = store_blocks
        self.dir = self.staging / CHECKPOINT
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))
        self._state: dict[str, Any] | None = None
        #: a rank other than 0: rank 0's state.json as it read it (see :meth:`follow`)
        self._leader: str = "null"

    # reading ---------------------------------------------------------------------------------------------
    def follow(self, state: dict[str, Any] | None) -> None:
        """A rank other than 0 takes rank 0's checkpoint state as its own: its node may not share rank 0's file
        system, so ``state.json`` is read by rank 0 alone; each rank reads only its own windows."""
        self._leader = json.dumps(state)

    def state(self) -> dict[str, Any] | None:
        if not self.world.is_main:
            return json.loads(self._leader)
        path = self.dir / STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            raise ConfigError(f"checkpoint {path} is unreadable; re-run with --no-resume to start over") from None
        if state.get("format") != FORMAT:
            raise ConfigError(f"checkpoint {path} has format {state.get('format')}, expected {FORMAT}; "
                              "re-run with --no-resume")
        return state

    def differences(self, extra: dict[str, Any] | None = None, keys: list[str] | None = None) -> list[str]:
        """Fingerprint keys whose stored value differs from this run's (only ``keys`` when given)."""
        state = self.state()
        if state is None:
            return []
        mine = {**self.fingerprint, **json.loads(json.dumps(extra or {}, default=str))}
        theirs = state["fingerprint"]
        names = keys if keys is not None else sorted(set(mine) | set(theirs))
        return [k for k in names if mine.get(k) != theirs.get(k)]

    def verify(self, extra: dict[str, Any] | None = None, keys: list[str] | None = None) -> None:
        diff = self.differences(extra, keys)
        if diff:
            raise ResumeMismatch(
                f"{self.staging} holds an interrupted run with a different configuration (differs in: "
                f"{', '.join(diff)}); repeat the original command to resume it, or pass --no-resume to discard it"
            )

    def done_block(self) -> int:
        """Index of the last finished block, -1 when there is nothing to resume."""
        state = self.state()
        return -1 if state is None else int(state["done_block"])

    @torch.no_grad()
    def restore(self, model: nn.Module, adapter: FamilyAdapter, store: ActivationStore) -> int:
        """Load the finished blocks into ``model`` (rank 0, unless they are stored elsewhere) and the next block's
        inputs into ``store``, window by window; returns the index of the next block."""
        state = self.state()
        assert state is not None, "nothing to restore"
        self._state = state
        blocks = adapter.blocks(model)
        # rank 0 alone writes the model: the others need only the next block's inputs (and rank 0 alone saved)
        for i in state["saved_blocks"] if self.store_blocks and self.world.is_main else []:
            tensors = load_file(str(self.dir / f"block_{i:04d}.safetensors"))
            block = blocks[i]
            ref = block.state_dict()
            if set(tensors) != set(ref):
                raise ConfigError(f"checkpoint block {i} does not fit the model; re-run with --no-resume")
            block.load_state_dict({k: v.to(ref[k].dtype) for k, v in tensors.items()})
        done = int(state["done_block"])
        if done + 1 == len(blocks):  # every block was finished: no inputs are needed (a follower drops its own)
            return done + 1
        folder = self.dir / self._inputs(done)
        if not folder.is_dir():
            raise ConfigError(
                f"rank {self.world.rank}: its checkpointed inputs {folder} are missing; a distributed run resumes "
                "where every rank finds its own checkpoint (the same --out, each node with its earlier --node-rank), "
                "or pass --no-resume to start over")
        windows = state["windows"]
        for k in range(int(windows[self.world.rank] if isinstance(windows, list) else windows)):
            store.append(load_file(str(folder / _window_name(k)))["window"])
        return done + 1

    def records(self) -> list[LayerRecord]:
        """The per-layer records of the blocks finished before the interruption."""
        state = self._state or self.state()
        return [] if state is None else [LayerRecord(**r) for r in state["records"]]

    def block_times(self) -> list[float]:
        state = self._state or self.state()
        return [] if state is None else list(state["block_times"])

    def io(self) -> dict[str, Any] | None:
        """What checkpointing cost this run (this rank's writes; a resumed run's earlier blocks included): bytes
        and seconds in all and per block; None for a run that was not checkpointed."""
        state = self._state or self.state()
        blocks = (state or {}).get("io")
        if not blocks:
            return None
        return {"bytes": sum(b["bytes"] for b in blocks), "seconds": sum(b["seconds"] for b in blocks),
                "per_block": blocks}

    def allocation(self) -> dict[str, Any]:
        state = self._state or self.state()
        assert state is not None, "nothing to restore"
        return state["allocation"]

    def prior_timings(self) -> dict[str, float]:
        """Wall and calibration seconds the interrupted process(es) had spent up to the last checkpoint, so a
        resumed run reports its whole cost; zeros when there is nothing to resume. Checkpoints written before
        these were recorded give the sum of their block times as the wall time and no calibration time."""
        state = self._state or self.state()
        if state is None:
            return {"elapsed_s": 0.0, "calibration_time_s": 0.0}
        return state.get("timings") or {"elapsed_s": sum(state["block_times"]), "calibration_time_s": 0.0}

    # writing ---------------------------------------------------------------------------------------------
    def events(
        self, model: nn.Module, adapter: FamilyAdapter, allocation: dict[str, Any], extra: dict[str, Any],
        clock: "RunClock",
    ) -> "CheckpointEvents":
        """The engine events that checkpoint every finished block (``clock``: the run's cumulative times)."""
        if self._state is None:
            self._state = {
                "format": FORMAT,
                "fingerprint": {**self.fingerprint, **json.loads(json.dumps(extra, default=str))},
                "done_block": -1,
                "saved_blocks": [],
                "records": [],
                "block_times": [],
                "windows": 0,
                "allocation": allocation,
            }
        return CheckpointEvents(self, model, adapter, clock)

    def _inputs(self, block: int) -> str:
        name = _inputs_name(block)
        return name if self.world.size == 1 else f"{name}_rank{self.world.rank}"

    def _start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.staging / MARKER).is_file():
            (self.staging / MARKER).write_text(
                "This directory is an interrupted lmprune run, not a finished one. Run the same command again to "
                "resume from the last finished block (see checkpoint/state.json), or pass --no-resume to "
                "start over.\n"
            )

    def drop_own(self) -> None:
        """A rank other than 0, its blocks done: remove its checkpointed inputs, and the checkpoint and staging
        folders if that leaves them empty. Rank 0 discards the rest at the run's end; where the ranks do not share
        a file system, nobody else would remove these."""
        own = f"_rank{self.world.rank}"
        for folder in self.dir.glob("inputs_*"):
            if folder.name.removesuffix(".tmp").endswith(own):
                shutil.rmtree(folder, ignore_errors=True)
        for folder in (self.dir, self.staging):
            try:
                folder.rmdir()
            except OSError:  # not empty (rank 0's files on a shared file system), or gone
                pass

    def discard(self) -> None:
        """Forget the checkpoint (at the end of a run, or for --no-resume/--overwrite)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        (self.staging / MARKER).unlink(missing_ok=True)
        self._state = None


class RunClock(BlockEvents):
    """The run's cumulative wall and calibration seconds, including those of interrupted processes before it;
    as engine events it adds every block's calibration passes."""

    def __init__(self, prior: dict[str, float], started: float, calibration_s: float = 0.0):
        self.started = started  # this process's time.perf_counter() when the run began
        self.prior = prior
        self.calibration_s = calibration_s  # this process's, so far

    def block_done(self, done: BlockDone) -> None:
        self.calibration_s += done.pass_time_s

    def totals(self) -> dict[str, float]:
        return {"elapsed_s": self.prior["elapsed_s"] + time.perf_counter() - self.started,
                "calibration_time_s": self.prior["calibration_time_s"] + self.calibration_s}


def _inputs_name(block: int) -> str:
    return f"inputs_{block:04d}"


def _window_name(k: int) -> str:
    return f"window_{k:05d}.safetensors"


def _save_windows(store: ActivationStore, folder: Path) -> int:
    """Write every window of ``store`` as its own file under ``folder`` (complete before it has its name)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n = 0
    for k, window in enumerate(store):
        save_file({"window": window.detach().cpu().contiguous()}, str(tmp / _window_name(k)))
        n += 1
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return n


class CheckpointEvents(BlockEvents):
    """Saves, after every block: the pruned block (unless stored elsewhere), the store, then ``state.json`` with
    the ``clock``'s totals (chain the clock before these events)."""

    def __init__(self, checkpoint: Checkpoint, model: nn.Module, adapter: FamilyAdapter, clock: RunClock):
        self.checkpoint = checkpoint
        self.model = model
        self.adapter = adapter
        self.clock = clock
        self._last = time.perf_counter()

    def block_done(self, done: BlockDone) -> None:
        ck, state, world = self.checkpoint, self.checkpoint._state, self.checkpoint.world
        i = done.index
        block = self.adapter.blocks(self.model)[i]
        window = next(iter(done.store), None)
        store_block = done.records and ck.store_blocks and world.is_main
        needed = (window.numel() * window.element_size() * len(done.store) if window is not None else 0) + \
            (tensor_bytes(block) if store_block else 0)
        if world.is_main:
            ck._start()
        else:
            ck.dir.mkdir(parents=True, exist_ok=True)
        writing = time.perf_counter()
        with disk_space(ck.dir, needed, f"the checkpoint of block {i}"):
            if store_block:
                _save(block.state_dict(), ck.dir / f"block_{i:04d}.safetensors")
                state["saved_blocks"].append(i)
            windows = _save_windows(done.store, ck.dir / ck._inputs(i))
        state.setdefault("io", []).append({"block": i, "bytes": needed,
                                           "seconds": time.perf_counter() - writing})
        # every rank's windows are complete before state.json names the block (the gather waits for them)
        state["windows"] = windows if world.size == 1 else world.all_gather_object(windows)
        previous = state["done_block"]
        state["done_block"] = i
        state["records"].extend(asdict(r) for r in done.records)
        now = time.perf_counter()
        state["block_times"].append(now - self._last)
        self._last = now
        state["timings"] = self.clock.totals()
        if world.is_main:
            write_json(ck.dir / STATE, state)
        world.barrier()  # no rank drops its previous inputs before state.json names the new ones
        if previous >= 0:
            shutil.rmtree(ck.dir / ck._inputs(previous), ignore_errors=True)
        if os.environ.get(HOLD_ENV) == str(i):
            print(f"lmprune: test hold after block {i}", file=sys.stderr, flush=True)
            time.sleep(3600)
