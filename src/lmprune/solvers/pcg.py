"""Batched conjugate gradient restricted to a per-column support.

For every column ``j`` of ``G`` it solves the normal equations of a least-squares problem on a fixed support
``S_j = {i : mask[i, j]}``::

    H[S_j, S_j] x_{S_j} = G[S_j, j],   x zero off S_j,

i.e. it minimises ``f(X) = ½ tr(Xᵀ H X) − ⟨G, X⟩`` over matrices supported on ``mask``. All columns run together:
the iterate, residual and search direction live in the full ``in x out`` matrix and the residual is masked
after every step, so each column's directions never leave its support and one matrix product ``H @ P`` serves
all columns. ``inv_diag`` is a Jacobi preconditioner (``None`` = identity, right for a unit-diagonal ``H``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class PCGResult:
    x: Tensor
    iterations: int
    #: ``f(X)`` (summed over columns) at the start and after every iteration, or at the start and the end.
    objective: list[float] = field(default_factory=list)


def quadratic_objective(x: Tensor, g: Tensor, masked_residual: Tensor) -> float:
    """``½⟨X, HX⟩ − ⟨G, X⟩`` from the residual ``(G − HX)`` on the support of ``X`` (no extra product)."""
    return float(-0.5 * (x * (g + masked_residual)).sum())


def masked_pcg(
    h: Tensor,
    g: Tensor,
    mask: Tensor,
    x0: Tensor | None = None,
    iters: int = 10,
    inv_diag: Tensor | None = None,
    rtol: float = 0.0,
    track_objective: bool | str = True,
) -> PCGResult:
    """Minimise ``½ tr(XᵀHX) − ⟨G, X⟩`` over ``X`` supported on ``mask`` by ``iters`` steps of batched PCG.

    ``h``: ``n x n`` symmetric positive definite; ``g``, ``mask``, ``x0``: ``n x c``; ``x0``, when of ``g``'s
    dtype, is overwritten (it becomes the iterate: one ``n x c`` tensor less). Stops early once every
    column's masked residual norm is at most ``rtol`` times its masked right-hand side norm.
    ``track_objective``: record ``f`` after every step (True), only at the start and the end ("ends"), or
    not at all (False).
    """
    hp = torch.empty_like(g)  # H @ P, reused: fresh large tensors cost page faults
    if x0 is None:
        x = torch.zeros_like(g)
    else:
        x = x0.mul_(mask) if x0.dtype == g.dtype else x0.to(g.dtype) * mask
    r = torch.sub(g, torch.mm(h, x, out=hp)).mul_(mask)
    z = r if inv_diag is None else r * inv_diag.unsqueeze(1)
    p = z.clone()
    rz = torch.linalg.vecdot(r, z, dim=0)
    tiny = torch.finfo(g.dtype).tiny
    goal = rtol * (g * mask).norm(dim=0) if rtol > 0 else None

    def objective_now() -> float:
        return quadratic_objective(x, g, r)

    objective = [objective_now()] if track_objective else []
    done = 0
    for _ in range(iters):
        if goal is not None and bool((r.norm(dim=0) <= goal).all()):
            break
        torch.mm(h, p, out=hp)
        curv = torch.linalg.vecdot(p, hp, dim=0)
        alpha = torch.where(curv > tiny, rz / curv.clamp_min(tiny), torch.zeros_like(rz))
        r.sub_(hp.mul_(mask).mul_(alpha))
        x.add_(torch.mul(p, alpha, out=hp))  # hp is free again: no buffer of its own for αP
        z = r if inv_diag is None else torch.mul(r, inv_diag.unsqueeze(1), out=z)
        rz_new = torch.linalg.vecdot(r, z, dim=0)
        beta = torch.where(rz > tiny, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p.mul_(beta).add_(z)
        rz = rz_new
        done += 1
        if track_objective is True:
            objective.append(objective_now())
    if track_objective == "ends":
        objective.append(objective_now())
    return PCGResult(x, done, objective)
