"""The per-matrix solver contract shared by every pruning method.

A solver is a pure tensor function

    solve(weight, gram, pattern, sparsity, **options) -> SolveResult

that approximately minimises the layer-wise reconstruction error

    ‖X Wᵀ − X Ŵᵀ‖²_F = tr((W − Ŵ) H (W − Ŵ)ᵀ),   H = Σ_t x_t x_tᵀ = XᵀX,

over ``Ŵ`` in the support set of ``pattern`` at ``sparsity``. It never touches a model, hooks or devices:
it computes on whatever device its inputs live on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from ..patterns import Pattern


class Gram:
    """``H = Σ xxᵀ`` (float32 or float64, ``in x in``) of one input, shared by all linears that read it.

    Solvers derive expensive factorisations from it (a damped Cholesky inverse, an eigendecomposition);
    :meth:`cached` stores them so that q/k/v (or gate/up) pay for them once.
    """

    def __init__(self, matrix: Tensor, n_tokens: int, sum_x: Tensor | None = None):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Gram matrix must be square, got {tuple(matrix.shape)}")
        self.matrix = matrix
        self.n_tokens = int(n_tokens)
        self.sum_x = sum_x  # Σ x_t, for refiners that need the input mean (DSnoT)
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_inputs(cls, x: Tensor) -> "Gram":
        """Gram matrix of the rows of ``x`` (tokens x in), accumulated in float32."""
        x = x.reshape(-1, x.shape[-1]).float()
        return cls(x.T @ x, x.shape[0], x.sum(0))

    @property
    def mean(self) -> Tensor:
        """E[x_j] over calibration tokens."""
        if self.sum_x is None:
            raise ValueError("this Gram was built without Σx; the input mean is unavailable")
        return self.sum_x / max(self.n_tokens, 1)

    @property
    def variance(self) -> Tensor:
        """Var[x_j] = E[x_j²] − E[x_j]²."""
        return (self.diag / max(self.n_tokens, 1) - self.mean.pow(2)).clamp_min(0)

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    @property
    def diag(self) -> Tensor:
        return torch.diagonal(self.matrix)

    def column_norms(self) -> Tensor:
        """‖X_j‖₂ for every input feature j (Wanda's activation norm)."""
        return self.diag.clamp_min(0).sqrt()

    def dead(self) -> Tensor:
        """Input features that never fired on the calibration data."""
        return self.diag == 0

    def damped(self, percdamp: float, dtype: torch.dtype = torch.float32) -> Tensor:
        """``H + λI`` with ``λ = percdamp · mean(diag H)``; dead inputs get a unit diagonal."""
        h = self.matrix.to(dtype).clone()
        dead = self.dead()
        h[dead, dead] = 1.0
        lam = percdamp * torch.mean(torch.diagonal(h))
        h.diagonal().add_(lam)
        return h

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def release(self) -> None:
        self._cache.clear()


@dataclass
class SolveResult:
    """A pruned weight (same shape and dtype as the input), its support, and solver statistics."""

    weight: Tensor
    mask: Tensor
    stats: dict[str, Any] = field(default_factory=dict)
    pattern: Pattern | None = None  # set when the solver used a different comparison group than requested


class SolverOptions(BaseModel):
    """Base for each solver's validated options; unknown options are an error."""

    model_config = ConfigDict(extra="forbid")


class SolveFn(Protocol):
    def __call__(self, weight: Tensor, gram: Gram, pattern: Pattern, sparsity: float, **options: Any) -> SolveResult: ...


def reconstruction_error(weight: Tensor, pruned: Tensor, gram: Gram | Tensor) -> tuple[float, float]:
    """Absolute and relative ``tr((W−Ŵ) H (W−Ŵ)ᵀ)`` and ``/ tr(W H Wᵀ)``, computed in float64."""
    h = (gram.matrix if isinstance(gram, Gram) else gram).double()
    w = weight.double()
    delta = w - pruned.double()
    err = ((delta @ h) * delta).sum().item()
    ref = ((w @ h) * w).sum().item()
    return err, (err / ref if ref > 0 else 0.0)
