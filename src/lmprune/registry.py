"""Every plug-in of lmprune, by name, in one place: solvers, block methods, refiners and allocators.

A plug-in is a module with an ``Options`` pydantic model (its validated options) and one entry function:

=============  =========================================  ===============================================
kind           entry                                      contract
=============  =========================================  ===============================================
solver         ``solve(W, gram, pattern, s, **opts)``     pure tensors → :class:`~lmprune.solvers.base.SolveResult`
block method   ``prune_block(ctx, options)``              prunes one decoder block through the engine's context
refiner        ``refine(W, result, gram, pattern, s, …)``  mask surgery on a solver's result
allocator      ``allocate(matrices, …, sparsity, …)``     ``{matrix: target}`` as an Allocation; never prunes
=============  =========================================  ===============================================

Modules are imported only when a plug-in is used, so naming one costs nothing. The configuration validates every
name against these registries; no other module keeps a list of names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Generic, Iterator, TypeVar

from pydantic import BaseModel

from .errors import ConfigError


class UnknownPlugin(ConfigError):
    """A name that no registry holds; the message lists the choices."""


class InvalidOptions(ConfigError):
    """Options a plug-in refuses; the message is one line naming the option and the valid range."""


@dataclass(frozen=True)
class Plugin:
    """One named plug-in: where its code lives, its entry function and the option values its name implies."""

    name: str
    module: str
    entry: str
    summary: str = ""
    #: Option values a named preset fixes (``alps-fast`` is ``alps`` with fewer iterations).
    preset: dict[str, Any] = field(default_factory=dict)
    #: What else the plug-in needs from a run (e.g. ``input_norms`` for OWL).
    needs: tuple[str, ...] = ()
    #: The name of its options model in the module.
    options_attr: str = "Options"
    #: Working memory beyond its inputs, in float32 words, for an ``out x in`` matrix: ``a·in² + b·out·in``
    #: (+ ``c·tokens·d_ff`` for a block method holding the feed-forward activations), for the memory plan.
    #: Magnitude's, Wanda's, SparseGPT's and ALPS's were measured at LLaMA-2-7B shapes with
    #: bench/scale/matrix_memory.py, SparseLLM's (beside its inner solver's) fitted to its FFN problem's peaks
    #: with bench/scale/ffn_memory.py and checked at LLaMA-2-7B's (bench/RESULTS.md, issue 18).
    workspace: tuple[int, int, int] = (0, 0, 0)
    #: The same with ``--offload-dir``, where it differs (SparseLLM then keeps its float64 moments in files).
    offload_workspace: tuple[int, int, int] | None = None
    #: Further float32 words per ``chunk · d_ff``, ``chunk = min(tokens, chunk_tokens)``, for a block method that
    #: sweeps the tokens in chunks of its ``chunk_tokens`` option (SparseLLM's temporaries).
    chunk_workspace: int = 0
    #: ``tokens x d_ff`` float32 arrays a block method keeps through its solve (SparseLLM's auxiliaries): in
    #: memory, or with ``--offload-dir`` in files there, one token chunk of each in memory at a time.
    token_rows: int = 0
    #: ``tokens x d`` float32 arrays (hidden size ``d``) it keeps through its solve (SparseLLM's FFN inputs and
    #: targets), held like :attr:`token_rows`.
    token_inputs: int = 0

    def load(self):
        return importlib.import_module(self.module)

    def function(self):
        return getattr(self.load(), self.entry)


P = TypeVar("P", bound=Plugin)


class Registry(Generic[P]):
    """Plug-ins of one kind, by name; ``options_field`` is where a configuration holds their options."""

    def __init__(self, kind: str, options_field: str, entries: list[P] = ()):
        self.kind = kind
        self.options_field = options_field
        self._entries: dict[str, P] = {}
        for entry in entries:
            self.register(entry)

    def register(self, plugin: P) -> P:
        if plugin.name in self._entries:
            raise ValueError(f"{self.kind} {plugin.name!r} is registered twice")
        self._entries[plugin.name] = plugin
        return plugin

    def get(self, name: str) -> P:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownPlugin(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}") from None

    def options(self, name: str, overrides: dict[str, Any] | None = None) -> BaseModel:
        """``name``'s validated options (its preset's values, then ``overrides``); an invalid value is one
        :class:`InvalidOptions` line naming the option and its valid range."""
        from .solvers.base import OptionsError, validate_options

        plugin = self.get(name)
        try:
            return validate_options(getattr(plugin.load(), plugin.options_attr), {**plugin.preset, **(overrides or {})},
                                    f"{self.options_field} for {name}")
        except OptionsError as e:
            raise InvalidOptions(str(e)) from None

    def resolved(self, name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`options` as a plain dict, for the manifest."""
        return self.options(name, overrides).model_dump()

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __getitem__(self, name: str) -> P:
        return self._entries[name]

    def __len__(self) -> int:
        return len(self._entries)


SOLVERS: Registry[Plugin] = Registry("solver", "solver_options", [
    Plugin("magnitude", "lmprune.solvers.magnitude", "solve", "keep the largest |W| (no calibration data)",
           workspace=(0, 2, 0)),
    # wanda: the scores, topk's float32 values and int64 indices of half of them, the mask and the result ≈ 3.75
    # out·in words (the 70B-shaped block's prune phase measured 1.8 GiB above the former 2)
    Plugin("wanda", "lmprune.solvers.wanda", "solve", "keep the largest |W|·‖X‖ per output row, no update",
           workspace=(0, 4, 0)),
    Plugin("sparsegpt", "lmprune.solvers.sparsegpt", "solve", "OBS reconstruction, adaptive mask per 128 columns",
           workspace=(3, 2, 0)),
    # alps: H̃ and one ridge inverse (2 in² words); the ADMM state (4 out·in words), |U + V/ρ| and the
    # projection's bool temporaries (≈ 2.25), the supports (0.75): 7 beyond the float32 copy (a 7B down_proj
    # measured 3% under this)
    Plugin("alps", "lmprune.solvers.alps", "solve",
           "ADMM with ρ schedule on the scaled layer error, then PCG on the support", workspace=(2, 7, 0)),
    Plugin("alps-fast", "lmprune.solvers.alps", "solve",
           "ALPS early-stopped: 3 ADMM steps at fixed ρ=0.3, then 2 PCG steps (about SparseGPT's time)",
           preset={"rho0": 0.3, "schedule": False, "max_iter": 3, "pcg_iters": 2}, workspace=(2, 7, 0)),
    Plugin("alps-paper", "lmprune.solvers.alps", "solve",
           "ALPS as the authors run it: 10 PCG steps (lmprune's alps: 3); float32 ridge inverses kept",
           preset={"pcg_iters": 10}, workspace=(2, 7, 0)),
])

#: Block methods prune a whole decoder block; ``layerwise`` runs the per-matrix solver on every matrix and is
#: what every solver name means as a ``--method``.
BLOCK_METHODS: Registry[Plugin] = Registry("block method", "method_options", [
    Plugin("layerwise", "lmprune.strategies.layerwise", "prune_block",
           "every matrix by the solver, Gram matrices from one pass of the block (or per input group)"),
    # sparsellm: fitted (with SparseGPT inside) on five FFN shapes, one with the 70B's proportions, after the
    # refits solved with their factor in place and the update pass ran in place (bench/RESULTS.md, issue 18:
    # 2-14% above each measured peak); with --offload-dir, where the float64 moments wait in files and the
    # update pass releases its F x F inverse before gathering the next moments, refitted on the same five (2-35%
    # above; the 35% at the 70B's proportions, whose peak holds fewer F^2 words than the inner SparseGPT's
    # factorisation the plan counts beside these); its three auxiliaries (tokens x d_ff) and the FFN's inputs
    # and targets (tokens x d) are counted apart: one token chunk of each with --offload-dir
    Plugin("sparsellm", "lmprune.strategies.sparsellm", "prune_block",
           "attention by the solver, then the feed-forward part jointly through auxiliary variables (SparseLLM)",
           options_attr="StrategyOptions", workspace=(0, 20, 0), offload_workspace=(0, 12, 0), chunk_workspace=3,
           token_rows=3, token_inputs=2),
])

REFINERS: Registry[Plugin] = Registry("refiner", "refine_options", [
    Plugin("none", "lmprune.refiners.none", "refine", "the solver's result as it is"),
    Plugin("dsnot", "lmprune.refiners.dsnot", "refine", "training-free prune-and-grow mask swaps (DSnoT)",
           workspace=(0, 3, 0)),
])

ALLOCATORS: Registry[Plugin] = Registry("allocation", "allocation_options", [
    Plugin("uniform", "lmprune.allocation.uniform", "allocate", "the target for every matrix"),
    Plugin("owl", "lmprune.allocation.owl", "allocate",
           "per block, less pruning where Wanda scores have more outliers (OWL)", needs=("input_norms",)),
    Plugin("alpha", "lmprune.allocation.alpha", "allocate",
           "per block, less pruning for heavier-tailed spectra (AlphaPruning)"),
])


def method_names() -> list[str]:
    """What ``--method`` accepts: every solver (run layer-wise) and every block method but ``layerwise``."""
    return SOLVERS.names() + [n for n in BLOCK_METHODS if n != "layerwise"]


def block_method_of(method: str) -> str:
    """The block method a ``--method`` runs as: itself for a block method, ``layerwise`` for a solver."""
    return method if method in BLOCK_METHODS else "layerwise"
