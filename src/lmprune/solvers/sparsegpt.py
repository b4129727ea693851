"""SparseGPT (Frantar & Alistarh, 2023): OBS reconstruction with lazy column blocks and adaptive masks.

Objective: ``min_Ŵ tr((W − Ŵ) H (W − Ŵ)ᵀ)`` over the pattern, with ``H`` damped by ``percdamp · mean(diag H)``.
Columns are eliminated left to right. For column ``i`` the pruned entries ``w`` are zeroed and the remaining
columns receive the optimal-brain-surgeon correction ``W[:, i:] −= (w − q)/[U]_ii · U[i, i:]``, where ``U`` is
the upper Cholesky factor of ``H⁻¹`` (so the row ``U[i, i:]`` is the inverse Hessian of the not yet
eliminated columns, after the earlier ones were fixed). Corrections inside a block of ``blocksize`` columns
are applied eagerly, to later blocks lazily in one matrix product.

Mask selection is adaptive: the support of each column block (unstructured) or each group of ``M`` columns
(N:M) is chosen when the sweep reaches it, by the OBS saliency ``w_ij² / [U]_jj²`` of the already updated
weights. Quotas are split over blocks so that the whole matrix (or each row) keeps exactly the pattern's
count. Patterns whose groups span the whole matrix (block tiles, input channels) are selected once up front
from the same saliency and then reconstructed by the same sweep.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..patterns import NM, Pattern, Unstructured, kept_count
from .base import Gram, SolveResult, SolverOptions, screen_inputs, validate_options
from .spd import cholesky_, cholesky_inverse_


class Options(SolverOptions):
    blocksize: int = Field(128, ge=1)
    percdamp: float = Field(0.01, ge=0)


def inverse_hessian_factor(gram: Gram, percdamp: float) -> tuple[Tensor, int]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` in float32; damping is raised tenfold until H is PD.

    On the CPU the three ``in x in`` steps (factorise, invert, factorise the inverse) run in float64 inside one
    buffer, each writing its output over its input, so one float64 matrix is held, then the float32 result
    beside it; on a GPU each step (in float32) drops its input as soon as it has its output.
    """

    def compute() -> tuple[Tensor, int]:
        damp = percdamp
        for retry in range(6):
            upper, info = _factor_of_inverse(gram.damped(damp, _factor_dtype(gram)))
            if info == 0:
                return upper.float(), retry
            del upper
            damp *= 10
        raise torch.linalg.LinAlgError(f"Gram matrix not positive definite even with damping {damp:g}")

    return gram.cached(f"sparsegpt_hinv_{percdamp}", compute)


def _factor_dtype(gram: Gram) -> torch.dtype:
    return torch.float64 if gram.matrix.device.type == "cpu" else torch.float32


def _factor_of_inverse(h: Tensor) -> tuple[Tensor, int]:
    """``chol(chol⁻¹(h))`` as an upper factor, and LAPACK's ``info`` (non-zero: not positive definite); ``h`` is
    consumed, and on the CPU every step overwrites it (:mod:`.spd`)."""
    lower, info = cholesky_(h)
    del h  # off the CPU the factor is a new tensor: let the input go
    if info != 0:
        return lower, info
    return cholesky_(cholesky_inverse_(lower), upper=True)


def _quota_sparsity(total_kept_before: int, total_kept_after: int, size: int) -> float:
    """Sparsity that makes ``keep_mask`` keep exactly ``after − before`` of ``size`` entries."""
    return 1.0 - (total_kept_after - total_kept_before) / size


def solve(
    weight: Tensor,
    gram: Gram,
    pattern: Pattern,
    sparsity: float,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> SolveResult:
    validate_options(Options, {"blocksize": blocksize, "percdamp": percdamp}, "sparsegpt")
    pattern.validate(weight.shape)
    zero = screen_inputs("sparsegpt", weight, gram, pattern, sparsity)
    if zero is not None:
        return zero
    rows, cols = weight.shape
    w = weight.detach().float().clone()
    w[:, gram.dead()] = 0
    u, retries = inverse_hessian_factor(gram, percdamp)
    u_diag = torch.diagonal(u)

    adaptive = isinstance(pattern, (Unstructured, NM))
    if isinstance(pattern, NM):
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
        keep = torch.zeros_like(w, dtype=torch.bool)
    elif adaptive:
        keep = torch.zeros_like(w, dtype=torch.bool)
    else:
        keep = pattern.keep_mask(w.pow(2) / u_diag.pow(2).unsqueeze(0), sparsity)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d1 = torch.diagonal(u1)
        if isinstance(pattern, Unstructured):
            per = 1 if pattern.scope == "row" else rows  # entries per column in the comparison group
            s_blk = _quota_sparsity(kept_count(per * i1, sparsity), kept_count(per * i2, sparsity), per * (i2 - i1))
            keep[:, i1:i2] = pattern.keep_mask(w1.pow(2) / d1.pow(2).unsqueeze(0), s_blk)
        for i in range(i2 - i1):
            if isinstance(pattern, NM) and i % pattern.m == 0:
                sal = w1[:, i : i + pattern.m].pow(2) / d1[i : i + pattern.m].pow(2).unsqueeze(0)
                keep[:, i1 + i : i1 + i + pattern.m] = pattern.keep_mask(sal, sparsity)
            col = w1[:, i]
            q = col * keep[:, i1 + i]
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    w = w * keep
    return SolveResult(w.to(weight.dtype), keep, {"damping_retries": retries, "blocksize": blocksize})
