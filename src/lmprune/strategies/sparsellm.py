"""SparseLLM as a block strategy: attention by the inner solver, then the FFN jointly (solvers/sparsellm.py).

Order inside a block:

1. the attention linears, input group by input group (q/k/v, then o_proj on the pruned q/k/v's output), each
   by the configured inner solver (+ refiner) from its dense weights;
2. one pass through the block *with the pruned attention* records the FFN input ``X``; the target ``Y`` is the
   dense FFN applied to that ``X`` (the reference used the dense attention's ``X`` and ``Y``, so the FFN never
   saw the attention pruning). ``X``, ``Y`` and the solver's auxiliaries are
   :class:`~lmprune.activations.TokenRows`: in memory, or with ``--offload-dir`` in files in the run's
   activation folder, and everything computed from them is formed a token chunk (``chunk_tokens``) at a time;
3. the FFN is pruned jointly, every matrix at its own target sparsity, and written back.

The FFN's shape comes from the model's discovered structure, where it was verified numerically on the model's
own tensors; a model whose FFN could not be verified (a fused gate/up matrix, experts) is refused before
anything runs (:func:`check_structure`). Verified FFNs with another activation than ReLU (ungated) or SiLU
(gated), or a gated FFN with biases, fall back to layer-wise pruning (recorded in the layer stats). Matrices
sharing the FFN's input (parallel attention and MLP, as in Phi or Falcon) are pruned with the attention.
``preset="paper"`` (``--method-opt preset=paper``) is the authors' configuration (solvers/sparsellm.py lists
the solver part). Here it adds: all attention linears pruned from one pass of the block with its dense weights
(``sequential_attention=False``), and the reference's per-layer round counts
(``single_round_blocks="reference"``): its LLaMA driver runs one round, i.e. plain layer-wise pruning of the
FFN, in decoder layers 1, 30 and 31 (absolute indices, whatever the depth; on SmolLM2's 30 blocks that is block
1 only), its OPT driver none. The FFN target is still the dense FFN applied to the input *after* the pruned
attention (the reference used the dense attention's): lmprune's choice, kept in the reference configuration.
"""

from __future__ import annotations

import time
from contextlib import closing

import torch
import torch.nn.functional as F

from typing import Any, Literal, Union

from pydantic import model_validator

from ..activations import TokenRows, row_slices
from ..gram_sum import add_outer_
from ..models.adapters import UnsupportedModelError
from ..solvers.base import Gram
from ..solvers.sparsellm import PRESETS, FFNData, FFNPruneResult, Options, _apply_preset, prune_ffn_relu, prune_ffn_swiglu
from .layerwise import prune_groups
#: The reference's per-layer round counts: decoder layers run with one round, by FFN kind (absolute indices).
REFERENCE_SINGLE_ROUND = {"swiglu": (1, 30, 31), "relu": ()}

STRATEGY_PRESETS: dict[str, dict[str, Any]] = {
    name: {**values, "sequential_attention": False, "single_round_blocks": "reference"}
    for name, values in PRESETS.items()
}


class StrategyOptions(Options):
    #: Solve o_proj on the outputs of the already pruned q/k/v (true sequential) rather than the dense ones.
    sequential_attention: bool = True
    #: Blocks whose FFN gets one round only (layer-wise pruning); ``"reference"``: the authors' per family.
    single_round_blocks: Union[list[int], Literal["reference"]] = []

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        return _apply_preset(data, STRATEGY_PRESETS)


def single_round_blocks(opts: StrategyOptions, ffn_kind: str) -> tuple[int, ...]:
    if opts.single_round_blocks == "reference":
        return REFERENCE_SINGLE_ROUND.get(ffn_kind, ())
    return tuple(opts.single_round_blocks)


def check_structure(adapter) -> None:
    """Refuse, in one line, a model whose feed-forward shape is not verified."""
    ffn = adapter.ffn
    if ffn.kind not in ("relu", "swiglu") or not ffn.verified:
        raise UnsupportedModelError(
            f"sparsellm needs a verified feed-forward shape, down(act(up(x))) or down(act(gate(x)) * up(x)), and "
            f"{adapter.family} has none: {ffn.reason or ffn.kind}; the per-matrix methods work on this model")


def _supported(ffn, linears) -> bool:
    if ffn.kind == "relu":
        return ffn.act == "relu"
    return ffn.kind == "swiglu" and ffn.act == "silu" and bool(ffn.gate) and all(
        linears[r].bias is None for r in (ffn.up, ffn.gate, ffn.down))


@torch.no_grad()
def prune_block(ctx, opts: StrategyOptions) -> None:
    check_structure(ctx.adapter)
    ffn = ctx.adapter.ffn
    roles = {"up": ffn.up, "down": ffn.down} | ({"gate": ffn.gate} if ffn.gate else {})
    ffn_rels = set(roles.values())
    attention = [[r for r in g if r not in ffn_rels] for g in ctx.groups]
    attention = [g for g in attention if g]
    ffn_groups = [[r for r in g if r in ffn_rels] for g in ctx.groups if set(g) & ffn_rels]
    prune_groups(ctx, attention if opts.sequential_attention else [[r for g in attention for r in g]])
    if not _supported(ffn, {rel: ctx.linear(rel) for rel in roles.values()}):
        prune_groups(ctx, ffn_groups, {"sparsellm": f"layer-wise fallback: unsupported FFN {ffn.kind}/{ffn.act}"})
        return

    start = time.perf_counter()
    lin = {role: ctx.linear(rel) for role, rel in roles.items()}
    # the block's own weights: nothing writes them before the commits at the end, after the error reports
    dense = {role: lin[role].weight.detach() for role in roles}
    solver_opts = opts.model_dump(exclude={"sequential_attention", "single_round_blocks", "preset"})
    if ctx.index in single_round_blocks(opts, ffn.kind):
        solver_opts["rounds"] = 1
    rows = solver_opts["chunk_tokens"]
    x = ctx.capture_rows(ffn.up, ctx.store.directory)
    try:
        solve_opts = dict(solver_opts=solver_opts, x=x, dense=dense, lin=lin, roles=roles)
        # the FFN problem is solved by one owner rank (this process alone in a single one) and shared
        spread = ctx.world.spread(["ffn"], [_ffn_cost(dense)], lambda _k: _solve_ffn(ctx, ffn, **solve_opts))
        (_, (results, ffn_stats)), = list(spread)
        out = FFNPruneResult(results, ffn_stats)
        b1 = None if lin["up"].bias is None else lin["up"].bias.detach().float()
        up, gate = results["up"].weight.float(), results["gate"].weight.float() if "gate" in results else None

        def pruned_act(xc):
            if ffn.kind == "relu":
                return torch.relu(xc @ up.T + (0 if b1 is None else b1))
            return F.silu(xc @ gate.T) * (xc @ up.T)

        seconds = (time.perf_counter() - start) / len(roles)
        summary = _summary(out)
        grams = dict(zip(("up", "down"), _grams_of((lambda xc: xc, pruned_act), x, rows)))
        grams["gate"] = grams["up"]
    finally:
        x.close()
    # each matrix's error report (two out · in² products) by one owner rank, the numbers shared
    costs = [float(lin[r].weight.shape[0]) * lin[r].weight.shape[1] ** 2 for r in roles]
    errors = dict(ctx.world.spread(list(roles), costs,
                                   lambda r: ctx.layer_error(roles[r], dense[r], results[r], grams[r])))
    for role, rel in roles.items():
        results[role].stats.update(summary)
        ctx.commit(rel, results[role], errors[role], seconds)


def _map_rows(fn, x: TokenRows, rows: int, directory: str | None) -> TokenRows:
    """``fn`` applied to ``x`` (a row-wise ``fn``) ``rows`` rows at a time, into memory or (``directory``) a file
    there. By token chunks in memory too (one code path; ``fn``'s ``tokens x d_ff`` temporaries are never whole).
    The rows are those of one product over all of ``x`` where a matrix product's rows do not depend on how many
    rows it is given (this machine's CPU BLAS: the golden weights are unchanged)."""
    out = None
    try:
        for sl in row_slices(x.shape[0], rows):
            part = fn(x.read(sl))
            if out is None:
                out = TokenRows(x.shape[0], part.shape[1], part.device, directory)
            out.write(sl, part)
    except BaseException:
        if out is not None:
            out.close()
        raise
    return out


def _grams_of(fns, x: TokenRows, rows: int) -> list[Gram]:
    """The Gram matrix of each ``fn(x)``'s rows (for the error reports), summed over pieces of ``rows`` rows, in
    one pass over ``x`` (each piece read once, also from a file)."""
    h: list = [None] * len(fns)
    total: list = [None] * len(fns)
    for sl in row_slices(x.shape[0], rows):
        xc = x.read(sl)
        for i, fn in enumerate(fns):
            a = fn(xc)
            if h[i] is None:
                h[i], total[i] = a.new_zeros(a.shape[1], a.shape[1]), a.new_zeros(a.shape[1])
            add_outer_(h[i], a)
            total[i].add_(a.sum(0))
            del a
    return [Gram(hi, x.shape[0], ti) for hi, ti in zip(h, total)]


def _ffn_cost(w: dict) -> float:
    return float(sum(t.shape[0] * t.shape[1] * t.shape[1] for t in w.values()))


def _solve_ffn(ctx, ffn, solver_opts: dict, x, dense: dict, lin: dict, roles: dict):
    """The joint FFN problem: ``(results by role, solver statistics)``. The solver is handed the ``dense`` weights
    in the model's dtype and makes its float32 copies where it uses them; the ones here live only while the
    targets ``Y`` are computed."""
    inner = lambda weight, gram, target: ctx.inner_solve(ffn.up, weight, gram, target)  # noqa: E731
    rows, aux_dir = solver_opts["chunk_tokens"], ctx.store.directory
    w = {role: t.float() for role, t in dense.items()}
    if ffn.kind == "relu":
        b1 = None if lin["up"].bias is None else lin["up"].bias.detach().float()
        b2 = None if lin["down"].bias is None else lin["down"].bias.detach().float()
        y = _map_rows(lambda xc: torch.relu(xc @ w["up"].T + (0 if b1 is None else b1)) @ w["down"].T
                      + (0 if b2 is None else b2), x, rows, aux_dir)
        del w
        with closing(y):
            out = prune_ffn_relu(FFNData.relu(x, y, dense["up"], b1, dense["down"], b2), ctx.pattern,
                                 {"fc1": ctx.target(ffn.up), "fc2": ctx.target(ffn.down)}, inner, aux_dir=aux_dir,
                                 **solver_opts)
        results = {"up": out.results["fc1"], "down": out.results["fc2"]}
    else:
        y = _map_rows(lambda xc: (F.silu(xc @ w["gate"].T) * (xc @ w["up"].T)) @ w["down"].T, x, rows, aux_dir)
        del w
        targets = {role: ctx.target(rel) for role, rel in roles.items()}
        with closing(y):
            data = FFNData.swiglu(x, y, dense["up"], dense["gate"], dense["down"])
            out = prune_ffn_swiglu(data, ctx.pattern, targets, inner, aux_dir=aux_dir, **solver_opts)
        results = out.results
    for r in results.values():
        r.stats["owner_rank"] = ctx.world.rank
    return results, out.stats


def _summary(out: FFNPruneResult) -> dict:
    """Scalar statistics of the joint FFN solve, stored with each of its matrices."""
    st = out.stats
    scale = st["target_norm"] if st["target_norm"] > 0 else 1.0
    return {
        "sparsellm_ffn_rel_error": st["final_ffn_error"] / scale,
        "sparsellm_layerwise_ffn_rel_error": st["ffn_error"][0] / scale,
        "sparsellm_best_round": str(st["best_round"]),
        "sparsellm_rounds_run": len(st["objective"]),
        "sparsellm_objective_first": st["objective"][0],
        "sparsellm_objective_last": st["objective"][-1],
        "sparsellm_aux_mb": st["aux_mb"],
        "sparsellm_stopped": st.get("stopped", ""),
    }
