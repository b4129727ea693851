"""The default block method: every matrix of the block by the run's layer pruner (solver → refiner).

Gram matrices come from one pass of the block's current (dense) weights; with ``sequential=True`` each input
group is solved before the next group's Gram matrix is collected, so later matrices see the earlier pruning
(SparseGPT's "true sequential").
"""

from __future__ import annotations

import time

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Collect each input group's Gram matrix after the previous groups were pruned.
    sequential: bool = False
    #: Mixture of experts: an expert routed fewer calibration tokens than this is pruned by magnitude (its Gram
    #: matrix taken as the identity) instead of from a handful of tokens; the manifest lists such experts.
    expert_min_tokens: int = Field(1, ge=0)


def solve_cost(linear) -> float:
    """Estimated cost of solving one matrix: ``out · in²`` (the OBS/ALPS solvers' order), for owner assignment."""
    out, inp = linear.weight.shape[0], linear.weight.shape[-1]
    return float(out) * inp * inp


def prune_groups(ctx, stages: list[list[str]], stats: dict | None = None, expert_min_tokens: int = 1) -> None:
    """Solve the matrices of each stage (a list of relative names) on Gram matrices collected for that stage;
    ``stats`` are added to each result's statistics."""
    for stage in stages:
        grams = ctx.collect_grams(stage, expert_min_tokens)

        def solve(rel: str):
            start = time.perf_counter()
            result = ctx.inner_solve(rel, ctx.linear(rel).weight.detach().clone().float(), grams[rel])
            result.stats.update(stats or {})
            return result, time.perf_counter() - start

        # each matrix by one owner rank (all of them by this process in a single one), shared with every rank
        for rel, (result, seconds) in ctx.world.spread(stage, [solve_cost(ctx.linear(r)) for r in stage], solve):
            ctx.commit(rel, result, grams[rel], None, seconds)  # dense: the weight before commit
        for g in {id(g): g for g in grams.values()}.values():
            g.release()


def prune_block(ctx, options: Options) -> None:
    groups = [list(g) for g in ctx.groups]
    prune_groups(ctx, groups if options.sequential else [[r for g in groups for r in g]],
                 expert_min_tokens=options.expert_min_tokens)
