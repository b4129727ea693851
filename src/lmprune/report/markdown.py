"""``report.md``: the manifest for a person."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..evaluation.zeroshot import score_table


def _fmt(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"
    return str(x)


def render_report(m: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    cfg = m.get("config", {})
    lines = [
        f"# lmprune run: {m['method']} at {m['sparsity']:.0%} ({m['pattern']})",
        "",
        f"- model: `{m['model']['spec']}` ({m['model'].get('model_type')}, {m['model'].get('parameters', '?'):,} parameters)",
        f"- allocation: {m['allocation']}; refiner: {cfg.get('refine', 'none')}",
        f"- calibration: {m['calibration']['nsamples']} × {m['calibration']['seqlen']} tokens from "
        f"`{m['calibration']['source']}`, seed {m['seed']}",
        f"- achieved sparsity over pruned matrices: **{m['achieved_sparsity']:.4f}** (target {m['sparsity']})",
        f"- pattern verified on every matrix: {'yes' if m.get('pattern_ok') else 'NO'}",
        f"- pruning wall time: {m['time_s']:.1f} s (calibration passes through the blocks "
        f"{m.get('calibration_time_s', 0):.1f} s, solver {m.get('solver_time_s', 0):.1f} s, layer-error report "
        f"{m.get('error_time_s', 0):.1f} s); "
        f"peak RSS {m['peak_rss_mb']:.0f} MiB",
    ]
    if m.get("resumed_from_block") is not None:
        lines.append(f"- resumed from a checkpoint at block {m['resumed_from_block']}: the wall time adds the "
                     f"interrupted run's, up to its last checkpoint, to this process's {m['time_this_process_s']:.1f} s")
    lines.append("")
    ppl = m.get("perplexity") or {}
    if ppl:
        lines += ["## Perplexity", "",
                  f"Non-overlapping windows of {ppl.get('seqlen')} tokens; at most {ppl.get('eval_windows') or 'all'} "
                  "windows per dataset (tokens evaluated in the last column).", "",
                  "| dataset | dense | pruned | windows | tokens |", "|---|---|---|---|---|"]
        dense = m.get("dense_perplexity") or {}
        for ds, d in (ppl.get("details") or {}).items():
            lines.append(f"| {ds} | {_fmt(dense.get(ds, float('nan')))} | {_fmt(d['perplexity'])} | "
                         f"{d['windows']}/{d['windows_available']} | {d['tokens_evaluated']} |")
        lines.append("")
    zs = m.get("zeroshot") or {}
    if score_table(zs):
        lines += ["## Zero-shot", "", f"limit: {zs.get('limit') or 'none'}", "", "| task | acc | acc_norm |", "|---|---|---|"]
        for task, r in score_table(zs).items():
            lines.append(f"| {task} | {_fmt(r.get('acc'))} | {_fmt(r.get('acc_norm', '–'))} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    per_block: dict[int, list] = defaultdict(list)
    for rec in m["layers"]:
        per_block[rec["block"]].append(rec)
    lines += ["## Per block", "", "| block | matrices | sparsity | mean rel. error | max rel. error | time s |",
              "|---|---|---|---|---|---|"]
    for b, recs in sorted(per_block.items()):
        n = sum(r["shape"][0] * r["shape"][1] for r in recs)
        sp = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in recs) / n
        errs = [r["rel_error"] for r in recs]
        lines.append(f"| {b} | {len(recs)} | {sp:.4f} | {sum(errs) / len(errs):.4g} | {max(errs):.4g} | "
                     f"{sum(r['time_s'] for r in recs):.2f} |")
    lines += ["", "## Per matrix", "", "| name | shape | target | sparsity | rel. error |", "|---|---|---|---|---|"]
    for r in m["layers"]:
        lines.append(f"| {r['name']} | {r['shape'][0]}×{r['shape'][1]} | {r['target']:.4f} | {r['sparsity']:.4f} | "
                     f"{r['rel_error']:.4g} |")
    lines += ["", f"lmprune {m['versions'].get('lmprune')}, torch {m['versions'].get('torch')}, "
              f"transformers {m['versions'].get('transformers')}; created {m['created']}", ""]
    return "\n".join(lines)
