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
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor

from ..patterns import Pattern


class Gram:
    """``H = Σ xxᵀ`` (float32 or float64, ``in x in``) of one input, shared by all linears that read it.

    Solvers derive expensive factorisations from it (a damped Cholesky inverse, an eigendecomposition);
    :meth:`cached` stores them so that q/k/v (or gate/up) pay for them once.
    """

    def __init__(self, matrix: Tensor, n_tokens: int, sum_x: Tensor | None = None, shared_by: int = 1):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Gram matrix must be square, got {tuple(matrix.shape)}")
        self.matrix = matrix
        self.n_tokens = int(n_tokens)
        self.sum_x = sum_x  # Σ x_t, for refiners that need the input mean (DSnoT)
        #: how many matrices read this input (q/k/v: 3); a solver keeps factorisations for later readers only
        #: when there are any
        self.shared_by = int(shared_by)
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
        h = self.matrix.to(dtype, copy=True)  # one copy, also when the dtype changes
        h.diagonal().copy_(self.damped_diagonal(percdamp, dtype))
        return h

    def damped_diagonal(self, percdamp: float, dtype: torch.dtype = torch.float32) -> Tensor:
        """The diagonal of :meth:`damped`, without the matrix."""
        n = self.matrix.shape[0]
        # kept as a strided view, as a matrix's diagonal is: a contiguous vector's mean sums in another order, and
        # its last bit would differ
        diag = torch.zeros(2 * n, dtype=dtype, device=self.matrix.device)[::2]
        diag.copy_(torch.diagonal(self.matrix))
        diag[self.dead()] = 1.0
        return diag.add_(percdamp * torch.mean(diag))

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def release(self) -> None:
        self._cache.clear()


@dataclass
class SolveResult:
    """A pruned weight (same shape and dtype as the input), its support, and solver statistics.

    Once a strategy has measured the result, what it commits (and broadcasts) drops the mask (None)."""

    weight: Tensor
    mask: Tensor | None
    stats: dict[str, Any] = field(default_factory=dict)
    pattern: Pattern | None = None  # set when the solver used a different comparison group than requested


class StageOptions(BaseModel):
    """Validated options of a pipeline stage (solver, refiner, allocator, block method): an unknown name, a value
    outside the field's range, NaN and Inf are errors. Ranges are declared with ``Field(ge=, gt=, le=, lt=)``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SolverOptions(StageOptions):
    """Base for each solver's validated options."""


class OptionsError(ValueError):
    """Options a stage cannot run with; the message is one line naming the option and its valid range."""


def _bounds_text(lower: tuple[str, Any] | None, upper: tuple[str, Any] | None) -> str:
    if lower and upper:
        return f"in {'[' if lower[0] == 'ge' else '('}{lower[1]}, {upper[1]}{']' if upper[0] == 'le' else ')'}"
    if lower:
        return f"{'>=' if lower[0] == 'ge' else '>'} {lower[1]}"
    if upper:
        return f"{'<=' if upper[0] == 'le' else '<'} {upper[1]}"
    return ""


def valid_range(options_cls: type[BaseModel], name: str) -> str:
    """The declared range of one option, e.g. ``in [0, 1)`` or ``>= 1`` ("" when it has none)."""
    info = options_cls.model_fields.get(name)
    lower = upper = None
    for m in info.metadata if info is not None else ():
        for key in ("ge", "gt"):
            if getattr(m, key, None) is not None:
                lower = (key, getattr(m, key))
        for key in ("le", "lt"):
            if getattr(m, key, None) is not None:
                upper = (key, getattr(m, key))
    return _bounds_text(lower, upper)


def options_error(options_cls: type[BaseModel], error: ValidationError, owner: str) -> OptionsError:
    """One line for the first problem of ``error``: which option of ``owner``, its value and what is valid."""
    err = error.errors()[0]
    loc = [str(x) for x in err["loc"]]
    if not loc:  # a check across options (model validator)
        return OptionsError(f"{owner}: {err['msg'].removeprefix('Value error, ')}")
    name = loc[0]
    if err["type"] == "extra_forbidden":
        known = ", ".join(options_cls.model_fields)
        return OptionsError(f"{owner}: unknown option {name!r}; "
                            + (f"choose from {known}" if known else "it takes no options"))
    label = name + "".join(f"[{x}]" for x in loc[1:])
    value = err.get("input")
    ctx = err.get("ctx") or {}
    if len(loc) == 1:
        rng = valid_range(options_cls, name)
    else:  # an element of a tuple option: its own bound, from the error
        rng = _bounds_text(next(((k, ctx[k]) for k in ("ge", "gt") if k in ctx), None),
                           next(((k, ctx[k]) for k in ("le", "lt") if k in ctx), None))
    if err["type"] in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number") and rng:
        return OptionsError(f"{owner}: option {label}={value!r} is out of range: must be {rng}")
    msg = err["msg"].removeprefix("Value error, ")
    return OptionsError(f"{owner}: option {label}={value!r}: {msg}" + (f" (valid range {rng})" if rng else ""))


def validate_options(options_cls: type[BaseModel], values: dict[str, Any] | None, owner: str) -> BaseModel:
    """``options_cls(**values)``, or a one-line :class:`OptionsError` naming the option and its valid range."""
    try:
        return options_cls(**(values or {}))
    except ValidationError as e:
        raise options_error(options_cls, e, owner) from None
    except TypeError as e:  # not a mapping of names
        raise OptionsError(f"{owner}: options must be a mapping of name to value ({e})") from None


def keep_largest(weight: Tensor, pattern: Pattern, sparsity: float, stats: dict[str, Any] | None = None) -> SolveResult:
    """Magnitude's answer: the largest ``|W_ij|`` of each comparison group survive, unchanged."""
    mask = pattern.keep_mask(weight.abs().float(), sparsity)
    return SolveResult(weight * mask, mask, stats or {})


def all_finite(t: Tensor, rows: int = 1024) -> bool:
    """``torch.isfinite(t).all()``, ``rows`` rows at a time. ``torch.isfinite`` forms ``|t|`` and bool tensors of
    ``t``'s size: for a LLaMA-3-70B ``down_proj`` Gram matrix (3.1 GiB) that transient set a Wanda block's peak."""
    if t.dim() < 2 or t.numel() == 0:
        return bool(torch.isfinite(t).all())
    flat = t.reshape(t.shape[0], -1)
    return all(bool(torch.isfinite(flat[i : i + rows]).all()) for i in range(0, flat.shape[0], rows))


def check_finite(solver: str, weight: Tensor, gram: "Gram | None" = None) -> None:
    """Refuse a weight or Gram matrix holding NaN or Inf (one-line ``ValueError``): no solver's answer would mean
    anything, and some would return the input unpruned without a word."""
    for what, t in (("weight", weight), ("Gram matrix", None if gram is None else gram.matrix)):
        if t is None:
            continue
        finite = gram.cached("finite", lambda: all_finite(t)) if what == "Gram matrix" else all_finite(t)
        if not finite:
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{solver}: the {what} ({'x'.join(map(str, t.shape))}) has {bad} NaN or Inf "
                             f"entr{'y' if bad == 1 else 'ies'}")


def zero_gram(gram: "Gram") -> bool:
    """Whether every calibration input was zero (then there is nothing to fit)."""
    return gram.cached("all_zero", lambda: not bool(gram.matrix.any()))


def screen_inputs(solver: str, weight: Tensor, gram: "Gram", pattern: Pattern, sparsity: float) -> SolveResult | None:
    """The checks every calibrated solver shares: refuses non-finite inputs; for a Gram matrix of zeros (the
    inputs never fired: nothing to fit) returns magnitude's answer under ``pattern``. ``None``: go on solving."""
    check_finite(solver, weight, gram)
    if zero_gram(gram):
        return keep_largest(weight, pattern, sparsity,
                            {"zero_gram": "the calibration inputs are all zero: kept the largest weights"})
    return None


class SolveFn(Protocol):
    def __call__(self, weight: Tensor, gram: Gram, pattern: Pattern, sparsity: float, **options: Any) -> SolveResult: ...


def reconstruction_error(
    weight: Tensor, pruned: Tensor, gram: Gram | Tensor, rows: int = 256, cols: int = 2048,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Absolute and relative ``tr((W−Ŵ) H (W−Ŵ)ᵀ)`` and ``/ tr(W H Wᵀ)``: panel products in ``dtype``, their
    sums in float64.

    ``H`` is taken ``cols`` columns at a time and the weights ``rows`` output rows at a time, so the temporaries
    are panels of ``H`` and slices of the weights, never a copy of either whole. The error is formed from
    ``W − Ŵ`` itself (no difference of two large traces), so float32 products keep it to about 1e-6 relative;
    at two ``out · in²`` products per matrix it costs as much as a SparseGPT solve, and float64 products would
    double that on a CPU.
    """
    h = gram.matrix if isinstance(gram, Gram) else gram
    err = ref = 0.0
    for c0 in range(0, h.shape[1], cols):
        panel = h[:, c0 : c0 + cols].to(dtype)
        for start in range(0, weight.shape[0], rows):
            w = weight[start : start + rows].to(dtype)
            delta = w - pruned[start : start + rows].to(dtype)
            both = torch.cat([delta, w]) @ panel  # one product for the error's rows and the reference's
            err += (both[: len(delta)] * delta[:, c0 : c0 + cols]).sum(dtype=torch.float64).item()
            ref += (both[len(delta) :] * w[:, c0 : c0 + cols]).sum(dtype=torch.float64).item()
    return err, (err / ref if ref > 0 else 0.0)
