"""SparseLLM (Bai et al., NeurIPS 2024): joint pruning of one feed-forward block through auxiliary variables.

Tokens are rows: ``X`` (T x d) is the FFN input, ``Y`` (T x d) the dense FFN output to reproduce.

ReLU FFN (OPT: fc1 → ReLU → fc2), auxiliaries ``z`` (fc1 pre-activation) and ``p`` (fc2 input):

    min  α‖z − (X W1ᵀ + b1)‖² + γ‖p − ReLU(z)‖² + β‖Y − (p W2ᵀ + b2)‖²     W1, W2 in the sparsity pattern

SwiGLU FFN (LLaMA: down(SiLU(gate x) ⊙ up x)), auxiliaries ``z`` (up output), ``s`` (gate output),
``p`` (down input):

    min  α‖z − X W_upᵀ‖² + α‖s − X W_gateᵀ‖² + γ‖p − SiLU(s) ⊙ z‖² + β‖Y − p W_downᵀ‖²

Block-coordinate descent from the dense weights and activations; one round =

1. weights: least-squares refit of each matrix against its current target (float64 Cholesky of the damped
   Gram matrix of its input; round 0 starts from the dense weights instead), then the inner per-matrix
   solver prunes it with that Gram matrix. The new sparse matrix replaces the previous round's only if it
   is better on its own subproblem (``keep_better``, the default), so this step never raises the objective;
2. ``p = (β(Y − b)W + γ·act)(βWᵀW + γI)⁻¹`` (exact; the SPD inverse in float64);
3. ``z``: ReLU, the better of the branch minimisers ``max((γp + αm)/(γ + α), 0)`` and ``min(m, 0)``
   (``m = X W1ᵀ + b1``); SwiGLU, ``(αm + γσp)/(α + γσ²)`` with ``σ = SiLU(s)`` (exact for every α, γ);
4. SwiGLU only: ``s_steps`` safeguarded Gauss-Newton steps on the separable ``α(s − n)² + γ(p − SiLU(s)z)²``
   (``n = X W_gateᵀ``), an element moving only if its own term falls.

With ``keep_better`` the objective recorded after each round's weight step therefore never increases. Each
round also offers a second candidate (``refit_down``, the default; not in the reference): fc2/down refit by
least squares and pruned on the activations that the round's pruned fc1/up/gate *really* produce (the
auxiliary ``p`` is only a relaxation of them). With ``select="best"`` (the default; the reference keeps the last
round) the result is the candidate with the smallest true FFN error ``‖Y − FFN(X)‖²``; round 0 without the
refit is exactly the plain layer-wise inner solver (fc2/down pruned from its dense weights on the dense
activations), so the result is never worse than that. Non-finite values never reach the weights: a non-finite solver result is discarded, and a round
producing non-finite auxiliaries ends the loop with the best round standing. All work on T x d_ff arrays
runs in three passes per round over token chunks of ``chunk_tokens``: one measures the round's weights
(objective, FFN error, the down refit's moments), the next updates the auxiliaries, the last gathers the next
round's moments from them, so that no two of the two rounds' ``F × F`` float64 moments, the refit's solve and
the p-update's ``F × F`` inverse are alive together. The auxiliaries
(``tokens × d_ff`` each, the problem's only arrays that grow with the tokens beside ``X`` and ``Y``) are kept in
memory, or with ``aux_dir`` in files there, one token chunk of each in memory at a time; ``X`` and ``Y`` may be
:class:`~lmprune.activations.TokenRows` in files as well (the block strategy's with ``--offload-dir``), and
are read the same way. With ``aux_dir`` the weight step's float64 moments (``AᵀA``, ``d_ff x d_ff`` for the down
projection, and ``AᵀT``) also wait in files there between their uses: in memory they would sit beside the
factorisations that do not read them. The numbers are the same wherever they are kept.

**The reference configuration** (``preset="paper"``, i.e. ``--method-opt preset=paper``) runs the algorithm of
the authors' code (BaiTheBest/SparseLLM) instead of lmprune's additions: no ``refit_down`` candidate, the last
round's weights whatever their error (``select="last"``), every round's pruned matrix taken even when it is
worse on its own subproblem (``keep_better=False``), α = β = γ = 5 (the LLaMA driver's values; the OPT
driver's 0.1 is the same ratio, and only the ratio matters except in the gradient s-step), 4 rounds. What stays
lmprune's, as numerical safety: the least-squares refits are 1%-damped float64 Cholesky solves (the reference:
float16 ``pinv``), ``(βWᵀW + γI)⁻¹`` is factorised in float64, the z-update is the exact one (identical to the
reference's when α = γ, as here), the non-finite guards, and the gate's s-update is lmprune's safeguarded
Gauss-Newton. The reference's s-update, two plain gradient steps of size 0.01 per element (its two epochs over
token chunks, one step per chunk, on a loss that is a sum of per-element terms), is ``s_update="gradient",
s_steps=2``: it diverges wherever ``γ·(SiLU'(s)·z)²`` exceeds about 1/lr, which on SmolLM2-135M happens in block
11's FFN at 80% (its FFN error grows to 2.4e5 × ‖Y‖² and the model's perplexity to ~1e7), so it is kept out of
the preset. The block strategy adds the reference's attention order and its per-layer round counts
(strategies/sparsellm.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from ..activations import Parked, TokenRows, row_slices
from ..gram_sum import add_outer_
from ..patterns import Pattern
from .base import Gram, SolveResult, SolverOptions, all_finite
from .spd import cholesky_, cholesky_inverse_, cholesky_solve

InnerSolve = Callable[[Tensor, Gram, float], SolveResult]


#: Named configurations, applied under the options given explicitly (those win).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "alpha": 5.0, "beta": 5.0, "gamma": 5.0, "rounds": 4, "refit_down": False, "select": "last",
        "keep_better": False,
    },
}


def _apply_preset(data: Any, presets: dict[str, dict[str, Any]]) -> Any:
    """The preset's values under the explicit ones; an unknown name is left to the ``preset`` field's check."""
    if not isinstance(data, dict) or data.get("preset") not in presets:
        return data
    return {**presets[data["preset"]], **data}


def _known_preset(name: Optional[str]) -> Optional[str]:
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return name


class Options(SolverOptions):
    """Only the ratios α : β : γ matter (the objective scales), except for the gradient s-step's fixed step size.
    Defaults measured on SmolLM2-135M FFNs (blocks 2, 15, 27; 70% and 90%; bench/layer/sparsellm_tune.py): γ = 10α = 10β
    with 4 rounds gave the lowest calibration and held-out FFN error; more rounds (8) gave nothing. Equal α, β, γ
    do improve on round 0 without the ``refit_down`` candidate (bench/layer/sparsellm_tune.md measured them with it, and
    there the candidate from round 0 was never beaten); what makes lmprune's defaults better than the reference's
    is mostly ``refit_down`` and ``select="best"`` (bench/RESULTS.md, "Whose gain is it").

    ``preset="paper"`` selects the reference configuration (:data:`PRESETS`); explicit options override it."""

    preset: Optional[str] = None
    alpha: float = Field(1.0, gt=0, allow_inf_nan=False)
    beta: float = Field(1.0, gt=0, allow_inf_nan=False)
    gamma: float = Field(10.0, gt=0, allow_inf_nan=False)
    rounds: int = Field(4, ge=1)
    s_steps: int = Field(3, ge=0)
    s_update: Literal["gauss-newton", "gradient"] = "gauss-newton"
    s_lr: float = Field(0.01, gt=0, allow_inf_nan=False)
    percdamp: float = Field(0.01, ge=0, allow_inf_nan=False)
    chunk_tokens: int = Field(4096, ge=1)
    refit_down: bool = True
    #: ``best``: the round (or refit_down candidate) with the smallest true FFN error; ``last``: the last round's.
    select: Literal["best", "last"] = "best"
    #: Keep the previous round's pruned matrix when the new one is worse on its own subproblem.
    keep_better: bool = True

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return _apply_preset(data, PRESETS)

    @field_validator("preset")
    @classmethod
    def _preset_name(cls, v: Optional[str]) -> Optional[str]:
        return _known_preset(v)


def check_penalties(alpha: float, beta: float, gamma: float) -> None:
    """α, β, γ must be finite and > 0: γ = 0 leaves ``βWᵀW + γI`` singular, α = 0 divides by zero in the
    z- and s-updates, β = 0 drops the output target."""
    for name, v in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"SparseLLM {name} must be finite and > 0, got {v}")


@dataclass
class FFNPruneResult:
    """Pruned matrices by role (``fc1``/``fc2`` or ``up``/``gate``/``down``) and the run's statistics."""

    results: dict[str, SolveResult]
    stats: dict[str, Any] = field(default_factory=dict)


#: Rows per block of the element-wise s-update: a multiple of 128, so that the blocks (and their halves, for
#: two threads) start on vector boundaries and every element takes the same code path as in the whole chunk.
_ELEMENTWISE_ROWS = 512


def _finite(*tensors: Tensor) -> bool:
    return all(all_finite(t) for t in tensors)


def _sq(t: Tensor) -> float:
    return float(t.double().pow_(2).sum())


class _Moments:
    """Running ``Σ aᵀa``, ``Σ a``, ``Σ aᵀt`` and ``Σ‖t‖²`` over token chunks (fp32 products, fp64 sums)."""

    def __init__(self, d_in: int, d_out: int, device: torch.device, gram: bool = True):
        f64 = dict(dtype=torch.float64, device=device)
        self.h = torch.zeros(d_in, d_in, **f64) if gram else None
        self.s = torch.zeros(d_in, **f64)
        self.c = torch.zeros(d_in, d_out, **f64)
        self.tt = 0.0
        self.n = 0

    def add(self, a: Tensor, t: Tensor) -> None:
        # float32 products added into the float64 sums in place (no float64 copy of the product, and the F x F
        # one a panel of rows at a time)
        if self.h is not None:
            add_outer_(self.h, a)
        self.s.add_(a.sum(0))
        self.c.add_(a.T @ t)
        self.tt += _sq(t)
        self.n += a.shape[0]

    def gram(self) -> Gram:
        """The float32 Gram matrix of ``a``, rounded from the float64 sums."""
        return Gram(self.h.float(), self.n, self.s.float())

    def subproblem(self, park: str | None, inputs: tuple[Gram, Parked] | None = None) -> "_Subproblem":
        """This matrix's subproblem, its float64 matrices in files under ``park`` (None: in memory). ``inputs``:
        the Gram matrix it shares with the other matrices reading the same inputs (float32, and float64 as
        :meth:`_AuxState.input_gram` gives it); without it, its own from these sums."""
        gram, h64 = inputs if inputs is not None else (self.gram(), Parked(self.h, park))
        return _Subproblem(gram, Parked(self.c, park), self.tt, h64)


class _Subproblem:
    """``min_W ‖T − A Wᵀ‖²`` for one matrix, kept as the Gram matrix ``AᵀA`` (float32, for the inner solver and
    the refit, and float64, for :meth:`value`), ``AᵀT`` (float64) and ``‖T‖²``.

    The float64 matrices are :class:`Parked`: in files between their uses when the problem has a directory for
    them (for ``down``, ``AᵀA`` is ``d_ff x d_ff``: 6.3 GiB at LLaMA-3-70B's width). The float32 Gram matrix
    goes once the inner solver has pruned the matrix (:meth:`drop_gram`)."""

    def __init__(self, gram: Gram, cross: Parked, tt: float, h64: Parked):
        self.gram: Gram | None = gram
        self.tt = tt
        self._cross = cross  # in x out
        self._h64 = h64

    def drop_gram(self) -> None:
        """Let the float32 Gram matrix (and what the inner solver cached on it) go: only :meth:`value` is left."""
        self.gram = None

    def value(self, w: Tensor) -> float:
        w = w.double()
        quad = (w @ self._h64.get()).mul_(w).sum()  # in place: one out x in float64 temporary beside w, not two
        return self.tt + float(quad - 2 * (w * self._cross.get().T).sum())

    def ridge(self, percdamp: float) -> Tensor:
        """Damped least-squares solution (out x in, float32); damping raised tenfold until H is PD."""
        damp = percdamp
        for _ in range(6):
            lower, info = cholesky_(self.gram.damped(damp, torch.float64))  # in place on the CPU (:mod:`.spd`)
            if info == 0:
                return cholesky_solve(self._cross.get(), lower).T.float()  # reads the factor in place
            del lower
            damp = damp * 10 if damp > 0 else 1e-6
        raise torch.linalg.LinAlgError("least-squares refit: Gram matrix not positive definite")


def _spd_inverse(w_out: Tensor, beta: float, gamma: float) -> Tensor:
    """``(βWᵀW + γI)⁻¹`` in float32, factorised in float64 (γ > 0 keeps it SPD)."""
    w = w_out.double()
    a = (w.T @ w).mul_(beta)
    del w
    a.diagonal().add_(gamma)
    lower, info = cholesky_(a)  # in a's own buffer on the CPU (:mod:`.spd`): one float64 in x in matrix alive
    del a
    if info != 0:
        raise torch.linalg.LinAlgError(f"βWᵀW + γI not positive definite (γ = {gamma:g})")
    return cholesky_inverse_(lower).float()


@dataclass
class _Sweep:
    objective: float
    error: float
    refit: _Moments | None


class _AuxState:
    """The auxiliaries of an FFN problem, ``tokens x d_ff`` each, kept as :class:`TokenRows` (in memory, or in
    files under ``aux_dir`` with one token chunk in memory at a time)."""

    aux: tuple[TokenRows, ...] = ()
    ch: int
    #: Whether every chunk written so far was finite (checked as it is written, not by reading them all back).
    finite: bool = True
    #: Where the subproblems' float64 matrices wait between their uses (``aux_dir``; None: in memory).
    park: str | None = None

    def aux_mb(self) -> float:
        return sum(a.shape[0] * a.shape[1] for a in self.aux) * 4 / 2**20

    def close(self) -> None:
        for a in self.aux:
            a.close()

    def _start(self) -> None:
        """The first pass over the tokens (:meth:`_first_pass`: the dense auxiliaries, the inputs' Gram matrix and
        the first round's moments); the auxiliaries are released if it fails (non-finite inputs, I/O)."""
        try:
            self._first_pass()
        except BaseException:
            self.close()
            raise
        self.gram_x = self.gx.gram()

    def update(self, w: dict[str, Tensor]) -> None:
        """Steps 2-4 of a round with the weights ``w`` (:meth:`_update_aux`), then the next weight step's moments
        from the new auxiliaries (:meth:`_gather`): two passes over the tokens, so that the ``F x F`` inverse of
        the p-update and the next round's ``F x F`` float64 moments are never alive together. The moments are
        those one pass would give, bit for bit: the same chunks, read back as they were written."""
        self._update_aux(w)
        self._gather()

    def input_gram(self) -> tuple[Gram, Parked]:
        """The inputs' Gram matrix for the matrices that read ``X``: float32, and float64 for their subproblems'
        values (the float32 matrix widened, once for all of them, and parked under :attr:`park`)."""
        return self.gram_x, Parked(self.gram_x.matrix.double(), self.park)


class _ReluFFN(_AuxState):
    """State of the ReLU problem: data, auxiliaries ``z``, ``p`` and the moments for the next weight step."""

    roles = ("fc1", "fc2")
    down = "fc2"

    def __init__(self, data: "FFNData", opt: "Options", aux_dir: str | None = None):
        x, y, chunk = data.x, data.y, opt.chunk_tokens
        w1, w2, b1, b2 = data.weights["fc1"], data.weights["fc2"], data.biases.get("fc1"), data.biases.get("fc2")
        self.x, self.y, self.ch = x, y, chunk
        self.alpha, self.beta, self.gamma = opt.alpha, opt.beta, opt.gamma
        dev = x.device
        self.b1 = torch.zeros(w1.shape[0], device=dev) if b1 is None else b1.detach().float()
        self.b2 = torch.zeros(w2.shape[0], device=dev) if b2 is None else b2.detach().float()
        self.dense = {"fc1": w1.detach(), "fc2": w2.detach()}  # as given: float32 copies only where used
        self.z, self.p = (TokenRows(x.shape[0], w1.shape[0], dev, aux_dir) for _ in range(2))
        self.park = aux_dir
        self.aux = (self.z, self.p)
        self.gx = _Moments(x.shape[1], 0, dev)
        self.next = self._fresh(dev)
        self._start()

    def _first_pass(self) -> None:
        x, y, w1 = self.x, self.y, self.dense["fc1"].float()
        for sl in row_slices(x.shape[0], self.ch):
            xc, yc = _inputs(x, y, sl)
            zc = self.z.write(sl, xc @ w1.T + self.b1)
            self.gx.add(xc, xc[:, :0])
            pc = self.p.write(sl, torch.relu(zc))
            self.finite &= _finite(zc)
            self.next["fc2"].add(pc, yc - self.b2)
            del xc, yc, zc, pc

    def _fresh(self, dev) -> dict[str, _Moments]:
        d, dff = self.x.shape[1], self.dense["fc1"].shape[0]
        return {"fc1": _Moments(d, dff, dev, gram=False), "fc2": _Moments(dff, self.y.shape[1], dev)}

    def subproblems(self) -> dict[str, _Subproblem]:
        return {"fc1": self.next["fc1"].subproblem(self.park, self.input_gram()),
                "fc2": self.next["fc2"].subproblem(self.park)}

    def measure(self, w: dict[str, Tensor], refit: bool) -> _Sweep:
        x, y, z, p, b1, b2 = self.x, self.y, self.z, self.p, self.b1, self.b2
        al, be, ga = self.alpha, self.beta, self.gamma
        w1, w2 = w["fc1"].float(), w["fc2"].float()
        ref = _Moments(w1.shape[0], y.shape[1], x.device) if refit else None
        obj = err = 0.0
        for sl in row_slices(x.shape[0], self.ch):
            tc = y.read(sl) - b2
            m = x.read(sl) @ w1.T + b1
            act = torch.relu(m)
            err += _sq(tc - act @ w2.T)
            if ref is not None:
                ref.add(act, tc)
            zc, pc = z.read(sl), p.read(sl)
            obj += al * _sq(zc - m) + ga * _sq(pc - torch.relu(zc)) + be * _sq(tc - pc @ w2.T)
        return _Sweep(obj, err, ref)

    def _update_aux(self, w: dict[str, Tensor]) -> None:
        x, y, z, p, b1, b2 = self.x, self.y, self.z, self.p, self.b1, self.b2
        al, be, ga = self.alpha, self.beta, self.gamma
        w1, w2 = w["fc1"].float(), w["fc2"].float()
        self.finite = True  # every chunk is rewritten below
        a_inv = _spd_inverse(w2, be, ga)
        for sl in row_slices(x.shape[0], self.ch):
            xc, tc = x.read(sl), y.read(sl) - b2
            zc = z.read(sl)
            # p = (β·T W2 + γ·ReLU(z)) (βW2ᵀW2 + γI)⁻¹, then z the better branch: element for element the same
            # operations in the same order, in place where a temporary was, and m formed only once p is
            rhs = (tc @ w2).mul_(be)
            rhs.add_(torch.relu(zc).mul_(ga))
            pc = rhs @ a_inv
            del rhs
            m = xc @ w1.T + b1
            zp = (pc * ga).add_(m * al).div_(ga + al).clamp_min_(0)
            zn = m.clamp_max(0)
            pos = (pc - zp).pow_(2).mul_(ga).add_((zp - m).pow_(2).mul_(al))
            neg = pc.pow(2).mul_(ga).add_((zn - m).pow_(2).mul_(al))
            keep_pos = pos <= neg
            del pos, neg, m
            zc = torch.where(keep_pos, zp, zn)
            del zp, zn, keep_pos
            pc, zc = p.write(sl, pc), z.write(sl, zc)
            self.finite &= _finite(pc, zc)

    def _gather(self) -> None:
        x, y, b1, b2 = self.x, self.y, self.b1, self.b2
        self.next = self._fresh(x.device)
        for sl in row_slices(x.shape[0], self.ch):
            self.next["fc1"].add(x.read(sl), self.z.read(sl) - b1)
            self.next["fc2"].add(self.p.read(sl), y.read(sl) - b2)


def _silu_grad(s: Tensor) -> Tensor:
    sig = torch.sigmoid(s)
    return sig * (1 + s * (1 - sig))


def _s_gradient(s: Tensor, n: Tensor, z: Tensor, p: Tensor, alpha: float, gamma: float, steps: int,
                lr: float) -> Tensor:
    """The reference's s-update: plain gradient steps of size ``lr`` on ``α(s−n)² + γ(p − SiLU(s)z)²``. The
    reference takes one step per token chunk per epoch on the chunk's summed loss; the loss is a sum of
    per-element terms, so that is ``steps`` (= epochs) element-wise steps."""
    for _ in range(steps):
        grad = 2 * alpha * (s - n) - 2 * gamma * (p - F.silu(s) * z) * _silu_grad(s) * z
        s = s - lr * grad
    return s


def _s_steps(s: Tensor, n: Tensor, z: Tensor, p: Tensor, alpha: float, gamma: float, steps: int) -> Tensor:
    """Safeguarded Gauss-Newton on the separable ``α(s−n)² + γ(p − SiLU(s)z)²``; returns the new ``s``."""

    def f(v: Tensor) -> Tensor:
        return alpha * (v - n).pow(2) + gamma * (p - F.silu(v) * z).pow(2)

    for _ in range(steps):
        d = _silu_grad(s) * z
        grad = 2 * alpha * (s - n) - 2 * gamma * (p - F.silu(s) * z) * d
        step = grad / (2 * alpha + 2 * gamma * d.pow(2))
        f0 = f(s)
        moved = torch.zeros_like(s, dtype=torch.bool)
        for scale in (1.0, 0.5, 0.25):
            trial = s - scale * step
            better = ~moved & (f(trial) < f0)
            s = torch.where(better, trial, s)
            moved |= better
    return s


class _SwiGLUFFN(_AuxState):
    """State of the SwiGLU problem: data, auxiliaries ``z``, ``s``, ``p`` and the next weight step's moments."""

    roles = ("up", "gate", "down")
    down = "down"

    def __init__(self, data: "FFNData", opt: "Options", aux_dir: str | None = None):
        x, y, chunk = data.x, data.y, opt.chunk_tokens
        self.x, self.y, self.ch, self.s_steps = x, y, chunk, opt.s_steps
        self.s_update, self.s_lr = opt.s_update, opt.s_lr
        self.alpha, self.beta, self.gamma = opt.alpha, opt.beta, opt.gamma
        dev = x.device
        self.dense = {k: data.weights[k].detach() for k in ("up", "gate", "down")}  # float32 only where used
        dff = self.dense["up"].shape[0]
        self.z, self.s, self.p = (TokenRows(x.shape[0], dff, dev, aux_dir) for _ in range(3))
        self.park = aux_dir
        self.aux = (self.z, self.s, self.p)
        self.gx = _Moments(x.shape[1], 0, dev)
        self.next = self._fresh(dev)
        self._start()

    def _first_pass(self) -> None:
        x, y, wu, wg = self.x, self.y, self.dense["up"].float(), self.dense["gate"].float()
        for sl in row_slices(x.shape[0], self.ch):
            xc, yc = _inputs(x, y, sl)
            zc = self.z.write(sl, xc @ wu.T)
            sc = self.s.write(sl, xc @ wg.T)
            pc = self.p.write(sl, F.silu(sc) * zc)
            self.finite &= _finite(zc, sc, pc)
            self.gx.add(xc, xc[:, :0])
            self.next["down"].add(pc, yc)
            del xc, yc, zc, sc, pc

    def _fresh(self, dev) -> dict[str, _Moments]:
        d, dff = self.x.shape[1], self.dense["up"].shape[0]
        return {
            "up": _Moments(d, dff, dev, gram=False),
            "gate": _Moments(d, dff, dev, gram=False),
            "down": _Moments(dff, self.y.shape[1], dev),
        }

    def subproblems(self) -> dict[str, _Subproblem]:
        inputs = self.input_gram()
        return {
            "up": self.next["up"].subproblem(self.park, inputs),
            "gate": self.next["gate"].subproblem(self.park, inputs),
            "down": self.next["down"].subproblem(self.park),
        }

    def measure(self, w: dict[str, Tensor], refit: bool) -> _Sweep:
        x, y, z, s, p = self.x, self.y, self.z, self.s, self.p
        al, be, ga = self.alpha, self.beta, self.gamma
        wu, wg, wd = w["up"].float(), w["gate"].float(), w["down"].float()
        ref = _Moments(wu.shape[0], y.shape[1], x.device) if refit else None
        obj = err = 0.0
        for sl in row_slices(x.shape[0], self.ch):
            xc, yc = x.read(sl), y.read(sl)
            m, n = xc @ wu.T, xc @ wg.T
            act = F.silu(n) * m
            err += _sq(yc - act @ wd.T)
            if ref is not None:
                ref.add(act, yc)
            del act
            zc, sc, pc = z.read(sl), s.read(sl), p.read(sl)
            obj += al * (_sq(zc - m) + _sq(sc - n)) + ga * _sq(pc - F.silu(sc) * zc) + be * _sq(yc - pc @ wd.T)
        return _Sweep(obj, err, ref)

    def _s_update(self, s: Tensor, n: Tensor, z: Tensor, p: Tensor) -> Tensor:
        if self.s_update == "gradient":
            return _s_gradient(s, n, z, p, self.alpha, self.gamma, self.s_steps, self.s_lr)
        return _s_steps(s, n, z, p, self.alpha, self.gamma, self.s_steps)

    def _update_aux(self, w: dict[str, Tensor]) -> None:
        x, y, z, s, p = self.x, self.y, self.z, self.s, self.p
        al, be, ga = self.alpha, self.beta, self.gamma
        wu, wg, wd = w["up"].float(), w["gate"].float(), w["down"].float()
        self.finite = True  # every chunk is rewritten below
        a_inv = _spd_inverse(wd, be, ga)
        for sl in row_slices(x.shape[0], self.ch):
            xc, yc = x.read(sl), y.read(sl)
            zc, sc = z.read(sl), s.read(sl)
            sig = F.silu(sc)
            # pc = (β·Y W + γ·σ⊙z) (βWᵀW + γI)⁻¹ and z = (α·m + γ·σ⊙p) / (α + γ·σ²), element for element the same
            # operations in the same order, in place, and m, n formed only where they are needed: three chunk x
            # d_ff temporaries fewer at the pass's peak
            rhs = (yc @ wd).mul_(be)
            rhs.add_((sig * ga).mul_(zc))
            pc = rhs @ a_inv
            del rhs
            m = xc @ wu.T
            zc = m.mul_(al).add_((sig * ga).mul_(pc)).div_(sig.pow_(2).mul_(ga).add_(al))
            del m, sig
            n = xc @ wg.T
            pc, zc = p.write(sl, pc), z.write(sl, zc)  # in memory, the stored rows: the chunk's copies are freed
            # element-wise, so row blocks give the whole chunk's bits with a fraction of its temporaries
            for rows in row_slices(sc.shape[0], _ELEMENTWISE_ROWS):
                sc[rows] = self._s_update(sc[rows], n[rows], zc[rows], pc[rows])
            s.write(sl, sc)
            self.finite &= _finite(zc, sc, pc)

    def _gather(self) -> None:
        x, y = self.x, self.y
        self.next = self._fresh(x.device)
        for sl in row_slices(x.shape[0], self.ch):
            xc = x.read(sl)
            self.next["up"].add(xc, self.z.read(sl))
            self.next["gate"].add(xc, self.s.read(sl))
            self.next["down"].add(self.p.read(sl), y.read(sl))


def _prune(
    sub: _Subproblem, start: Tensor, target: float, inner: InnerSolve, previous: SolveResult | None,
    keep_better: bool = True,
) -> tuple[SolveResult, bool]:
    """Prune ``start`` with the inner solver; keep ``previous`` if the new result is non-finite or (with
    ``keep_better``) worse on this subproblem."""
    res = inner(start, sub.gram, target)
    sub.drop_gram()
    if not _finite(res.weight):
        if previous is None:
            raise FloatingPointError("inner solver returned non-finite weights for the dense start")
        return previous, True
    if keep_better and previous is not None and sub.value(previous.weight) < sub.value(res.weight):
        return previous, True
    return res, False


def _refit_down(sub: _Subproblem, inner: InnerSolve, target: float,
                percdamp: float) -> tuple[SolveResult | None, float]:
    """The down projection refitted to the pruned activations (least squares on their subproblem ``sub``), pruned
    by the inner solver, and its error on that subproblem (``inf`` when it fails)."""
    try:
        cand = inner(sub.ridge(percdamp), sub.gram, target)
        sub.drop_gram()
        return cand, (sub.value(cand.weight) if _finite(cand.weight) else float("inf"))
    except torch.linalg.LinAlgError:
        return None, float("inf")


class _Candidate:
    """The best pruned matrices so far (a round's, or a round's with the refitted down projection), their FFN
    error and label. With ``park`` (``aux_dir``) their weights and masks wait in files there: the later rounds
    make new matrices while these may be the ones returned (each ``d_ff x d`` float32: 0.9 GiB at 70B shape)."""

    def __init__(self, error: float, results: dict[str, SolveResult], label: Any, park: str | None):
        self.error, self.label, self._park = error, label, park
        self._kept = {k: (Parked(v.weight, park), None if v.mask is None else Parked(v.mask, park), v.stats,
                          v.pattern) for k, v in results.items()}

    def replacing(self, key: str, result: SolveResult, error: float, label: Any) -> "_Candidate":
        """This candidate with ``key``'s matrix replaced (the refitted down projection beside the round's other
        matrices): the others' parked files are shared, not written again."""
        new = _Candidate(error, {key: result}, label, self._park)
        new._kept = {**self._kept, **new._kept}
        return new

    def results(self) -> dict[str, SolveResult]:
        return {k: SolveResult(w.get(), None if m is None else m.get(), stats, pattern)
                for k, (w, m, stats, pattern) in self._kept.items()}


def _run(ffn, targets: dict[str, float], inner: InnerSolve, opt: "Options") -> FFNPruneResult:
    try:
        return _rounds(ffn, targets, inner, opt)
    finally:
        ffn.close()


def _rounds(ffn, targets: dict[str, float], inner: InnerSolve, opt: "Options") -> FFNPruneResult:
    rounds, percdamp, refit_down, select, keep_better = (opt.rounds, opt.percdamp, opt.refit_down, opt.select,
                                                         opt.keep_better)
    stats: dict[str, Any] = {k: [] for k in ("objective", "ffn_error", "refit_down_error", "kept_previous", "round_s")}
    res: dict[str, SolveResult | None] = {k: None for k in ffn.roles}
    best: _Candidate | None = None
    for r in range(max(1, rounds)):
        t0 = time.perf_counter()
        subs = ffn.subproblems()
        ffn.next = None  # the spent moments now live in the subproblems alone: each goes once its matrix is pruned
        # the refits: the down projection's F x F factorisation first, before the other starts exist (the order
        # changes no bit); round 0 starts from the dense weights, made float32 one at a time as they are pruned
        order = (ffn.down, *(k for k in ffn.roles if k != ffn.down))
        try:
            starts = {k: subs[k].ridge(percdamp) for k in order} if r else {}
        except torch.linalg.LinAlgError:
            stats["stopped"] = f"round {r}: least-squares refit failed"
            break
        if not _finite(*starts.values()):
            stats["stopped"] = f"round {r}: non-finite least-squares refit"
            break
        kept = []
        for k in ffn.roles:
            start = starts.pop(k) if r else ffn.dense[k].float()
            res[k], was_kept = _prune(subs.pop(k), start, targets[k], inner, res[k], keep_better)
            del start
            kept.append(was_kept)
        stats["kept_previous"].append(kept)
        weights = {k: v.weight for k, v in res.items()}
        sweep = ffn.measure(weights, refit=refit_down)
        stats["objective"].append(sweep.objective)
        stats["ffn_error"].append(sweep.error)
        if best is None or select == "last" or sweep.error < best.error:
            best = _Candidate(sweep.error, res, r, ffn.park)
        if sweep.refit is not None:
            refit, sweep.refit = sweep.refit.subproblem(ffn.park), None  # the moments live on in it alone
            cand, cand_err = _refit_down(refit, inner, targets[ffn.down], percdamp)
            del refit
            stats["refit_down_error"].append(cand_err)
            if cand_err < best.error:  # this round's own candidate, if best, already parked the other matrices
                best = (best.replacing(ffn.down, cand, cand_err, f"{r}+refit_down") if best.label == r
                        else _Candidate(cand_err, {**res, ffn.down: cand}, f"{r}+refit_down", ffn.park))
            del cand
        del sweep  # the refit moments, before the update builds the next round's
        if r < rounds - 1:
            ffn.update(weights)
        del weights
        stats["round_s"].append(time.perf_counter() - t0)
        if not ffn.finite:
            stats["stopped"] = f"round {r}: non-finite auxiliary variables"
            break
    res = None  # the last round's matrices, before the chosen ones are read back
    err, chosen, r_best = best.error, best.results(), best.label  # round 0 always yields a finite one or raised
    target_norm = sum(_sq(ffn.y.read(sl)) for sl in row_slices(ffn.y.shape[0], ffn.ch))  # by chunks, as Y is kept
    stats.update(best_round=r_best, final_ffn_error=err, target_norm=target_norm,
                 aux_mb=ffn.aux_mb())
    return FFNPruneResult(chosen, stats)


def _inputs(x: TokenRows, y: TokenRows, rows: slice) -> tuple[Tensor, Tensor]:
    """One token chunk of the FFN's inputs and targets, refused if not finite (checked as the first pass reads
    them, chunk by chunk, rather than on a whole copy)."""
    xc, yc = x.read(rows), y.read(rows)
    if not _finite(xc, yc):
        raise ValueError(f"FFN inputs or targets contain NaN/Inf (tokens {rows.start}:{rows.stop})")
    return xc, yc


def _rows(t: Tensor | TokenRows) -> TokenRows:
    return t if isinstance(t, TokenRows) else TokenRows.holding(t.float())


@dataclass
class FFNData:
    """A feed-forward part to prune: its calibration inputs ``x`` (tokens × d), the outputs ``y`` it should keep
    producing (tokens × d), each a tensor or :class:`~lmprune.activations.TokenRows` (in memory or in a file, read
    a token chunk at a time; the caller closes them), its dense weights by role -- ``fc1``/``fc2`` (ReLU) or
    ``up``/``gate``/``down`` (SwiGLU), each ``out x in``, in any floating dtype (the solver makes float32 copies
    where it uses them) -- and its biases by role (kept fixed; absent means none)."""

    x: Tensor | TokenRows
    y: Tensor | TokenRows
    weights: dict[str, Tensor]
    biases: dict[str, Tensor | None] = field(default_factory=dict)

    @classmethod
    def relu(cls, x: Tensor, y: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> "FFNData":
        return cls(x, y, {"fc1": w1, "fc2": w2}, {"fc1": b1, "fc2": b2})

    @classmethod
    def swiglu(cls, x: Tensor, y: Tensor, w_up: Tensor, w_gate: Tensor, w_down: Tensor) -> "FFNData":
        return cls(x, y, {"up": w_up, "gate": w_gate, "down": w_down})

    def checked(self) -> "FFNData":
        """``x`` and ``y`` as :class:`TokenRows` (a tensor is held, not copied) with equal token counts; their
        finiteness is checked chunk by chunk by the solver's first pass."""
        if any(len(t.shape) != 2 for t in (self.x, self.y)) or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"X and Y must be tokens x features with equal token counts, got "
                             f"{tuple(self.x.shape)}, {tuple(self.y.shape)}")
        return FFNData(_rows(self.x), _rows(self.y), self.weights, self.biases)


def _targets(targets: dict[str, float] | float, roles: tuple[str, ...]) -> dict[str, float]:
    """One sparsity for every role, or one per role."""
    return dict(targets) if isinstance(targets, dict) else {k: float(targets) for k in roles}


def prune_ffn_relu(data: FFNData, pattern: Pattern, targets: dict[str, float] | float, inner: InnerSolve,
                   aux_dir: str | None = None, **options: Any) -> FFNPruneResult:
    """SparseLLM on ``Y ≈ ReLU(X W1ᵀ + b1) W2ᵀ + b2`` (biases fixed); returns ``fc1`` and ``fc2``.

    ``targets`` is one sparsity or one per role; ``inner(weight, gram, target)`` prunes one matrix into
    ``pattern``; ``options`` are :class:`Options` (the s-step options are unused: no gate)."""
    opt = Options(**options)
    check_penalties(opt.alpha, opt.beta, opt.gamma)
    return _run(_ReluFFN(data.checked(), opt, aux_dir), _targets(targets, _ReluFFN.roles), inner, opt)


def prune_ffn_swiglu(data: FFNData, pattern: Pattern, targets: dict[str, float] | float, inner: InnerSolve,
                     aux_dir: str | None = None, **options: Any) -> FFNPruneResult:
    """SparseLLM on ``Y ≈ (SiLU(X W_gateᵀ) ⊙ X W_upᵀ) W_downᵀ``; returns ``up``, ``gate``, ``down``.

    ``targets`` is one sparsity or one per role; ``inner(weight, gram, target)`` prunes one matrix into
    ``pattern``; ``options`` are :class:`Options`."""
    opt = Options(**options)
    check_penalties(opt.alpha, opt.beta, opt.gamma)
    return _run(_SwiGLUFFN(data.checked(), opt, aux_dir), _targets(targets, _SwiGLUFFN.roles), inner, opt)
