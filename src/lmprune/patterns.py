"""Sparsity patterns: which entries of a weight matrix may stay non-zero.

Every solver, allocator and refiner speaks this one type. A pattern answers three questions:

* ``keep_mask(scores, sparsity)`` -- the best feasible support for non-negative saliency ``scores``
  (larger = more worth keeping). Applied to ``|values|`` it is the Euclidean projection onto the pattern.
* ``project(values, sparsity)`` -- ``values`` with everything outside ``keep_mask(|values|)`` zeroed.
* ``verify(weight, sparsity)`` -- does a finished matrix satisfy the pattern, and what sparsity did it reach.

Weights are in PyTorch layout ``out x in``. "Input weights" of an output row are its ``in`` entries.

Spec strings (``parse_pattern``):

============================  ====================================================================
``unstructured``              keep the largest ``round((1-s)*out*in)`` scores of the whole matrix
``unstructured:row``          keep the largest ``round((1-s)*in)`` scores of every output row
``N:M`` (e.g. ``2:4``)        keep **N non-zeros** in every group of M consecutive input weights
``block:B`` (e.g. ``block:4``)  keep whole ``B x B`` tiles, the ``round((1-s)*tiles)`` of largest energy
``row`` (alias ``channel``)   keep whole input channels (columns of W, rows of ALPS's ``B = D Wᵀ``)
============================  ====================================================================
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor


class PatternError(ValueError):
    """A pattern that is malformed or cannot be applied to a matrix of the given shape."""


@dataclass(frozen=True)
class PatternCheck:
    """Outcome of :meth:`Pattern.verify`."""

    ok: bool
    achieved_sparsity: float
    detail: str = ""


def _keep_top_k(scores: Tensor, k: int) -> Tensor:
    """Boolean mask with exactly ``k`` True entries at the largest ``scores`` (last dim)."""
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    if scores.numel() == scores.shape[-1] >= _BRACKET_MIN:
        found = _largest_k_bracketed(scores.reshape(-1), k)
        if found is not None:
            return found.reshape(scores.shape)
    idx = torch.topk(scores, k, dim=-1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


_BRACKET_MIN = 1 << 18
_BRACKET_SAMPLE = 1 << 14


def _largest_k_bracketed(flat: Tensor, k: int) -> Tensor | None:
    """Exact top-``k`` mask of a long vector in a few linear passes instead of a full ``topk``.

    A fixed random sample brackets the k-th largest value between ``hi`` and ``lo``; everything above ``hi``
    is kept and the rest is chosen by ``topk`` among the few entries in ``[lo, hi]``. Returns ``None`` when
    the bracket misses (the caller then falls back to ``topk``).
    """
    n = flat.numel()
    gen = torch.Generator(device=flat.device).manual_seed(n)
    sample = flat[torch.randint(n, (_BRACKET_SAMPLE,), generator=gen, device=flat.device)]
    rank = k * _BRACKET_SAMPLE / n
    margin = 4.0 * math.sqrt(rank * (1.0 - k / n)) + 2.0
    top, bottom = int(rank - margin), int(rank + margin)  # 0-based ranks from the largest
    if top < 0 or bottom >= _BRACKET_SAMPLE:
        return None
    hi = sample.kthvalue(_BRACKET_SAMPLE - top).values
    lo = sample.kthvalue(_BRACKET_SAMPLE - bottom).values
    keep = flat > hi
    n_above = int(torch.count_nonzero(keep))
    band = ((flat >= lo) & ~keep).nonzero().squeeze(1)
    if not n_above <= k <= n_above + band.numel():
        return None
    pick = torch.topk(flat[band], k - n_above, sorted=False).indices
    return keep.index_fill_(0, band[pick], True)


def kept_count(total: int, sparsity: float) -> int:
    """Number of entries kept out of ``total`` at ``sparsity`` (rounded to nearest)."""
    return int(round((1.0 - sparsity) * total))


class Pattern(ABC):
    """A set of admissible supports for an ``out x in`` matrix."""

    #: False when the pattern fixes the sparsity itself (N:M), so a layer-wise allocation cannot apply.
    allocatable: bool = True

    @property
    @abstractmethod
    def spec(self) -> str:
        """Canonical spec string, parseable by :func:`parse_pattern`."""

    def validate(self, shape: tuple[int, ...]) -> None:
        """Raise :class:`PatternError` if a matrix of ``shape`` cannot carry this pattern."""
        if len(shape) != 2:
            raise PatternError(f"pattern {self.spec} needs a 2-D weight, got shape {tuple(shape)}")

    def effective_sparsity(self, sparsity: float) -> float:
        """The sparsity this pattern will really produce when asked for ``sparsity``."""
        return sparsity

    @abstractmethod
    def keep_mask(self, scores: Tensor, sparsity: float) -> Tensor:
        """Feasible support maximising the kept score mass (squared scores for grouped patterns)."""

    def project(self, values: Tensor, sparsity: float) -> Tensor:
        """Euclidean projection of ``values`` onto the pattern at ``sparsity``."""
        return values * self.keep_mask(values.abs(), sparsity)

    @abstractmethod
    def verify(self, weight: Tensor, sparsity: float) -> PatternCheck:
        """Check that the zeros of ``weight`` form this pattern at (at least) ``sparsity``."""

    def __str__(self) -> str:
        return self.spec

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)


def _sparsity_of(weight: Tensor) -> float:
    return 1.0 - torch.count_nonzero(weight).item() / weight.numel()


@dataclass(frozen=True, eq=False)
class Unstructured(Pattern):
    """Any support; the comparison group is the whole matrix (``scope='matrix'``) or each output row."""

    scope: str = "matrix"

    def __post_init__(self) -> None:
        if self.scope not in ("matrix", "row"):
            raise PatternError(f"unstructured scope must be 'matrix' or 'row', not {self.scope!r}")

    @property
    def spec(self) -> str:
        return "unstructured" if self.scope == "matrix" else "unstructured:row"

    def keep_mask(self, scores: Tensor, sparsity: float) -> Tensor:
        self.validate(scores.shape)
        if self.scope == "row":
            return _keep_top_k(scores, kept_count(scores.shape[1], sparsity))
        flat = _keep_top_k(scores.reshape(1, -1), kept_count(scores.numel(), sparsity))
        return flat.reshape(scores.shape)

    def verify(self, weight: Tensor, sparsity: float) -> PatternCheck:
        self.validate(weight.shape)
        achieved = _sparsity_of(weight)
        if self.scope == "row":
            limit = kept_count(weight.shape[1], sparsity)
            worst = int(torch.count_nonzero(weight, dim=1).max().item())
            ok = worst <= limit
            detail = "" if ok else f"a row keeps {worst} > {limit} non-zeros"
        else:
            limit = kept_count(weight.numel(), sparsity)
            nnz = int(torch.count_nonzero(weight).item())
            ok = nnz <= limit
            detail = "" if ok else f"{nnz} non-zeros > {limit} allowed"
        return PatternCheck(ok, achieved, detail)


@dataclass(frozen=True, eq=False)
class NM(Pattern):
    """N:M semi-structured: at most ``n`` non-zeros in every group of ``m`` consecutive input weights."""

    n: int
    m: int
    allocatable = False

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m):
            raise PatternError(f"N:M needs 0 < N < M (N = non-zeros kept per group), got {self.n}:{self.m}")

    @property
    def spec(self) -> str:
        return f"{self.n}:{self.m}"

    def validate(self, shape: tuple[int, ...]) -> None:
        super().validate(shape)
        if shape[1] % self.m:
            raise PatternError(f"N:M pattern {self.spec}: input width {shape[1]} is not divisible by M={self.m}")

    def effective_sparsity(self, sparsity: float) -> float:
        return 1.0 - self.n / self.m

    def _groups(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1] // self.m, self.m)

    def keep_mask(self, scores: Tensor, sparsity: float) -> Tensor:
        self.validate(scores.shape)
        return _keep_top_k(self._groups(scores), self.n).reshape(scores.shape)

    def verify(self, weight: Tensor, sparsity: float) -> PatternCheck:
        self.validate(weight.shape)
        per_group = torch.count_nonzero(self._groups(weight), dim=-1)
        worst = int(per_group.max().item())
        ok = worst <= self.n
        detail = "" if ok else f"a group of {self.m} keeps {worst} > {self.n} non-zeros"
        return PatternCheck(ok, _sparsity_of(weight), detail)


def _tile_energy(scores: Tensor, b: int) -> Tensor:
    out, inp = scores.shape
    return scores.float().pow(2).reshape(out // b, b, inp // b, b).sum(dim=(1, 3))


@dataclass(frozen=True, eq=False)
class Block(Pattern):
    """Block sparsity: ``b x b`` tiles are kept or removed whole, by the energy (sum of squares) of their scores."""

    b: int

    def __post_init__(self) -> None:
        if self.b < 1:
            raise PatternError(f"block size must be >= 1, got {self.b}")

    @property
    def spec(self) -> str:
        return f"block:{self.b}"

    def validate(self, shape: tuple[int, ...]) -> None:
        super().validate(shape)
        if shape[0] % self.b or shape[1] % self.b:
            raise PatternError(f"block pattern {self.spec}: shape {tuple(shape)} is not divisible by {self.b}")

    def keep_mask(self, scores: Tensor, sparsity: float) -> Tensor:
        self.validate(scores.shape)
        energy = _tile_energy(scores, self.b)
        tiles = _keep_top_k(energy.reshape(1, -1), kept_count(energy.numel(), sparsity)).reshape(energy.shape)
        return tiles.repeat_interleave(self.b, 0).repeat_interleave(self.b, 1)

    def verify(self, weight: Tensor, sparsity: float) -> PatternCheck:
        self.validate(weight.shape)
        nz = (weight != 0).float()
        tile_nnz = _tile_energy(nz, self.b)  # nz² = nz, so this counts non-zeros per tile
        live = tile_nnz > 0
        limit = kept_count(tile_nnz.numel(), sparsity)
        ok = int(live.sum().item()) <= limit
        detail = "" if ok else f"{int(live.sum())} live tiles > {limit} allowed"
        return PatternCheck(ok, _sparsity_of(weight), detail)


@dataclass(frozen=True, eq=False)
class InputChannel(Pattern):
    """Row sparsity in ALPS's terms: whole input channels (columns of W) are kept or removed."""

    @property
    def spec(self) -> str:
        return "row"

    def keep_mask(self, scores: Tensor, sparsity: float) -> Tensor:
        self.validate(scores.shape)
        energy = scores.float().pow(2).sum(dim=0, keepdim=True)
        cols = _keep_top_k(energy, kept_count(scores.shape[1], sparsity))
        return cols.expand_as(scores).clone()

    def verify(self, weight: Tensor, sparsity: float) -> PatternCheck:
        self.validate(weight.shape)
        live = int((weight != 0).any(dim=0).sum().item())
        limit = kept_count(weight.shape[1], sparsity)
        ok = live <= limit
        detail = "" if ok else f"{live} live input channels > {limit} allowed"
        return PatternCheck(ok, _sparsity_of(weight), detail)


_NM_RE = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(spec: str | Pattern) -> Pattern:
    """Parse a spec string (see module docstring) into a :class:`Pattern`."""
    if isinstance(spec, Pattern):
        return spec
    s = str(spec).strip().lower()
    if s in ("unstructured", "unstructured:matrix"):
        return Unstructured("matrix")
    if s in ("unstructured:row", "unstructured-row"):
        return Unstructured("row")
    if s in ("row", "channel"):
        return InputChannel()
    if s.startswith("block:"):
        size = s.split(":", 1)[1]
        if not size.isdigit():
            raise PatternError(f"block pattern needs an integer size, e.g. block:4; got {spec!r}")
        return Block(int(size))
    m = _NM_RE.match(s)
    if m:
        return NM(int(m.group(1)), int(m.group(2)))
    raise PatternError(
        f"unknown sparsity pattern {spec!r}; use unstructured, unstructured:row, N:M (N kept of M), block:B or row"
    )


def check_sparsity(sparsity: float) -> float:
    """Validate a target sparsity: a finite number in [0, 1)."""
    if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not (0.0 <= sparsity < 1.0):
        raise PatternError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)
