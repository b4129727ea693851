"""The calibration activations of a run: one :class:`ActivationStore`, on the device, on the host or in files.

The engine holds two sets of activations at a time -- the inputs of the current block and its outputs, each
``nsamples x seqlen x d``. The store keeps the current set, window by window, where the run asked:

* ``device``: on the compute device (fastest, most device memory);
* ``host``: on the CPU, one window (or batch) moved to the device at a time (``--offload-activations``);
* ``files``: in a temporary folder under ``--offload-dir``, one window in host memory at a time
  (:class:`WindowFile`).

Whatever the place, the engine, the checkpoint and the strategies see the same thing: windows, iterated one at
a time or in batches moved to the compute device, and :meth:`ActivationStore.propagate` replacing them by a
block's outputs. Where they live never changes a number.

:class:`WindowFile` reads and writes through ordinary file I/O rather than a memory map, so what the kernel caches
stays page cache and is not charged to the process's resident memory.
"""

from __future__ import annotations

import ctypes
import math
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import torch
from torch import Tensor


def write_all(fd: int, raw: memoryview, offset: int) -> None:
    """Write all of ``raw`` at ``offset`` (one ``pwrite`` moves at most about 2 GiB on Linux)."""
    done = 0
    while done < len(raw):
        done += os.pwrite(fd, raw[done:], offset + done)


def read_all(fd: int, raw: memoryview, offset: int) -> int:
    """Fill ``raw`` from ``offset`` as far as the file goes; the number of bytes read."""
    got = 0
    while got < len(raw):
        n = os.preadv(fd, [raw[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got


class WindowFile(Sequence[Tensor]):
    """An append-only sequence of equally shaped tensors stored back to back in one file, read on the CPU.

    The file is created in ``directory`` and removed by :meth:`close` (or when the object is collected).
    """

    def __init__(self, directory: str | os.PathLike):
        fd, name = tempfile.mkstemp(prefix="activations-", suffix=".bin", dir=directory)
        self.path = Path(name)
        self._file = os.fdopen(fd, "w+b", buffering=0)
        self._shape: tuple[int, ...] | None = None
        self._dtype: torch.dtype | None = None
        self._nbytes = 0
        self._len = 0

    def append(self, x: Tensor) -> None:
        x = x.detach().to("cpu").contiguous()
        if self._shape is None:
            self._shape, self._dtype = tuple(x.shape), x.dtype
            self._nbytes = x.numel() * x.element_size()
        elif tuple(x.shape) != self._shape or x.dtype != self._dtype:
            raise ValueError(f"window {tuple(x.shape)} {x.dtype} differs from the first, {self._shape} {self._dtype}")
        write_all(self._file.fileno(), memoryview(x.reshape(-1).view(torch.uint8).numpy()), self._len * self._nbytes)
        self._len += 1

    @property
    def window_shape(self) -> tuple[int, ...] | None:
        """Every window's shape (None before the first)."""
        return self._shape

    def extend(self, xs) -> None:
        for x in xs:
            self.append(x)

    def _read(self, i: int) -> Tensor:
        if not -self._len <= i < self._len:
            raise IndexError(f"window {i} of {self._len}")
        i %= self._len
        buf = torch.empty(self._nbytes, dtype=torch.uint8)
        got = read_all(self._file.fileno(), memoryview(buf.numpy()), i * self._nbytes)
        if got != self._nbytes:
            raise OSError(f"{self.path}: window {i} is truncated ({got} of {self._nbytes} bytes)")
        return buf.view(self._dtype).view(self._shape)

    @overload
    def __getitem__(self, i: int) -> Tensor: ...
    @overload
    def __getitem__(self, i: slice) -> list[Tensor]: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._read(k) for k in range(*i.indices(self._len))]
        return self._read(i)

    def __len__(self) -> int:
        return self._len

    def close(self) -> None:
        """Delete the file; the sequence is empty afterwards."""
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)
        self._len = 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the temporary directory goes with the run anyway
            pass


def unlinked_file(directory: str | os.PathLike, prefix: str):
    """A new file in ``directory``, opened unbuffered for reading and writing and already unlinked: the open
    descriptor keeps it until it is closed, and nothing is left behind a kill."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".bin", dir=directory)
    os.unlink(name)
    return os.fdopen(fd, "w+b", buffering=0)


class Parked:
    """One tensor held in memory, or -- with ``directory`` -- in an unlinked file there, read back by :meth:`get`
    whenever it is needed: for a solver's state that is too large to stay resident between its uses. The caller
    drops its own reference for the memory to go; the file closes with this object."""

    def __init__(self, value: Tensor, directory: str | os.PathLike | None = None):
        self.device, self.dtype, self.shape = value.device, value.dtype, tuple(value.shape)
        self._value: Tensor | None = value
        self._file = None
        if directory is not None:
            self._file = unlinked_file(directory, "parked-")
            weakref.finalize(self, self._file.close)
            host = value.detach().to("cpu").contiguous()
            write_all(self._file.fileno(), memoryview(host.reshape(-1).view(torch.uint8).numpy()), 0)
            self._value = None

    def get(self) -> Tensor:
        """The tensor (from the file: a fresh copy on its device each time)."""
        if self._file is None:
            return self._value
        buf = torch.empty(math.prod(self.shape) * self.dtype.itemsize, dtype=torch.uint8)
        got = read_all(self._file.fileno(), memoryview(buf.numpy()), 0)
        if got != buf.numel():
            raise OSError(f"a parked {self.dtype} tensor {self.shape} came back short ({got} of {buf.numel()} bytes)")
        return buf.view(self.dtype).view(self.shape).to(self.device)


def row_slices(n: int, size: int) -> Iterator[slice]:
    """``0:size``, ``size:2·size``, ... covering ``n`` rows (the last one shorter)."""
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


class TokenRows:
    """A ``tokens x features`` float32 array that is read and written by row ranges (token chunks): one tensor in
    memory, or -- with ``directory`` -- one file in it, only the rows being worked on in memory.

    :meth:`read` gives the rows (in memory: a view, so changing it changes the array; from the file: a fresh
    tensor on ``device``); :meth:`write` stores rows and returns what now holds them (in memory: the view, so a
    caller can drop its own copy; from the file: the tensor it was given). The file is removed on :meth:`close`.
    """

    def __init__(self, rows: int, cols: int, device: str | torch.device = "cpu",
                 directory: str | os.PathLike | None = None):
        self.shape = (rows, cols)
        self.device = torch.device(device)
        self._data: Tensor | None = None
        self._file = None
        if directory is None:
            self._data = torch.empty(rows, cols, device=self.device)
        else:
            self._file = unlinked_file(directory, "rows-")

    def _span(self, rows: slice) -> tuple[int, int]:
        start, stop, _ = rows.indices(self.shape[0])
        return start * self.shape[1] * 4, (stop - start) * self.shape[1] * 4

    def read(self, rows: slice) -> Tensor:
        if self._data is not None:
            return self._data[rows]
        offset, nbytes = self._span(rows)
        buf = torch.empty(nbytes // 4, dtype=torch.float32)
        got = read_all(self._file.fileno(), memoryview(buf.numpy()).cast("B"), offset)
        if got < nbytes:
            raise OSError(f"token rows {rows.start}:{rows.stop} were never written (read {got} of {nbytes} bytes)")
        return buf.view(-1, self.shape[1]).to(self.device)

    def write(self, rows: slice, value: Tensor) -> Tensor:
        if self._data is not None:
            held = self._data[rows]
            if held.data_ptr() != value.data_ptr():
                held.copy_(value)
            return held
        offset, nbytes = self._span(rows)
        host = value.detach().to("cpu", torch.float32).contiguous()
        if host.numel() * 4 != nbytes:
            raise ValueError(f"{tuple(value.shape)} does not fill rows {rows.start}:{rows.stop} of {self.shape}")
        write_all(self._file.fileno(), memoryview(host.numpy()).cast("B"), offset)
        return value

    @classmethod
    def holding(cls, data: Tensor) -> "TokenRows":
        """In memory around ``data`` itself (``tokens x features`` float32, not copied)."""
        if data.ndim != 2 or data.dtype != torch.float32:
            raise ValueError(f"token rows are a 2-D float32 tensor, got {tuple(data.shape)} {data.dtype}")
        rows = cls(0, data.shape[1], data.device)
        rows.shape, rows._data = tuple(data.shape), data
        return rows

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def close(self) -> None:
        self._data = None
        if self._file is not None and not self._file.closed:
            self._file.close()


PLACES = ("device", "host", "files")


def _to(obj: Any, device: torch.device, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` (tensors, nested in tuples, lists and dicts) on ``device``; a tensor met twice (the same mask
    handed to several blocks) is moved once and stays one tensor."""
    memo = {} if memo is None else memo
    if isinstance(obj, Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the original is kept so that its id is not reused
        return memo[id(obj)][1]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


class ActivationStore:
    """The hidden states entering the current block for every calibration window, and the block's keyword
    arguments (masks, rotary embeddings: one window's worth, kept on the compute device).

    Use it as a context manager: leaving it removes the files of a ``files`` store, also after an error.
    """

    def __init__(self, device: str | torch.device = "cpu", place: str = "device",
                 directory: str | os.PathLike | None = None):
        if place not in PLACES:
            raise ValueError(f"activation place must be one of {', '.join(PLACES)}, not {place!r}")
        if (place == "files") != (directory is not None):
            raise ValueError("a 'files' store needs a directory, and only it")
        self.device = torch.device(device)
        self.place = place
        #: Where the windows are kept: the compute device, or the host for ``host`` and ``files``.
        self.storage = self.device if place == "device" else torch.device("cpu")
        self._tmp: tempfile.TemporaryDirectory | None = None
        if directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="lmprune-activations-", dir=directory)
        self._windows = self._new()
        self.kwargs: dict[str, Any] = {}
        #: Each block's own keyword arguments where the model gives blocks different ones (sliding-window and
        #: global attention masks, ...); empty: every block takes :attr:`kwargs`.
        self.block_kwargs: list[dict[str, Any]] = []

    def _new(self):
        return [] if self._tmp is None else WindowFile(self._tmp.name)

    @property
    def directory(self) -> str | None:
        """The store's own temporary folder for a ``files`` store (removed with it), else None."""
        return None if self._tmp is None else self._tmp.name

    # filling ----------------------------------------------------------------------------------------------
    def append(self, window: Tensor) -> None:
        """Add one window (``1 x seqlen x d``)."""
        self._windows.append(window.detach().to(self.storage) if self._tmp is None else window)

    def set_kwargs(self, kwargs: dict[str, Any], per_block: list[dict[str, Any]] | None = None) -> None:
        """Block 0's keyword arguments and, optionally, every block's (in block order)."""
        memo: dict[int, Any] = {}
        self.kwargs = _to(kwargs, self.device, memo)
        self.block_kwargs = [_to(kw, self.device, memo) for kw in per_block or []]

    def kwargs_for(self, block: int) -> dict[str, Any]:
        """The keyword arguments block ``block`` is called with."""
        return self.block_kwargs[block] if block < len(self.block_kwargs) else self.kwargs

    # reading ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._windows)

    @property
    def tokens(self) -> int:
        """Calibration tokens held: every window's positions."""
        if isinstance(self._windows, WindowFile):
            shape = self._windows.window_shape
            return 0 if shape is None else len(self._windows) * math.prod(shape[:-1])
        return sum(math.prod(w.shape[:-1]) for w in self._windows)

    def __iter__(self) -> Iterator[Tensor]:
        """Every window where it is kept, one at a time."""
        for i in range(len(self._windows)):
            yield self._windows[i]

    def batches(self, size: int = 1) -> Iterator[Tensor]:
        """``size`` windows at a time, concatenated and on the compute device."""
        size = max(1, int(size))
        for i in range(0, len(self._windows), size):
            chunk = self._windows[i : i + size]
            x = chunk[0] if len(chunk) == 1 else torch.cat(chunk)
            yield x.to(self.device)

    # replacing --------------------------------------------------------------------------------------------
    def propagate(self, fn: Callable[[Tensor], Tensor], size: int = 1) -> None:
        """Replace every window ``x`` by ``fn(x)`` (a block's output), ``size`` windows per call; the old set is
        released once the new one is complete."""
        outputs = self._new()
        for x in self.batches(size):
            for out in fn(x).split(1):
                outputs.append(out.to(self.storage) if self._tmp is None else out)
        self._release(self._windows)
        self._windows = outputs

    def _release(self, windows) -> None:
        if isinstance(windows, WindowFile):
            windows.close()

    def close(self) -> None:
        """Drop every window and remove the store's files."""
        self._release(self._windows)
        self._windows = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim with
        return None


_MALLOC_TRIM = _load_trim()


def trim_host_memory() -> bool:
    """Give freed heap memory back to the operating system; True when glibc's ``malloc_trim`` ran.

    The block passes allocate and free many window-sized buffers; glibc keeps the freed pages in its heap, and on
    ``smollm2-135m`` (30 blocks, 1024-token windows) that retention grew the peak RSS by 170-280 MiB over a run.
    Trimming once per block costs milliseconds.
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
