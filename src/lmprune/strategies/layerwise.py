"""The default block method: every matrix of the block by the run's layer pruner (solver → refiner).

Gram matrices come from one pass of the block's current (dense) weights; with ``sequential=True`` each input
group is solved before the next group's Gram matrix is collected, so later matrices see the earlier pruning
(SparseGPT's "true sequential").
"""

from __future__ import annotations

import time
from collections import Counter

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..solvers.base import SolveResult


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Collect each input group's Gram matrix after the previous groups were pruned.
    sequential: bool = False
    #: Mixture of experts: an expert routed fewer calibration tokens than this is pruned by magnitude (its Gram
    #: matrix taken as the identity) instead of from a handful of tokens; the manifest lists such experts.
    expert_min_tokens: int = Field(1, ge=0)


def solve_cost(linear) -> float:
    """Estimated cost of one matrix on its owner rank, for owner assignment: ``in³`` (factorising ``H``: the
    damped Cholesky inverse, ALPS's eigendecomposition) plus ``3 · out · in²`` (the solver's sweep or ADMM
    products and the error report's two products). The ``out · in²`` part alone would rank a 4096 × 11008
    ``down_proj`` below its true share and pair it with another matrix."""
    out, inp = linear.weight.shape[0], linear.weight.shape[-1]
    return float(inp) ** 3 + 3.0 * out * inp * inp


def prune_groups(ctx, stages: list[list[str]], stats: dict | None = None, expert_min_tokens: int = 1) -> None:
    """Solve the matrices of each stage (a list of relative names) on Gram matrices collected for that stage;
    ``stats`` are added to each result's statistics. Each matrix is solved, and its error measured, by one
    owner rank."""
    for stage in stages:
        costs = [solve_cost(ctx.linear(r)) for r in stage]
        # a rank receives only the Gram matrices its own matrices read
        grams = ctx.collect_grams(stage, expert_min_tokens, dict(zip(stage, ctx.world.owners(costs))))

        def solve(rel: str):
            start = time.perf_counter()
            dense = ctx.linear(rel).weight.detach()
            result = ctx.inner_solve(rel, dense.to(torch.float32, copy=True), grams[rel])
            result.stats.update(stats or {})
            result.stats["owner_rank"] = ctx.world.rank
            seconds = time.perf_counter() - start
            error = ctx.layer_error(rel, dense, result, grams[rel])
            # held until the commit and broadcast to the other ranks: the weight as the linear will store it (a
            # bf16 model's in 2 bytes, not 5 with the float32 weight and its mask, which the commit does not read)
            return SolveResult(result.weight.to(dense.dtype), None, result.stats, result.pattern), seconds, error

        # each matrix by one owner rank (all of them by this process in a single one), shared with every rank;
        # a Gram matrix and its cached factorisations go as soon as the last matrix reading it is committed, and a
        # result once it is written, so neither q/k/v's nor gate/up's are held through down_proj's solve
        readers = Counter(id(g) for g in grams.values() if g is not None)
        for rel, (result, seconds, error) in ctx.world.spread(stage, costs, solve):
            ctx.commit(rel, result, error, seconds)
            del result, error  # not held through the next matrix's solve
            gram = grams.pop(rel)
            if gram is None:
                continue
            readers[id(gram)] -= 1
            if readers[id(gram)] == 0:
                gram.release()
            del gram


def prune_block(ctx, options: Options) -> None:
    groups = [list(g) for g in ctx.groups]
    prune_groups(ctx, groups if options.sequential else [[r for g in groups for r in g]],
                 expert_min_tokens=options.expert_min_tokens)
