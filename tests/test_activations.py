"""WindowFile: calibration activations in a file, read back one window at a time."""

from __future__ import annotations

import pytest
import torch

from lmprune.activations import WindowFile, release


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


def test_release_deletes_the_file(tmp_path):
    f = WindowFile(tmp_path)
    f.append(torch.ones(2))
    release(f)
    assert not f.path.exists() and len(f) == 0
    release([torch.ones(2)])  # a list is left alone


def test_trim_host_memory_runs_where_glibc_exists():
    import platform

    from lmprune.activations import trim_host_memory

    ran = trim_host_memory()
    assert ran is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
