"""ALPS (Meng, Behdin, Wang, Mazumder, NeurIPS 2024): ADMM with a penalty schedule, then PCG on the support.

Objective. With ``H`` damped by ``percdamp · mean(diag H)`` and scaled to unit diagonal, ``d = sqrt(diag H)``,
``H̃ = D⁻¹HD⁻¹`` and ``B0 = D Ŵᵀ`` (``in x out``), ALPS minimises

    f(B) = ½ tr((B − B0)ᵀ H̃ (B − B0))   subject to   Bᵀ in the pattern's support set,

which is the damped layer error ``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` (up to ½) in the scaled variable; ``W = (B / d)ᵀ``.

ADMM splits ``B = D`` with ``D`` feasible (scaled dual ``V``)::

    B ← (H̃ + ρI)⁻¹ (H̃B0 − V + ρD)      ridge solve, factorisation shared by an input group (RidgeSolver)
    D ← P(B + V/ρ)                     Euclidean projection onto the pattern
    V ← V + ρ(B − D)

Every ``update_iter`` iterations ``s`` = entries of ``D`` whose zero/non-zero status changed since the last
check and ``k`` = non-zeros kept decide ρ: ``s/k > 0.1`` → ×1.3, ``> 0.005`` → ×1.2, otherwise ×1.1 while
``s ≥ 1`` and stop at ``s = 0`` once ρ has started growing; before that, a small change means ρ was too large:
ρ/5 (and, if ``s ≥ 1``, restart from the initial point). ρ is capped at ``rho_max``; the loop stops after
``max_iter`` iterations, or after ``switch_iter`` once ``s/k < switch_tol``. Finally the last ``B`` is
hard-thresholded onto the pattern and the least-squares problem on that support is solved for all output
columns at once by masked batched conjugate gradient (:func:`.pcg.masked_pcg`; unit diagonal = Jacobi).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import Tensor

from ..patterns import NM, Pattern, Unstructured
from .base import Gram, SolveResult, SolverOptions, screen_inputs, validate_options
from .pcg import masked_pcg
from .spd import cholesky_, cholesky_inverse_

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: a factor of the ρ schedule (ρ never shrinks by it)
_Factor = Annotated[float, Field(ge=1)]


class Options(SolverOptions):
    rho0: float = Field(0.1, gt=0)
    max_iter: int = Field(300, ge=0)
    update_iter: int = Field(3, ge=1)
    switch_iter: int = Field(30, ge=0)
    #: after ``switch_iter``, stop once the support change per check is below this fraction of ``k``
    switch_tol: float = Field(3e-4, ge=0)
    rho_max: float = Field(1e6, gt=0)
    #: ρ factors for large (s/k > 0.1), medium (> 0.005) and small (s ≥ 1) support changes
    growth: tuple[_Factor, _Factor, _Factor] = (1.3, 1.2, 1.1)
    #: treat ρ as already growing from the first check (skips the ρ/5 restart branch; for warm/fast starts)
    grow_from_start: bool = False
    #: False: keep ρ = rho0 for ``max_iter`` iterations (the fixed-penalty ADMM the schedule improves on)
    schedule: bool = True
    #: the reference runs 10; from ADMM's converged iterate steps 4–10 lowered the layer error by 0.02–0.16%
    #: on SmolLM2 layers (bench/RESULTS.md) and cost 10–15% of the solve
    pcg_iters: int = Field(3, ge=0)
    #: record the PCG objective after every step (stats["pcg_objective"]); otherwise only before and after
    pcg_track: bool = False
    percdamp: float = Field(0.01, ge=0)
    #: initial feasible point D⁰: scaled magnitude (ALPS), or the mask/weights of Wanda or SparseGPT
    warm_start: Literal["magnitude", "wanda", "sparsegpt"] = "magnitude"
    #: only used by the ``eig``/``inverse`` ridge modes; float32 measured as accurate as float64
    eigh_dtype: Literal["float64", "float32"] = "float32"
    #: dtype of the ADMM and PCG matrix products
    dtype: Literal["float32", "float64"] = "float32"
    #: how ``(H̃ + ρI)⁻¹`` is applied (see :class:`RidgeSolver`)
    ridge: Literal["auto", "eig", "inverse", "cholesky"] = "auto"
    #: iterations (1-based) at which to record the objective of D and the support change (costs a product)
    trace: tuple[Annotated[int, Field(ge=1)], ...] = ()


@dataclass
class ScaledGram:
    """``H̃ = D⁻¹(H + λI)D⁻¹`` and ``d`` in the working dtype; its eigendecomposition ``QΛQᵀ`` on demand."""

    h: Tensor
    d: Tensor
    eigh_dtype: torch.dtype
    q: Tensor | None = None
    lam: Tensor | None = None
    eigh_s: float = 0.0
    #: ``(H̃ + ρI)⁻¹`` by ρ, shared by the matrices of one input group (their ρ sequences usually agree)
    inverses: dict = field(default_factory=dict)
    #: matrices reading this Gram (``Gram.shared_by``); with one, no inverse is ever asked for twice
    shared_by: int = 1

    @property
    def max_inverses(self) -> int:
        """A whole schedule's worth (about 12), within 2 GiB per Gram (in = 11008 keeps 4); one when no other
        matrix reads the Gram."""
        if self.shared_by <= 1:
            return 1
        return max(1, min(16, (2 << 30) // (self.h.numel() * self.h.element_size())))

    def eig(self) -> tuple[Tensor, Tensor]:
        if self.q is None:
            start = time.perf_counter()
            lam, q = torch.linalg.eigh(self.h.to(self.eigh_dtype))
            self.lam, self.q = lam.to(self.h.dtype), q.to(self.h.dtype)
            self.eigh_s = time.perf_counter() - start
        return self.q, self.lam


def scaled_gram(gram: Gram, percdamp: float, eigh_dtype: str, dtype: str) -> ScaledGram:
    """The damped, unit-diagonal Gram matrix, computed once per ``gram`` (and its eigendecomposition once)."""

    def compute() -> ScaledGram:
        h, d = scaled_damped(gram, percdamp, _DTYPES[dtype])
        return ScaledGram(h, d, _DTYPES[eigh_dtype], shared_by=gram.shared_by)

    return gram.cached(f"alps_scaled_{percdamp}_{eigh_dtype}_{dtype}", compute)


def scaled_damped(gram: Gram, percdamp: float, dtype: torch.dtype, rows: int = 512) -> tuple[Tensor, Tensor]:
    """``H̃ = D⁻¹(H + λI)D⁻¹`` and ``d = sqrt(diag(H + λI))`` in ``dtype``, from ``gram.damped(percdamp)``'s
    float64 values (its diagonal from :meth:`Gram.damped_diagonal`), computed a float64 row panel at a time: the
    arithmetic is elementwise, so the result has the bits of the whole float64 copy, without holding it (two
    ``in x in`` float64 words at ``in`` = 28672: 6 GiB)."""
    h = gram.matrix
    n = h.shape[0]
    damped_diag = gram.damped_diagonal(percdamp, torch.float64)
    d = damped_diag.sqrt()
    out = torch.empty(n, n, dtype=dtype, device=h.device)
    for lo in range(0, n, rows):
        hi = min(lo + rows, n)
        panel = h[lo:hi].to(torch.float64)
        torch.diagonal(panel, offset=lo).copy_(damped_diag[lo:hi])
        out[lo:hi] = panel.div_(d[lo:hi].unsqueeze(1)).div_(d.unsqueeze(0))
    return out, d.to(dtype)


class RidgeSolver:
    """Applies ``(H̃ + ρI)⁻¹`` for the current ρ.

    * ``eig``: ``Q((QᵀR) / (Λ + ρ))`` from the shared eigendecomposition: two products per solve, nothing to
      redo when ρ changes.
    * ``inverse``: ``M = Q diag(1/(Λ+ρ)) Qᵀ``, rebuilt by one ``in³`` product when ρ changes, then one product
      per solve; fewer flops than ``eig`` when ``in < update_iter · out``.
    * ``cholesky``: the same ``M`` from a Cholesky factorisation of ``H̃ + ρI`` at each ρ change (about ``in³``
      flops, no eigendecomposition at all), then one product per solve.
    * ``auto``: ``cholesky``. On CPU it measured as fast as or faster than the other two for every SmolLM2
      shape (down_proj: 4.6 s against 6.0 s for ``inverse``; ``cholesky_solve`` in every iteration instead of
      the explicit inverse was no faster). ρ changes every ``update_iter`` iterations and the schedule is
      usually identical for q/k/v, so the inverses cached on their shared Gram serve the whole group.
    """

    def __init__(self, sg: ScaledGram, mode: str = "auto"):
        self.sg, self.mode = sg, "cholesky" if mode == "auto" else mode
        self._rho: float | None = None
        self._m: Tensor | None = None

    def __call__(self, rhs: Tensor, rho: float, out: Tensor | None = None) -> Tensor:
        if self.mode == "eig":
            q, lam = self.sg.eig()
            return torch.mm(q, (q.T @ rhs).div_((lam + rho).unsqueeze(1)), out=out)
        if rho != self._rho:
            self._m = None  # the old inverse is released before the new one is built (unless cached)
            self._m, self._rho = self._shared_inverse(rho), rho
        return torch.mm(self._m, rhs, out=out)

    def release(self) -> None:
        """Drop the current inverse, and the cached ones when no other matrix reads this Gram (before PCG,
        which needs none: an ``in x in`` matrix less at its peak)."""
        self._m, self._rho = None, None
        if self.sg.shared_by <= 1:
            self.sg.inverses.clear()

    def _shared_inverse(self, rho: float) -> Tensor:
        key = (self.mode, rho)
        cache = self.sg.inverses
        if key not in cache:
            if len(cache) >= self.sg.max_inverses:
                cache.pop(next(iter(cache)))
            cache[key] = self._inverse(rho)
        return cache[key]

    def _inverse(self, rho: float) -> Tensor:
        if self.mode == "inverse":
            q, lam = self.sg.eig()
            return (q / (lam + rho).unsqueeze(0)) @ q.T
        lower, info = cholesky_(self._shifted(rho))  # in place on the CPU (:mod:`.spd`)
        if info == 0:
            return cholesky_inverse_(lower)
        del lower
        lower, info = cholesky_(self._shifted(rho).double())  # float32 round-off broke definiteness
        if info != 0:
            raise torch.linalg.LinAlgError(f"H̃ + ρI not positive definite at ρ = {rho:g}")
        return cholesky_inverse_(lower).to(self.sg.h.dtype)

    def _shifted(self, rho: float) -> Tensor:
        shifted = self.sg.h.clone()
        shifted.diagonal().add_(rho)
        return shifted


def keep_mask_scaled(pattern: Pattern, b: Tensor, sparsity: float) -> Tensor:
    """The pattern's projection support for ``B`` (``in x out``), applied in the weight layout ``Bᵀ``."""
    if isinstance(pattern, Unstructured) and pattern.scope == "matrix":
        return pattern.keep_mask(b.abs(), sparsity)  # layout-free: skip the transpose copy
    if isinstance(pattern, NM) and pattern.m <= 8:
        pattern.validate(b.T.shape)
        return _nm_keep_by_rank(b.abs(), pattern.n, pattern.m)
    return pattern.keep_mask(b.abs().T, sparsity).T


def _nm_keep_by_rank(scores: Tensor, n: int, m: int) -> Tensor:
    """N:M support of ``B`` (groups of ``m`` consecutive rows): keep an entry when fewer than ``n`` of its
    group beat it (ties go to the lower index), so exactly ``n`` per group. ``m²`` comparisons of contiguous
    slices instead of ``topk`` over many tiny groups (6× faster on CPU for 2:4)."""
    x = scores.view(-1, m, scores.shape[1])
    keep = torch.empty_like(x, dtype=torch.bool)
    for i in range(m):
        beaten = torch.zeros_like(x[:, i], dtype=torch.uint8)
        for j in range(m):
            if j != i:
                beaten += x[:, j] >= x[:, i] if j < i else x[:, j] > x[:, i]
        torch.lt(beaten, n, out=keep[:, i])
    return keep.view_as(scores)


def _scaled_weight(weight: Tensor, gram: Gram, d: Tensor, out: Tensor | None = None) -> Tensor:
    """``B0 = D Ŵᵀ`` (``in x out``, ``d``'s dtype, into ``out`` if given), dead inputs' columns of ``Ŵ`` zeroed."""
    if out is None:
        out = torch.empty(weight.shape[1], weight.shape[0], dtype=d.dtype, device=d.device)
    out.copy_(weight.detach().T)
    out[gram.dead()] = 0
    return out.mul_(d.unsqueeze(1))


@dataclass
class StartPoint:
    """The feasible start ``D⁰`` (``in x out``): ``B0`` on ``keep``, or, for a SparseGPT warm start, its own
    values (``values``). Held as a mask where it can be, as ADMM's restarts rebuild it (an ``in x out`` float
    tensor less through the iterations)."""

    keep: Tensor
    values: Tensor | None = None

    def into(self, out: Tensor, weight: Tensor, gram: Gram, d: Tensor) -> Tensor:
        if self.values is not None:
            return out.copy_(self.values)
        return _scaled_weight(weight, gram, d, out=out).mul_(self.keep)


def _initial_point(
    weight: Tensor, gram: Gram, pattern: Pattern, sparsity: float, b0: Tensor, d: Tensor, warm_start: str,
    percdamp: float,
) -> StartPoint:
    """Feasible start ``D⁰`` (``in x out``) and its support."""
    if warm_start == "magnitude":
        return StartPoint(keep_mask_scaled(pattern, b0, sparsity))
    if warm_start == "wanda":
        from . import wanda

        # the pattern's own comparison group, so the start is feasible (Wanda's default is per output row)
        return StartPoint(wanda.solve(weight, gram, pattern, sparsity, per_row=False).mask.T)
    from . import sparsegpt

    res = sparsegpt.solve(weight, gram, pattern, sparsity, percdamp=percdamp)
    return StartPoint(res.mask.T, d.unsqueeze(1) * res.weight.to(b0.dtype).T)


def _rel_error(b: Tensor, hb: Tensor, g: Tensor, r0: float) -> float:
    """``tr((B−B0)ᵀH̃(B−B0)) / tr(B0ᵀH̃B0)`` from ``H̃B`` and ``G = H̃B0`` (the absolute error when ``r0 = 0``)."""
    return float(((b * hb).sum() - 2 * (b * g).sum() + r0) / (r0 if r0 > 0 else 1.0))


def solve(
    weight: Tensor,
    gram: Gram,
    pattern: Pattern,
    sparsity: float,
    **options,
) -> SolveResult:
    """Prune ``weight`` (out x in) to ``pattern`` at ``sparsity`` minimising the damped layer error (module doc).

    ``options`` are :class:`Options` fields. Stats: ``iterations``, ``rho_final``, ``support_history`` (per
    check: iteration, entries changed, ρ), ``pcg_iterations``, ``rel_error_scaled_before_pcg`` and
    ``rel_error_scaled`` (on the damped scaled Gram), ``pcg_objective``, timings, and ``trace`` if asked.
    """
    opt = validate_options(Options, options, "alps")
    pattern.validate(weight.shape)
    zero = screen_inputs("alps", weight, gram, pattern, sparsity)
    if zero is not None:
        return zero
    start = time.perf_counter()
    sg = scaled_gram(gram, opt.percdamp, opt.eigh_dtype, opt.dtype)
    had_eig = sg.q is not None

    b0 = _scaled_weight(weight, gram, sg.d)
    g = sg.h @ b0
    r0 = float((b0 * g).sum())
    ridge = RidgeSolver(sg, opt.ridge)
    start_point = _initial_point(weight, gram, pattern, sparsity, b0, sg.d, opt.warm_start, opt.percdamp)
    del b0  # read again only by a restart, which rebuilds it from the weight
    keep = start_point.keep
    k = max(int(keep.sum()), 1)
    if k == keep.numel():  # nothing to prune (the schedule would only shrink ρ until max_iter)
        full = torch.ones_like(weight, dtype=torch.bool)
        return SolveResult(weight.detach().clone(), full, {"iterations": 0, "time_s": time.perf_counter() - start})

    rho = opt.rho0
    # the ADMM state, four in x out tensors updated in place: B is only ever written by the ridge solve, and the
    # ridge's right-hand side is formed in D's storage, which the projection overwrites next
    dvar = start_point.into(torch.empty_like(g), weight, gram, sg.d)
    b, v = torch.empty_like(g), torch.zeros_like(g)
    prev_keep = keep
    growing = opt.grow_from_start
    history: list[dict] = []
    trace: list[dict] = []
    trace_at = set(opt.trace)
    last_keep = keep
    it = 0
    for it in range(1, opt.max_iter + 1):
        b = ridge(torch.add(g, dvar, alpha=rho, out=dvar).sub_(v), rho, out=b)
        u = v.div_(rho).add_(b)  # u = B + V/ρ, in V's storage
        keep = keep_mask_scaled(pattern, u, sparsity)
        torch.mul(u, keep, out=dvar)
        v = u.sub_(dvar).mul_(rho)  # V + ρ(B − D) = ρ(u − D)

        if it in trace_at:
            trace.append(
                {
                    "iter": it,
                    "rho": rho,
                    "rel_error_d": _rel_error(dvar, sg.h @ dvar, g, r0),
                    "support_change": int((keep ^ last_keep).sum()),
                }
            )
        if trace_at:
            last_keep = keep
        if not opt.schedule or it % opt.update_iter:
            continue

        s = int((keep ^ prev_keep).sum())
        prev_keep = keep
        history.append({"iter": it, "changed": s, "rho": rho})
        frac = s / k
        stop = False
        if frac > 0.1:
            rho *= opt.growth[0]
            growing = True
        elif frac > 0.005:
            rho *= opt.growth[1]
            growing = True
        elif s >= 1:
            if growing:
                rho *= opt.growth[2]
            else:
                rho /= 5
                start_point.into(dvar, weight, gram, sg.d)
                v.zero_()
        elif growing:
            stop = True
        else:
            rho /= 5
        rho = min(rho, opt.rho_max)
        if stop or (it - 1 >= opt.switch_iter and frac < opt.switch_tol):  # reference: 0-based t ≥ switch_iter
            break
    eigh_s = sg.eigh_s if sg.q is not None and not had_eig else 0.0
    admm_s = time.perf_counter() - start - eigh_s

    if it == 0:  # no ADMM iteration: polish the initial point
        mask, x0 = keep, dvar
    else:
        mask = keep_mask_scaled(pattern, b, sparsity)
        x0 = b.mul_(mask)
    del b, dvar, v, keep, prev_keep, last_keep
    ridge.release()
    # PCG's iterate is x0's storage (it allocates three more in x out tensors)
    pcg = masked_pcg(sg.h, g, mask, x0, iters=opt.pcg_iters, track_objective=True if opt.pcg_track else "ends")
    del g, x0
    x = pcg.x.mul_(mask)
    # r0 = 0: the weight produces no output on these inputs (all zero, or only on dead inputs): nothing to lose
    scaled = lambda obj: (2 * obj + r0) / r0 if r0 > 0 else 0.0  # noqa: E731
    err_before = scaled(pcg.objective[0]) if pcg.objective else None
    err_after = scaled(pcg.objective[-1]) if pcg.objective else None
    pruned = x.div_(sg.d.unsqueeze(1)).T
    mask_w = mask.T.contiguous()
    total = time.perf_counter() - start
    stats = {
        "iterations": it,
        "rho_final": rho,
        "support_history": history,
        "pcg_iterations": pcg.iterations,
        "rel_error_scaled_before_pcg": err_before,
        "rel_error_scaled": err_after,
        "pcg_objective": pcg.objective,
        "warm_start": opt.warm_start,
        "ridge": ridge.mode,
        "time_s": total,
        "eigh_s": eigh_s,
        "admm_s": admm_s,
        "pcg_s": total - admm_s - eigh_s,
    }
    if trace:
        stats["trace"] = trace
    return SolveResult(pruned.to(weight.dtype).contiguous(), mask_w, stats)
