"""WindowFile: calibration activations in a file, read back one window at a time."""

from __future__ import annotations

import pytest
import torch

from lmprune.activations import ActivationStore, WindowFile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_windows_read_back_exactly(tmp_path, dtype):
    xs = [torch.randn(1, 5, 7).to(dtype) for _ in range(4)]
    f = WindowFile(tmp_path)
    f.extend(xs)
    assert len(f) == 4 and f.path.stat().st_size == 4 * xs[0].numel() * xs[0].element_size()
    for x, y in zip(xs, f):
        assert y.dtype == dtype and torch.equal(x, y)
    assert torch.equal(f[-1], xs[-1])
    assert [torch.equal(a, b) for a, b in zip(f[1:3], xs[1:3])] == [True, True]
    f[0].add_(1)  # a read is a fresh tensor: the file is not changed through it
    assert torch.equal(f[0], xs[0])


def test_mismatched_window_and_bad_index_are_errors(tmp_path):
    f = WindowFile(tmp_path)
    f.append(torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="differs from the first"):
        f.append(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="differs from the first"):
        f.append(torch.zeros(1, 3, 4, dtype=torch.float64))
    with pytest.raises(IndexError):
        f[1]


def test_truncated_file_is_an_error(tmp_path):
    f = WindowFile(tmp_path)
    f.extend([torch.ones(1, 3, 4)] * 2)
    with open(f.path, "r+b") as raw:
        raw.truncate(60)
    with pytest.raises(OSError, match="window 1 is truncated"):
        f[1]


@pytest.mark.parametrize("place", ["device", "host", "files"])
def test_store_propagates_window_by_window_and_cleans_up(tmp_path, place):
    """Every place holds the same windows, batches them for the compute device, replaces them by a block's
    outputs in order, and leaves no file behind."""
    directory = tmp_path / "acts" if place == "files" else None
    windows = [torch.randn(1, 5, 3) for _ in range(5)]
    with ActivationStore("cpu", place, directory) as store:
        assert store.tokens == 0
        for w in windows:
            store.append(w)
        assert len(store) == 5 and all(torch.equal(a, b) for a, b in zip(store, windows))
        assert store.tokens == 25
        assert [b.shape[0] for b in store.batches(2)] == [2, 2, 1]
        store.propagate(lambda x: x * 2 + 1, size=2)
        assert all(torch.equal(a, b * 2 + 1) for a, b in zip(store, windows))
        if place == "files":
            assert len(list(directory.rglob("*.bin"))) == 1  # the inputs' file went when the outputs were complete
    assert directory is None or not list(directory.rglob("*"))


def test_store_refuses_a_misplaced_directory(tmp_path):
    with pytest.raises(ValueError, match="needs a directory"):
        ActivationStore("cpu", "files")
    with pytest.raises(ValueError, match="place"):
        ActivationStore("cpu", "disk")


def test_trim_host_memory_runs_where_glibc_exists():
    import platform

    from lmprune.activations import trim_host_memory

    ran = trim_host_memory()
    assert ran is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_token_rows_hold_a_tensor_without_copying_it():
    """``TokenRows.holding`` keeps the tensor itself (reads are views of it); only 2-D float32 is accepted."""
    from lmprune.activations import TokenRows

    data = torch.randn(6, 4)
    rows = TokenRows.holding(data)
    assert rows.shape == (6, 4) and rows.in_memory
    assert rows.read(slice(None)).data_ptr() == data.data_ptr()
    rows.write(slice(1, 2), torch.zeros(1, 4))
    assert not data[1].any()
    for bad in (torch.randn(6, 4, dtype=torch.bfloat16), torch.randn(2, 3, 4)):
        with pytest.raises(ValueError, match="2-D float32"):
            TokenRows.holding(bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.bool])
def test_parked_tensors_come_back_exactly_and_leave_no_file(tmp_path, dtype):
    """``Parked`` in memory gives the tensor itself; in a file it gives a fresh copy with the same bits each time,
    the file is unlinked from the start (nothing left behind a kill) and closes with the object."""
    import gc
    import os

    from lmprune.activations import Parked

    value = (torch.randn(7, 5, dtype=torch.float64) * 1e3).to(dtype)
    assert Parked(value).get() is value
    parked = Parked(value, tmp_path)
    assert list(tmp_path.iterdir()) == []
    fd = parked._file.fileno()
    first = parked.get()
    assert first.dtype == dtype and first.shape == value.shape and torch.equal(first, value)
    first.zero_() if dtype != torch.bool else first.logical_not_()
    assert torch.equal(parked.get(), value)  # a read is a copy: the file is not changed through it
    del parked
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with the object


def test_reads_and_writes_go_on_past_a_short_transfer(tmp_path, monkeypatch):
    """One ``pwrite``/``preadv`` moves at most about 2 GiB on Linux (a float64 ``d_ff x d_ff`` matrix at 70B shape is
    6.3): window files, token rows and parked tensors loop until every byte has moved."""
    import os

    from lmprune.activations import Parked, TokenRows

    real_write, real_read = os.pwrite, os.preadv
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real_write(fd, bytes(data[:13]), offset))
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: real_read(fd, [bufs[0][:11]], offset))
    value = torch.randn(6, 9)
    windows = WindowFile(tmp_path)
    windows.extend([value, value * 2])
    rows = TokenRows(6, 9, directory=tmp_path)
    rows.write(slice(0, 6), value)
    parked = Parked(value.double(), tmp_path)
    assert torch.equal(windows[1], value * 2) and torch.equal(rows.read(slice(2, 5)), value[2:5])
    assert torch.equal(parked.get(), value.double())
    windows.close(), rows.close()
