"""Markdown table of finished run directories with the timing split the benchmarks report: pruning wall time,
its solver part and the rest (calibration passes through the blocks, allocation, bookkeeping), peak RSS, and
perplexity per dataset.

    python bench/runs_table.py bench/out/cpu70/*/
    python bench/runs_table.py --sort bench/out/issue4/*/    # rows by blocks, setting, method
    python bench/runs_table.py --sort --jsonl bench/results/issue4_cpu.jsonl bench/out/issue4/*/   # raw rows too
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def method_label(m: dict) -> str:
    """The method as the tables name it: a block method's inner solver in brackets, a refiner after a "+"."""
    cfg = m.get("config", {})
    label = m["method"] + (f"({cfg['inner']})" if m["method"] == "sparsellm" and cfg.get("inner") else "")
    return label + (f"+{cfg['refine']}" if cfg.get("refine", "none") != "none" else "")


def blocks_label(m: dict) -> str:
    pruned = m.get("pruned_blocks")
    spec = m.get("config", {}).get("blocks") or "all"
    if spec != "all" and pruned:
        return f"{spec} (blocks {min(pruned)}–{max(pruned)})" if spec == "first-half" else spec
    return spec


def load_manifest(run: Path) -> dict:
    return json.loads((run / "lmprune.json").read_text())


def is_nm(m: dict) -> bool:
    return ":" in m["pattern"] and m["pattern"] != "unstructured:row"


def setting_label(m: dict) -> str:
    """The pattern for N:M runs, the sparsity otherwise."""
    return m["pattern"] if is_nm(m) else f"{m['sparsity']:.0%}"


def perplexities(m: dict) -> dict[str, float]:
    """Perplexity per dataset, without the evaluation settings stored beside them."""
    return {d: v for d, v in m.get("perplexity", {}).items() if d not in ("eval_windows", "seqlen", "details")}


def row(m: dict, datasets: list[str], with_blocks: bool = False) -> str:
    ppl = perplexities(m)
    cells = [f"{ppl[d]:.1f}" if d in ppl else "–" for d in datasets]
    lead = "".join(f" {c} |" for c in cells)
    blocks = f" {blocks_label(m)} |" if with_blocks else ""
    if m["method"] == "dense":
        return "| dense | – |" + blocks + " – |" + lead + " – | – | – | – |"
    fmt = lambda k: f"{m[k]:.1f}" if isinstance(m.get(k), (int, float)) else "–"  # noqa: E731
    wall, mark = wall_time(m)
    return (f"| {method_label(m)} | {m['allocation']} |{blocks} {setting_label(m)} |" + lead
            + f" {wall:.1f}{mark} | {fmt('solver_time_s')} | {wall - m['solver_time_s']:.1f}{mark} | {fmt('peak_rss_mb')} |")


RESUMED_NOTE = ("\\* resumed from a checkpoint by an lmprune that counted only the resuming process's time: the wall "
                "time shown is the sum of the per-block times over both processes (the few seconds of setup before "
                "block 0 are missing); its peak RSS is the resuming process's.")


def wall_time(m: dict) -> tuple[float, str]:
    """Pruning wall time and a footnote mark. Manifests of resumed runs written before ``time_this_process_s``
    existed hold only the resuming process's time; their per-block times still cover the whole run."""
    if m.get("resumed_from_block") and "time_this_process_s" not in m:
        return sum(m["block_times_s"]), "\\*"
    return m["time_s"], ""


METHOD_ORDER = ("magnitude", "wanda", "wanda+dsnot", "sparsegpt", "sparsegpt+dsnot", "sparsellm(sparsegpt)",
                "sparsellm(alps-fast)", "sparsellm(alps)", "alps-fast", "alps")


def sort_key(m: dict) -> tuple:
    """Blocks, then unstructured sparsity before N:M, then the methods from the weakest baseline up."""
    label = method_label(m)
    return (m.get("config", {}).get("blocks") or "all", is_nm(m), m["sparsity"],
            METHOD_ORDER.index(label) if label in METHOD_ORDER else len(METHOD_ORDER), label)


def raw_row(run: Path, m: dict) -> dict:
    """One run's figures for a JSONL file: what the table shows, unrounded, plus the settings behind them."""
    cfg = m.get("config", {})
    keep = ("method", "sparsity", "pattern", "allocation", "achieved_sparsity", "pattern_ok", "time_s",
            "time_this_process_s", "calibration_time_s", "solver_time_s", "resumed_from_block", "peak_rss_mb", "seed",
            "created")
    out = {"run": run.name, "label": method_label(m), **{k: m[k] for k in keep if k in m}}
    out["wall_s"], mark = wall_time(m)
    out["wall_from_block_times"] = bool(mark)
    out.update({k: cfg.get(k) for k in ("inner", "refine", "blocks", "nsamples", "seqlen")})
    out["perplexity"] = perplexities(m)
    ppl = m.get("perplexity", {})
    out["eval_windows"], out["eval_seqlen"] = ppl.get("eval_windows"), ppl.get("seqlen")
    return out


def main(argv: list[str]) -> int:
    ordered = "--sort" in argv
    jsonl = Path(argv[argv.index("--jsonl") + 1]) if "--jsonl" in argv else None
    runs = {Path(a): load_manifest(Path(a)) for a in argv if (Path(a) / "lmprune.json").is_file()}
    if ordered:
        runs = dict(sorted(runs.items(), key=lambda rm: sort_key(rm[1])))
    if jsonl is not None:
        jsonl.write_text("".join(json.dumps(raw_row(r, m)) + "\n" for r, m in runs.items()))
    datasets: list[str] = []
    for m in runs.values():
        datasets += [d for d in perplexities(m) if d not in datasets]
    with_blocks = any(m.get("config", {}).get("blocks") not in (None, "all") for m in runs.values())
    print("| method | allocation |" + (" blocks |" if with_blocks else "") + " setting |"
          + "".join(f" {d} ppl |" for d in datasets) + " prune wall s | of which solver s | the rest s | peak RSS MiB |")
    print("|" + "---|" * (7 + with_blocks + len(datasets)))
    for m in runs.values():
        print(row(m, datasets, with_blocks))
    if any(wall_time(m)[1] for m in runs.values() if m["method"] != "dense"):
        print("\n" + RESUMED_NOTE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
