"""SparseLLM (Bai et al., NeurIPS 2024): joint pruning of one feed-forward block through auxiliary variables.

Tokens are rows: ``X`` (T x d) is the FFN input, ``Y`` (T x d) the dense FFN output to reproduce.

ReLU FFN (OPT: fc1 → ReLU → fc2), auxiliaries ``z`` (fc1 pre-activation) and ``p`` (fc2 input):

    min  α‖z − (X W1ᵀ + b1)‖² + γ‖p − ReLU(z)‖² + β‖Y − (p W2ᵀ + b2)‖²     W1, W2 in the sparsity pattern

SwiGLU FFN (LLaMA: down(SiLU(gate x) ⊙ up x)), auxiliaries ``z`` (up output), ``s`` (gate output),
``p`` (down input):

    min  α‖z − X W_upᵀ‖² + α‖s − X W_gateᵀ‖² + γ‖p − SiLU(s) ⊙ z‖² + β‖Y − p W_downᵀ‖²

Block-coordinate descent, one round =

1. weights: least-squares refit of each matrix against its current target (float64 Cholesky of the damped
   Gram of its input; skipped in round 0, which starts from the dense weights), then the inner per-matrix
   solver prunes it with that Gram. The new sparse matrix replaces the previous round's only if it is
   better on its own subproblem, so this step never raises the objective;
2. ``p = (βWᵀW + γI)⁻¹(βWᵀ(Y − b) + γ·act)`` (exact, float64 Cholesky);
3. ``z``: ReLU, the better of the branch minimisers ``max((γp + αm)/(γ + α), 0)`` and ``min(m, 0)``;
   SwiGLU, ``(αm + γσp)/(α + γσ²)`` with ``σ = SiLU(s)`` (exact for every α, γ);
4. SwiGLU only: ``s_steps`` safeguarded Gauss-Newton steps on the separable ``α(s − n)² + γ(p − SiLU(s)z)²``,
   each element moving only if its own term falls.

So the recorded objective (after each round's weight step) never increases. What is returned is not the
last round but the round whose pruned weights give the smallest true FFN error ``‖Y − FFN(X)‖²``; round 0 is
the plain layer-wise result (each matrix pruned from its dense weights, fc2/down with the dense activations),
and a last candidate refits and prunes fc2/down on the activations the chosen fc1/up/gate really produce.
Non-finite values never reach the weights: a round producing them ends the loop and the best round stands.
Everything of size T x d_ff is processed in token chunks of ``chunk_tokens``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..patterns import Pattern
from .base import Gram, SolveResult, SolverOptions

InnerSolve = Callable[[Tensor, Gram, float], SolveResult]


class Options(SolverOptions):
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    rounds: int = 4
    s_steps: int = 3
    percdamp: float = 0.01
    chunk_tokens: int = 4096
    refit_down: bool = True


@dataclass
class FFNPruneResult:
    """Pruned matrices by role (``fc1``/``fc2`` or ``up``/``gate``/``down``) and the run's statistics."""

    results: dict[str, SolveResult]
    stats: dict[str, Any] = field(default_factory=dict)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(i + size, n))


def _finite(*tensors: Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _gram(t: Tensor, chunk: int) -> Gram:
    h = torch.zeros(t.shape[1], t.shape[1], dtype=torch.float64, device=t.device)
    total = torch.zeros(t.shape[1], dtype=torch.float64, device=t.device)
    for sl in _chunks(t.shape[0], chunk):
        c = t[sl].double()
        h += c.T @ c
        total += c.sum(0)
    return Gram(h.float(), t.shape[0], total.float())


class _Subproblem:
    """``min_W ‖T − A Wᵀ‖²`` for one matrix, kept as ``AᵀA`` (the Gram) and ``AᵀT``."""

    def __init__(self, gram: Gram, cross: Tensor):
        self.gram = gram
        self.cross = cross  # in x out, float64

    def value(self, w: Tensor) -> float:
        """The objective up to the constant ‖T‖²."""
        w = w.double()
        return float(((w @ self.gram.matrix.double()) * w).sum() - 2 * (w * self.cross.T).sum())

    def ridge(self, percdamp: float) -> Tensor:
        """Damped least-squares solution (out x in, float32), damping raised tenfold until H is PD."""
        damp = percdamp
        for _ in range(6):
            try:
                lower = torch.linalg.cholesky(self.gram.damped(damp, torch.float64))
                return torch.cholesky_solve(self.cross, lower).T.float()
            except torch.linalg.LinAlgError:
                damp *= 10
        raise torch.linalg.LinAlgError("least-squares refit: Gram matrix not positive definite")


def _cross(a: Tensor, t: Tensor, chunk: int, a_shift: Tensor | None = None, t_shift: Tensor | None = None) -> Tensor:
    out = torch.zeros(a.shape[1], t.shape[1], dtype=torch.float64, device=a.device)
    for sl in _chunks(a.shape[0], chunk):
        tc = t[sl].double() if t_shift is None else t[sl].double() - t_shift.double()
        out += a[sl].double().T @ tc
    return out


def _prune(
    sub: _Subproblem, start: Tensor, target: float, inner: InnerSolve, previous: SolveResult | None
) -> tuple[SolveResult, bool]:
    """Prune ``start`` with the inner solver; keep ``previous`` if it is better on this subproblem."""
    res = inner(start, sub.gram, target)
    if not _finite(res.weight):
        if previous is None:
            raise FloatingPointError("inner solver returned non-finite weights")
        return previous, True
    if previous is not None and sub.value(previous.weight) < sub.value(res.weight):
        return previous, True
    return res, False


def _p_update(w_out: Tensor, target: Tensor, act: Tensor, beta: float, gamma: float, chunk: int, out: Tensor) -> None:
    """``p = (β(Y−b)W + γ act)(βWᵀW + γI)⁻¹`` row by row, written into ``out``."""
    w = w_out.double()
    a = beta * (w.T @ w)
    a.diagonal().add_(gamma)
    lower = torch.linalg.cholesky(a)
    for sl in _chunks(out.shape[0], chunk):
        rhs = beta * (target[sl].double() @ w) + gamma * act(sl).double()
        out[sl] = torch.cholesky_solve(rhs.T, lower).T.float()


def _refit_down(
    act: Callable[[slice], Tensor], target: Tensor, shape: torch.Size, sparsity: float, inner: InnerSolve,
    percdamp: float, chunk: int,
) -> SolveResult | None:
    """fc2/down refit by least squares on the activations the pruned fc1/up/gate really produce, then pruned."""
    a = torch.empty(shape, device=target.device)
    for sl in _chunks(shape[0], chunk):
        a[sl] = act(sl)
    sub = _Subproblem(_gram(a, chunk), _cross(a, target, chunk))
    del a
    res = inner(sub.ridge(percdamp), sub.gram, sparsity)
    return res if _finite(res.weight) else None


def _ffn_error(y: Tensor, forward: Callable[[slice], Tensor], chunk: int) -> float:
    err = 0.0
    for sl in _chunks(y.shape[0], chunk):
        err += float((y[sl].double() - forward(sl).double()).pow(2).sum())
    return err


def _check(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y must be tokens x features with equal token counts, got {tuple(x.shape)}, {tuple(y.shape)}")
    if not _finite(x, y):
        raise ValueError("FFN inputs or targets contain NaN/Inf")
    return x.float(), y.float()


def prune_ffn_relu(
    X: Tensor,
    Y: Tensor,
    W1: Tensor,
    b1: Tensor | None,
    W2: Tensor,
    b2: Tensor | None,
    pattern: Pattern,
    target1: float,
    target2: float,
    inner: InnerSolve,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    rounds: int = 4,
    percdamp: float = 0.01,
    chunk_tokens: int = 4096,
    refit_down: bool = True,
    s_steps: int = 0,
) -> FFNPruneResult:
    """SparseLLM on ``Y ≈ ReLU(X W1ᵀ + b1) W2ᵀ + b2``; returns ``fc1`` and ``fc2`` (see module docstring)."""
    x, y = _check(X, Y)
    ch = chunk_tokens
    b1 = torch.zeros(W1.shape[0], device=x.device) if b1 is None else b1.detach().float()
    b2 = torch.zeros(W2.shape[0], device=x.device) if b2 is None else b2.detach().float()
    gx = _gram(x, ch)
    z = torch.empty(x.shape[0], W1.shape[0], device=x.device)
    for sl in _chunks(x.shape[0], ch):
        z[sl] = x[sl] @ W1.detach().float().T + b1
    p = torch.relu(z)
    dense1, dense2 = W1.detach().float(), W2.detach().float()

    def true_error(w1: Tensor, w2: Tensor) -> float:
        return _ffn_error(y, lambda sl: torch.relu(x[sl] @ w1.float().T + b1) @ w2.float().T + b2, ch)

    def objective(w1: Tensor, w2: Tensor) -> float:
        total = 0.0
        for sl in _chunks(x.shape[0], ch):
            m = x[sl] @ w1.float().T + b1
            total += alpha * float((z[sl] - m).double().pow(2).sum())
            total += gamma * float((p[sl] - torch.relu(z[sl])).double().pow(2).sum())
            total += beta * float((y[sl] - b2 - p[sl] @ w2.float().T).double().pow(2).sum())
        return total

    stats: dict[str, Any] = {"objective": [], "ffn_error": [], "refit_down_error": [], "kept_previous": [], "round_s": []}
    res1 = res2 = None
    best: tuple[float, SolveResult, SolveResult, int] | None = None
    for r in range(rounds):
        t0 = time.perf_counter()
        sub1 = _Subproblem(gx, _cross(x, z, ch, t_shift=b1))
        gp = _gram(p, ch)
        sub2 = _Subproblem(gp, _cross(p, y, ch, t_shift=b2))
        start1 = dense1 if r == 0 else sub1.ridge(percdamp)
        start2 = dense2 if r == 0 else sub2.ridge(percdamp)
        if not _finite(start1, start2):
            stats["nonfinite_round"] = r
            break
        res1, kept1 = _prune(sub1, start1, target1, inner, res1)
        res2, kept2 = _prune(sub2, start2, target2, inner, res2)
        w1, w2 = res1.weight.float(), res2.weight.float()
        stats["kept_previous"].append([kept1, kept2])
        stats["objective"].append(objective(w1, w2))
        err = true_error(w1, w2)
        stats["ffn_error"].append(err)
        if best is None or err < best[0]:
            best = (err, res1, res2, r)
        if refit_down:
            cand = _refit_down(lambda sl: torch.relu(x[sl] @ w1.T + b1), y - b2, z.shape, target2, inner, percdamp, ch)
            cand_err = true_error(w1, cand.weight) if cand is not None else float("inf")
            stats["refit_down_error"].append(cand_err)
            if cand_err < best[0]:
                best = (cand_err, res1, cand, f"{r}+refit_down")
        if r < rounds - 1:
            _p_update(w2, y - b2, lambda sl: torch.relu(z[sl]), beta, gamma, ch, p)
            for sl in _chunks(x.shape[0], ch):
                m = x[sl] @ w1.T + b1
                pc = p[sl]
                zp = ((gamma * pc + alpha * m) / (gamma + alpha)).clamp_min(0)
                zn = m.clamp_max(0)
                fp = gamma * (pc - zp).pow(2) + alpha * (zp - m).pow(2)
                fn = gamma * pc.pow(2) + alpha * (zn - m).pow(2)
                z[sl] = torch.where(fp <= fn, zp, zn)
            if not _finite(p, z):
                stats["nonfinite_round"] = r
                break
        stats["round_s"].append(time.perf_counter() - t0)
    if best is None:
        raise FloatingPointError("SparseLLM produced no finite round")
    err, res1, res2, r_best = best
    stats.update(best_round=r_best, final_ffn_error=err, aux_mb=2 * z.numel() * 4 / 2**20)
    return FFNPruneResult({"fc1": res1, "fc2": res2}, stats)


def _silu_grad(s: Tensor) -> Tensor:
    sig = torch.sigmoid(s)
    return sig * (1 + s * (1 - sig))


def _s_steps(s: Tensor, n: Tensor, z: Tensor, p: Tensor, alpha: float, gamma: float, steps: int) -> None:
    """Safeguarded Gauss-Newton on the separable ``α(s−n)² + γ(p − SiLU(s)z)²``, in place."""

    def f(v: Tensor) -> Tensor:
        return alpha * (v - n).pow(2) + gamma * (p - F.silu(v) * z).pow(2)

    for _ in range(steps):
        d = _silu_grad(s)
        res = p - F.silu(s) * z
        grad = 2 * alpha * (s - n) - 2 * gamma * res * z * d
        step = grad / (2 * alpha + 2 * gamma * (z * d).pow(2))
        f0 = f(s)
        moved = torch.zeros_like(s, dtype=torch.bool)
        for scale in (1.0, 0.5, 0.25):
            trial = s - scale * step
            better = ~moved & (f(trial) < f0) & torch.isfinite(trial)
            s.copy_(torch.where(better, trial, s))
            moved |= better


def prune_ffn_swiglu(
    X: Tensor,
    Y: Tensor,
    W_up: Tensor,
    W_gate: Tensor,
    W_down: Tensor,
    pattern: Pattern,
    targets: dict[str, float] | float,
    inner: InnerSolve,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    rounds: int = 4,
    s_steps: int = 3,
    percdamp: float = 0.01,
    chunk_tokens: int = 4096,
    refit_down: bool = True,
) -> FFNPruneResult:
    """SparseLLM on ``Y ≈ (SiLU(X W_gateᵀ) ⊙ X W_upᵀ) W_downᵀ``; returns ``up``, ``gate``, ``down``."""
    x, y = _check(X, Y)
    ch = chunk_tokens
    if not isinstance(targets, dict):
        targets = {"up": targets, "gate": targets, "down": targets}
    gx = _gram(x, ch)
    dense = {"up": W_up.detach().float(), "gate": W_gate.detach().float(), "down": W_down.detach().float()}
    z = torch.empty(x.shape[0], W_up.shape[0], device=x.device)
    s = torch.empty_like(z)
    for sl in _chunks(x.shape[0], ch):
        z[sl] = x[sl] @ dense["up"].T
        s[sl] = x[sl] @ dense["gate"].T
    p = F.silu(s) * z

    def true_error(w: dict[str, Tensor]) -> float:
        return _ffn_error(
            y, lambda sl: (F.silu(x[sl] @ w["gate"].T) * (x[sl] @ w["up"].T)) @ w["down"].T, ch
        )

    def objective(w: dict[str, Tensor]) -> float:
        total = 0.0
        for sl in _chunks(x.shape[0], ch):
            total += alpha * float((z[sl] - x[sl] @ w["up"].T).double().pow(2).sum())
            total += alpha * float((s[sl] - x[sl] @ w["gate"].T).double().pow(2).sum())
            total += gamma * float((p[sl] - F.silu(s[sl]) * z[sl]).double().pow(2).sum())
            total += beta * float((y[sl] - p[sl] @ w["down"].T).double().pow(2).sum())
        return total

    stats: dict[str, Any] = {"objective": [], "ffn_error": [], "refit_down_error": [], "kept_previous": [], "round_s": []}
    res: dict[str, SolveResult | None] = {"up": None, "gate": None, "down": None}
    best: tuple[float, dict[str, SolveResult], Any] | None = None
    for r in range(rounds):
        t0 = time.perf_counter()
        subs = {
            "up": _Subproblem(gx, _cross(x, z, ch)),
            "gate": _Subproblem(gx, _cross(x, s, ch)),
            "down": _Subproblem(_gram(p, ch), _cross(p, y, ch)),
        }
        starts = {k: dense[k] if r == 0 else subs[k].ridge(percdamp) for k in subs}
        if not _finite(*starts.values()):
            stats["nonfinite_round"] = r
            break
        kept = []
        for k in ("up", "gate", "down"):
            res[k], was_kept = _prune(subs[k], starts[k], targets[k], inner, res[k])
            kept.append(was_kept)
        w = {k: v.weight.float() for k, v in res.items()}
        stats["kept_previous"].append(kept)
        stats["objective"].append(objective(w))
        err = true_error(w)
        stats["ffn_error"].append(err)
        if best is None or err < best[0]:
            best = (err, dict(res), r)
        if refit_down:
            cand = _refit_down(
                lambda sl: F.silu(x[sl] @ w["gate"].T) * (x[sl] @ w["up"].T), y, z.shape, targets["down"], inner, percdamp, ch
            )
            cand_err = true_error({**w, "down": cand.weight.float()}) if cand is not None else float("inf")
            stats["refit_down_error"].append(cand_err)
            if cand_err < best[0]:
                best = (cand_err, {**res, "down": cand}, f"{r}+refit_down")
        if r < rounds - 1:
            _p_update(w["down"], y, lambda sl: F.silu(s[sl]) * z[sl], beta, gamma, ch, p)
            for sl in _chunks(x.shape[0], ch):
                sig = F.silu(s[sl])
                m = x[sl] @ w["up"].T
                z[sl] = (alpha * m + gamma * sig * p[sl]) / (alpha + gamma * sig.pow(2))
                _s_steps(s[sl], x[sl] @ w["gate"].T, z[sl], p[sl], alpha, gamma, s_steps)
            if not _finite(p, z, s):
                stats["nonfinite_round"] = r
                break
        stats["round_s"].append(time.perf_counter() - t0)
    if best is None:
        raise FloatingPointError("SparseLLM produced no finite round")
    err, chosen, r_best = best
    stats.update(best_round=r_best, final_ffn_error=err, aux_mb=3 * z.numel() * 4 / 2**20)
    return FFNPruneResult(chosen, stats)
