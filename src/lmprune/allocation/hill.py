"""Power-law tail exponent of a weight matrix's empirical spectral density (ESD), the AlphaPruning metric.

The ESD of ``W`` is the set of eigenvalues of ``WᵀW`` (squared singular values, no ``1/N`` normalisation).
Its tail ``λ ≥ xmin`` is fitted by a continuous power law ``p(λ) ∝ λ^(-α)`` with the Hill / maximum-likelihood
estimator over the ``n`` eigenvalues of the tail (``xmin`` included):

    α(xmin) = 1 + n / Σ_{λ_j ≥ xmin} ln(λ_j / xmin)

and ``xmin`` is chosen among candidate eigenvalues by the smallest Kolmogorov–Smirnov distance between the
tail's empirical CDF (``q/n`` at its ``q``-th smallest value) and the fitted CDF ``1 − (λ/xmin)^(1−α)``.

Candidate rules:

- ``"peak"``: 100-bin histogram of ``log10 λ``; ``p = 10^(left edge of the fullest bin)``; candidates are the
  eigenvalues in ``[0.95 p, 1.5 p]``, i.e. the tail starts near the mode of the log-spectrum. The reference
  (AlphaPruning, inherited from TempBalance) compares ``λ ≥ log10(0.95 p)``: a linear value against a log
  bound, which leaves the lower bound inactive so that every eigenvalue below ``1.5 p`` is a candidate. Here
  both bounds are on the same (linear) scale, as intended. ``"peak_reference"`` reproduces the reference's
  candidate set for comparison.
- ``"median"``: ``xmin`` is the median eigenvalue; no search.

Eigenvalues that are exactly zero (rank-deficient matrices) cannot start a tail and are left out of the
histogram; they are never candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

XMIN_RULES = ("peak", "peak_reference", "median")


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    xmin: float
    ks: float  # KS distance between the chosen tail and its fit
    n_tail: int
    n_eigs: int


def eigenvalues(weight: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Eigenvalues of ``WᵀW`` (ascending), computed as squared singular values on ``weight``'s device."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"eigenvalues are computed in float32 or float64, not {dtype}")
    w = weight.detach().to(dtype)
    if w.shape[0] < w.shape[1]:  # same singular values; LAPACK is markedly faster on the tall orientation
        w = w.T
    s = torch.linalg.svdvals(w)
    return torch.sort(s.pow(2)).values


def _tail_fits(eigs: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """α and KS distance for each candidate start index ``idx`` into ascending ``eigs`` (float64)."""
    n_all = eigs.numel()
    log_e = eigs.log()
    # suffix sums of ln λ: tail_log[i] = Σ_{j ≥ i} ln λ_j
    tail_log = torch.flip(torch.cumsum(torch.flip(log_e, [0]), 0), [0])
    n = (n_all - idx).to(eigs.dtype)
    alpha = 1.0 + n / (tail_log[idx] - n * log_e[idx])

    # hankel[i] = ln λ from index i onwards, padded with +inf (a strided view; only the selected rows are copied)
    padded = torch.cat([log_e, torch.full((n_all,), math.inf, dtype=eigs.dtype, device=eigs.device)])
    hankel = padded.as_strided((n_all, n_all), (1, 1))
    q = torch.arange(n_all, dtype=eigs.dtype, device=eigs.device)
    ks = torch.empty_like(alpha)
    chunk = max(1, (1 << 22) // n_all)  # bounds the (candidates x N) work matrix to ~4M entries
    for lo in range(0, idx.numel(), chunk):
        i = idx[lo : lo + chunk]
        nn = n[lo : lo + chunk, None]
        gap = hankel[i] - log_e[i, None]  # ln(λ_{i+q} / λ_i)
        gap.mul_(1.0 - alpha[lo : lo + chunk, None]).exp_().neg_().add_(1.0)  # fitted CDF
        gap.sub_(q / nn).abs_()
        gap.masked_fill_(q >= nn, 0.0)  # positions past the end of the tail
        ks[lo : lo + chunk] = gap.amax(1)
    return alpha, ks


def _peak_candidates(eigs: Tensor, rule: str, bins: int) -> Tensor:
    log_e = eigs.log10()
    lo, hi = log_e[0].item(), log_e[-1].item()
    if hi - lo <= 0:
        return torch.zeros(1, dtype=torch.long, device=eigs.device)
    counts = torch.histc(log_e, bins=bins, min=lo, max=hi)
    width = (hi - lo) / bins
    left = lo + int(torch.argmax(counts).item()) * width
    peak = 10.0**left
    upper = eigs <= 1.5 * peak
    if rule == "peak_reference":
        lower = eigs >= math.log10(0.95 * peak)
    else:
        lower = eigs >= 0.95 * peak
    idx = torch.nonzero(upper & lower).flatten()
    if idx.numel() == 0:  # fullest bin wider than 1.5x: start anywhere inside it
        in_bin = (log_e >= left) & (log_e <= left + width)
        idx = torch.nonzero(in_bin).flatten()
    return idx


def fit_power_law(
    eigs: Tensor, xmin_rule: str = "peak", bins: int = 100, max_candidates: int | None = 1024
) -> PowerLawFit:
    """Hill α of the tail of ``eigs`` (any order, any device), with ``xmin`` chosen by ``xmin_rule``.

    The KS search costs ``O(candidates x N)``. Above ``max_candidates`` candidates an evenly spaced subset
    (first and last included) is searched; weight spectra have far fewer candidates in ``[0.95p, 1.5p]``, so
    this only bounds the cost for long synthetic samples or the reference rule on large matrices.
    """
    if xmin_rule not in XMIN_RULES:
        raise ValueError(f"unknown xmin rule {xmin_rule!r}; choose from {', '.join(XMIN_RULES)}")
    e = torch.sort(eigs.detach().to(torch.float64).flatten()).values
    n_eigs = e.numel()
    e = e[e > 0]
    if e.numel() < 3:
        raise ValueError(f"need at least 3 positive eigenvalues to fit a tail, got {e.numel()}")
    last = e.numel() - 2  # a tail needs two distinct-position points for a finite α

    if xmin_rule == "median":
        idx = torch.tensor([min(e.numel() // 2, last)], device=e.device)
    else:
        idx = _peak_candidates(e, xmin_rule, bins)
        idx = idx[idx <= last]
        if idx.numel() == 0:
            idx = torch.tensor([last], device=e.device)
        if max_candidates is not None and idx.numel() > max_candidates:
            pick = torch.linspace(0, idx.numel() - 1, max_candidates, device=e.device).round().long()
            idx = idx[torch.unique(pick)]

    alpha, ks = _tail_fits(e, idx)
    ok = torch.isfinite(alpha) & (alpha > 1)
    if not bool(ok.any()):
        raise ValueError("no candidate xmin gives a finite power-law fit (degenerate spectrum)")
    ks = torch.where(ok, ks, torch.full_like(ks, math.inf))
    best = int(torch.argmin(ks).item())  # first minimum, as in the reference
    start = int(idx[best].item())
    return PowerLawFit(
        alpha=float(alpha[best].item()),
        xmin=float(e[start].item()),
        ks=float(ks[best].item()),
        n_tail=e.numel() - start,
        n_eigs=n_eigs,
    )


def matrix_alpha(weight: Tensor, xmin_rule: str = "peak", dtype: torch.dtype = torch.float32) -> PowerLawFit:
    """ESD tail exponent of one weight matrix (float64 fit of the float32/float64 eigenvalues)."""
    return fit_power_law(eigenvalues(weight, dtype), xmin_rule, max_candidates=None)
