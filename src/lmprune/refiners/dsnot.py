"""DSnoT (Zhang et al., ICLR 2024): training-free mask surgery after any solver.

For output row ``i`` with dense weights ``w`` and pruned weights ``ŵ``, the *expected* reconstruction error is

    ε_i = E[(w − ŵ)·x] = Σ_j (w_ij − ŵ_ij) μ_j,          μ = E[x] over the calibration tokens.

DSnoT repeatedly swaps one pruned and one kept weight of a row:

* **grow** the pruned weight ``g`` (it takes its dense value ``w_ig``) that cuts ``ε_i`` the most: among the
  pruned weights with ``sign(w_ig μ_g) = sign(ε_i)``, the largest ``|w_ig μ_g| / Var[x_g]^pow`` (stable inputs
  first);
* **prune** the kept weight ``p`` whose removal hurts least: among kept weights whose removal moves ``ε_i``
  towards zero (``sign(ŵ_ip μ_p) = −sign(ε_i)``), the smallest Wanda score ``|ŵ_ip|·‖X_p‖``. For N:M the
  pruned weight is the smallest-Wanda original survivor of ``g``'s group, which keeps every group at N.

Every weight moves at most once (grown weights are never pruned again and vice versa), so a row's swap
sequence ends; it also ends when ``|ε_i|`` falls under ``update_threshold``, after ``max_cycles`` cycles, or
after ``patience`` consecutive rejected swaps. Unlike the reference, a swap is accepted only if it lowers the
row's exact layer-wise error ``(w − ŵ) H (w − ŵ)ᵀ`` (``H = Σ xxᵀ``), tracked incrementally through
``R = (W − Ŵ) H``; a final exact per-row check reverts any row whose error rose through round-off, so the
refiner never increases a row's reconstruction error. Kept weights keep the solver's values; counts per row
(unstructured) or per group (N:M) are unchanged.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from ..patterns import NM, Pattern, Unstructured
from ..solvers.base import Gram, SolveResult, SolverOptions, check_finite, validate_options, zero_gram


class Options(SolverOptions):
    max_cycles: int = Field(50, ge=0)
    #: Stop a row once |ε_i| (per-token expected error) is below this. The reference's 0.1 is on a sum over
    #: a 2048-token sequence, about 5e-5 per token.
    update_threshold: float = Field(5e-5, ge=0)
    #: Exponent of Var[x_j] dividing the growing score (reference: 1).
    pow_of_var: float = Field(1.0, ge=0)
    #: Reference option: also stop a row when a swap would flip the sign of ε_i.
    same_sign: bool = False
    #: Accept a swap only if it lowers the row's exact H-weighted error.
    guard: bool = True
    #: Stop a row after this many consecutive swaps rejected by the guard.
    patience: int = Field(3, ge=1)


def _row_errors(delta: Tensor, h: Tensor) -> Tensor:
    return ((delta @ h) * delta).sum(dim=1)


def _sorted_candidates(score: Tensor, valid: Tensor, descending: bool, k: int) -> tuple[Tensor, Tensor]:
    """Per row: the first ``k`` valid column indices ordered by ``score``, and how many valid ones there are.

    A row consumes at most one candidate per cycle, so ``k = max_cycles`` suffices (top-k, not a full sort)."""
    key = score.masked_fill(~valid, float("-inf") if descending else float("inf"))
    k = max(1, min(k, score.shape[1]))
    order = torch.topk(key, k, dim=1, largest=descending, sorted=True).indices
    return order, valid.sum(dim=1).clamp(max=k)


def _take(order: Tensor, ptr: Tensor, count: Tensor) -> tuple[Tensor, Tensor]:
    """``order[r, ptr[r]]`` and whether that is still a candidate (``ptr < count``)."""
    ok = ptr < count
    idx = order.gather(1, ptr.clamp(max=order.shape[1] - 1).unsqueeze(1)).squeeze(1)
    return idx, ok


def refine(
    dense_weight: Tensor,
    result: SolveResult,
    gram: Gram,
    pattern: Pattern,
    sparsity: float,
    **options,
) -> SolveResult:
    """Swap pruned and kept weights of ``result`` row by row while that lowers the row's expected reconstruction
    error; ``options`` are :class:`Options`."""
    opt = validate_options(Options, options, "dsnot")
    max_cycles, update_threshold, pow_of_var = opt.max_cycles, opt.update_threshold, opt.pow_of_var
    same_sign, guard, patience = opt.same_sign, opt.guard, opt.patience
    check_finite("dsnot", dense_weight, gram)
    check_finite("dsnot", result.weight)
    skip = None if isinstance(pattern, (Unstructured, NM)) else f"skipped: pattern {pattern.spec}"
    if gram.sum_x is None:
        skip = "skipped: the Gram matrix carries no input mean"
    elif zero_gram(gram):
        skip = "skipped: the calibration inputs are all zero (nothing to fit)"
    if skip:
        return SolveResult(result.weight, result.mask, {**result.stats, "dsnot": skip}, result.pattern)
    dtype = torch.float64 if dense_weight.device.type == "cpu" else torch.float32
    w = dense_weight.detach().to(dtype)
    w_hat = result.weight.detach().to(dtype).clone()
    keep = result.mask.to(torch.bool).clone()
    rows, cols = w.shape
    ar = torch.arange(rows, device=w.device)

    h = gram.matrix.to(dtype)
    mu = gram.mean.to(dtype)
    var = gram.variance.to(dtype)
    var = var.clamp_min(max(float(var[var > 0].mean()) if bool((var > 0).any()) else 1.0, 1e-30) * 1e-6)
    norms = gram.column_norms().to(dtype)

    delta = w - w_hat
    r_mat = delta @ h  # R = (W − Ŵ) H, kept current through the swaps
    err_before = (r_mat * delta).sum(dim=1)
    eps = delta @ mu

    grow_metric = w * mu  # ε falls by this when the weight is grown to its dense value
    prune_metric = w_hat * mu  # ε rises by this when the weight is pruned
    wanda = w_hat.abs() * norms.unsqueeze(0)
    pruned0 = ~keep
    grow_score = grow_metric / var.pow(pow_of_var).unsqueeze(0)
    grow_pos, n_grow_pos = _sorted_candidates(grow_score, pruned0 & (grow_metric > 0), descending=True, k=max_cycles)
    grow_neg, n_grow_neg = _sorted_candidates(grow_score, pruned0 & (grow_metric < 0), descending=False, k=max_cycles)
    del grow_score
    nm = isinstance(pattern, NM)
    if not nm:
        # zero-metric survivors (e.g. kept zeros) are free either way and sit in both lists
        prune_pos, n_prune_pos = _sorted_candidates(wanda, keep & (prune_metric >= 0), descending=False, k=max_cycles)
        prune_neg, n_prune_neg = _sorted_candidates(wanda, keep & (prune_metric <= 0), descending=False, k=max_cycles)
    movable = keep.clone()  # original survivors not yet pruned by DSnoT

    zeros = torch.zeros(rows, dtype=torch.long, device=w.device)
    gp, gn, pp, pn = zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    rejected = zeros.clone()
    active = torch.ones(rows, dtype=torch.bool, device=w.device)
    sign0 = torch.sign(eps)
    swaps = cycles = rejections = 0

    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        cycles += 1
        positive = eps > 0
        g_pos, ok_pos = _take(grow_pos, gp, n_grow_pos)
        g_neg, ok_neg = _take(grow_neg, gn, n_grow_neg)
        g = torch.where(positive, g_pos, g_neg)
        has_g = torch.where(positive, ok_pos, ok_neg)
        gp += (active & positive).long()
        gn += (active & ~positive).long()

        if nm:
            start = g - g % pattern.m
            group = start.unsqueeze(1) + torch.arange(pattern.m, device=w.device).unsqueeze(0)
            cand = movable.gather(1, group)
            scores = wanda.gather(1, group).masked_fill(~cand, float("inf"))
            best = scores.argmin(dim=1)
            p = group.gather(1, best.unsqueeze(1)).squeeze(1)
            has_p = cand.any(dim=1)
        else:
            # ε > 0 needs a removal that lowers ε (ŵμ < 0), and vice versa
            p_neg, okp_neg = _take(prune_neg, pn, n_prune_neg)
            p_pos, okp_pos = _take(prune_pos, pp, n_prune_pos)
            p = torch.where(positive, p_neg, p_pos)
            has_p = torch.where(positive, okp_neg, okp_pos)
            pn += (active & positive).long()
            pp += (active & ~positive).long()

        d_eps = prune_metric[ar, p] - grow_metric[ar, g]
        go = active & has_g & (eps.abs() > update_threshold)
        if same_sign:
            go &= torch.sign(eps + d_eps) == sign0
        if not nm:
            go &= has_p
        active &= go
        candidate = active & has_p & movable[ar, p]

        dg = -delta[ar, g]  # δ_g → 0
        dp = w_hat[ar, p]  # δ_p → w_p
        if guard:
            change = (
                2 * (dg * r_mat[ar, g] + dp * r_mat[ar, p])
                + dg.pow(2) * h[g, g]
                + dp.pow(2) * h[p, p]
                + 2 * dg * dp * h[g, p]
            )
            accept = candidate & (change < 0)
        else:
            accept = candidate
        refused = candidate & ~accept
        rejected = torch.where(accept, zeros, rejected + refused.long())
        active &= rejected < patience
        rejections += int(refused.sum())

        idx = accept.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        gi, pi = g[idx], p[idx]
        w_hat[idx, gi] = w[idx, gi]
        w_hat[idx, pi] = 0
        keep[idx, gi] = True
        keep[idx, pi] = False
        movable[idx, pi] = False
        delta[idx, gi] = 0
        delta[idx, pi] = w[idx, pi]
        eps[idx] += d_eps[idx]
        r_mat[idx] += dg[idx].unsqueeze(1) * h[gi] + dp[idx].unsqueeze(1) * h[pi]
        swaps += idx.numel()

    err_after = _row_errors(w - w_hat, h)
    worse = err_after > err_before
    if bool(worse.any()):
        original = result.weight.detach().to(dtype)
        w_hat[worse] = original[worse]
        keep[worse] = result.mask.to(torch.bool)[worse]
        err_after = torch.where(worse, err_before, err_after)

    stats = {
        **result.stats,
        "dsnot_swaps": swaps,
        "dsnot_cycles": cycles,
        "dsnot_guard_rejections": rejections,
        "dsnot_rows_reverted": int(worse.sum()),
        "dsnot_error_before": float(err_before.sum()),
        "dsnot_error_after": float(err_after.sum()),
    }
    return SolveResult(w_hat.to(result.weight.dtype), keep, stats, result.pattern)
