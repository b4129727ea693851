"""Cholesky factorisations and inverses of symmetric positive definite matrices, in the input's own buffer.

At real shapes these ``in x in`` float64 matrices are the solvers' largest temporaries (LLaMA-3-70B's
``down_proj``: ``in`` = 28672, 6.3 GiB each). LAPACK factorises and inverts in place, in column-major storage;
torch passes it an ``out=`` tensor's buffer directly when that tensor is column-major, and otherwise works on a
column-major copy. A row-major symmetric matrix stored with its lower triangle mirrored into the upper one *is*
its own column-major storage, so the functions here mirror once and then let every step overwrite its input.
Every step is the same LAPACK call on the same values in the same layout as the out-of-place torch call would
make: the results are bit-identical to ``torch.linalg.cholesky_ex`` / ``torch.cholesky_inverse`` on the input.
Off the CPU they are the out-of-place calls. :func:`cholesky_solve` solves with a factor where it lies
(``torch.cholesky_solve`` copies the whole factor first).
"""

from __future__ import annotations

import torch
from torch import Tensor


def mirror_lower_(h: Tensor, panel: int = 1024) -> Tensor:
    """``h``'s strictly upper triangle overwritten by its lower one, transposed, a panel of rows at a time."""
    n = h.shape[0]
    for i in range(0, n, panel):
        j = min(i + panel, n)
        square = h[i:j, i:j]
        square.copy_(torch.tril(square) + torch.tril(square, -1).mT)
        h[i:j, j:].copy_(h[j:, i:j].mT)
    return h


def _in_place(a: Tensor) -> bool:
    return a.device.type == "cpu" and a.mT.is_contiguous()


def cholesky_(h: Tensor, upper: bool = False) -> tuple[Tensor, int]:
    """Cholesky factor of ``h`` (lower, or ``upper``) and LAPACK's ``info`` (non-zero: not positive definite).

    The lower factor reads ``h``'s lower triangle, the upper one its upper triangle, as torch does. On the CPU
    the factor is written over ``h`` and returned as a column-major view of its buffer; a row-major ``h`` is
    mirrored first (lower factor only). ``h`` is consumed either way.
    """
    if h.device.type == "cpu" and not upper and h.is_contiguous():
        h = mirror_lower_(h).mT
    if not _in_place(h):
        factor, info = torch.linalg.cholesky_ex(h, upper=upper)
        return factor, int(info)
    info = torch.zeros((), dtype=torch.int32)
    torch.linalg.cholesky_ex(h, upper=upper, out=(h, info))
    return h, int(info)


def cholesky_inverse_(lower: Tensor) -> Tensor:
    """``(L Lᵀ)⁻¹`` from the lower factor ``L``, written over it when it is column-major on the CPU (as
    :func:`cholesky_` returns it); ``lower`` is consumed."""
    if _in_place(lower):
        return torch.cholesky_inverse(lower, out=lower)
    return torch.cholesky_inverse(lower)


def cholesky_solve(b: Tensor, lower: Tensor) -> Tensor:
    """``X`` with ``L Lᵀ X = B``: two triangular solves (``L Z = B``, ``Lᵀ X = Z``) that read the factor ``L`` in
    its own buffer, the second written over ``Z``. These are the two steps LAPACK's ``potrs`` takes;
    ``torch.cholesky_solve`` runs it on a column-major copy of ``L``, one more ``in x in`` matrix (6.3 GiB in
    float64 for LLaMA-3-70B's ``down_proj``), and a copy of ``B`` beside its result.
    On this machine's MKL the result is bit-identical to ``torch.cholesky_solve(b, lower)`` (a test pins it)."""
    z = torch.linalg.solve_triangular(lower, b, upper=False)
    if not z.mT.is_contiguous():  # the layout the second solve can overwrite (column-major, as the CPU's is)
        return torch.linalg.solve_triangular(lower.mT, z, upper=True)
    return torch.linalg.solve_triangular(lower.mT, z, upper=True, out=z)
