"""Issue 21's split, seed by seed: the papers' configurations against lmprune's defaults.

Reads run directories (their ``lmprune.json``) and JSON-lines rows of earlier grids (``bench/results/*.jsonl``, as
written by ``bench/runs_table.py --jsonl``), names every row by its configuration
(:func:`lmprune.report.labels.configuration_label`), and prints

1. one row per (configuration, blocks, setting) with the perplexity of every seed, WikiText-2 / PTB / C4;
2. for each ``--pair BASE:OTHER`` (configuration labels), the change from BASE to OTHER per seed and dataset,
   how many of the paired (seed, dataset) cells OTHER is lower in, and a sign test: over seeds (a seed counts
   as lower when OTHER's geometric-mean perplexity over the three datasets is lower) and over the
   (seed, dataset) cells (not independent: the datasets of one seed share the pruned model).

Only cells with the same blocks, setting and seed are paired, so rows from another protocol never mix in as long
as the inputs share the protocol (here: 32 × 512 C4 calibration, 10 windows × 1024 tokens per dataset).

    python bench/issue21_split.py /work/runs-issue21/*/ --jsonl bench/results/issue4_cpu.jsonl \\
        --pair "sparsellm-paper(sparsegpt):sparsellm(sparsegpt, +down refit, +best round)" \\
        --pair "sparsegpt:sparsellm-paper(sparsegpt)" \\
        --pair "wanda + alpha(peak_reference):wanda + alpha(peak)"
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

from lmprune.report.labels import configuration_label

DATASETS = ("wikitext2", "ptb", "c4")


def _setting(sparsity: float, pattern: str) -> str:
    return f"{sparsity * 100:.0f}%" if pattern in (None, "unstructured") else pattern


def from_manifest(path: Path) -> dict | None:
    f = path / "lmprune.json"
    if not f.is_file():
        return None
    m = json.loads(f.read_text())
    cfg = m.get("config", {})
    return {
        "label": m.get("configuration") or configuration_label(m),
        "blocks": cfg.get("blocks") or "all",
        "setting": _setting(m["sparsity"], m.get("pattern")),
        "seed": m.get("seed", 0),
        "ppl": {k: v for k, v in (m.get("perplexity") or {}).items() if k in DATASETS},
        "windows": (m.get("perplexity") or {}).get("eval_windows"),
        "time_s": m.get("time_s"),
        "source": str(path),
    }


def from_jsonl_row(row: dict) -> dict:
    manifest = {"method": row["method"], "allocation": row.get("allocation", "uniform"),
                "config": {"inner": row.get("inner", "sparsegpt"), "refine": row.get("refine", "none")}}
    return {
        "label": configuration_label(manifest),
        "blocks": row.get("blocks") or "all",
        "setting": _setting(row["sparsity"], row.get("pattern")),
        "seed": row.get("seed", 0),
        "ppl": {k: v for k, v in (row.get("perplexity") or {}).items() if k in DATASETS},
        "windows": row.get("eval_windows"),
        "time_s": row.get("wall_s"),
        "source": row.get("run"),
    }


def sign_test(lower: int, n: int) -> float:
    """One-sided P(at least ``lower`` of ``n`` fair coin flips), the chance of this many or more by luck."""
    return sum(math.comb(n, k) for k in range(lower, n + 1)) / 2**n if n else 1.0


def _gmean(ppl: dict) -> float:
    return math.exp(sum(math.log(ppl[d]) for d in DATASETS) / len(DATASETS))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", type=Path)
    p.add_argument("--jsonl", action="append", default=[], type=Path)
    p.add_argument("--pair", action="append", default=[], help="BASE:OTHER configuration labels")
    p.add_argument("--only", action="append", default=[], help="keep only these configuration labels")
    args = p.parse_args(argv)

    rows = [r for r in (from_manifest(d) for d in args.runs) if r and len(r["ppl"]) == len(DATASETS)]
    for f in args.jsonl:
        rows += [from_jsonl_row(json.loads(line)) for line in f.read_text().splitlines() if line.strip()]
    table: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in rows:
        if args.only and r["label"] not in args.only:
            continue
        table[(r["label"], r["blocks"], r["setting"])].setdefault(r["seed"], r)  # run directories win

    print("| configuration | blocks | setting | seeds | wikitext2 by seed | ptb by seed | c4 by seed |")
    print("|---|---|---|---|---|---|---|")
    for (label, blocks, setting), by_seed in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        seeds = sorted(by_seed)
        cells = [" / ".join(f"{by_seed[s]['ppl'][d]:.1f}" for s in seeds) for d in DATASETS]
        print(f"| {label} | {blocks} | {setting} | {', '.join(map(str, seeds))} | " + " | ".join(cells) + " |")

    if not args.pair:
        return
    print()
    print("| base → other | blocks | setting | seeds | wikitext2 change | ptb change | c4 change | other lower in "
          "(seed, dataset) | seeds lower (geo-mean) |")
    print("|---|---|---|---|---|---|---|---|---|")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for pair in args.pair:
        base, other = pair.split(":", 1)
        keys = sorted({(b, s) for (lab, b, s) in table if lab == base} & {(b, s) for (lab, b, s) in table if lab == other})
        for blocks, setting in keys:
            a, b = table[(base, blocks, setting)], table[(other, blocks, setting)]
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            changes = {d: [b[s]["ppl"][d] / a[s]["ppl"][d] - 1 for s in seeds] for d in DATASETS}
            lower = sum(c < 0 for d in DATASETS for c in changes[d])
            n = len(seeds) * len(DATASETS)
            seeds_lower = sum(_gmean(b[s]["ppl"]) < _gmean(a[s]["ppl"]) for s in seeds)
            t = totals[pair]
            t[0] += lower; t[1] += n; t[2] += seeds_lower; t[3] += len(seeds)
            cells = [" / ".join(f"{c * 100:+.0f}%" for c in changes[d]) for d in DATASETS]
            print(f"| {base} → {other} | {blocks} | {setting} | {', '.join(map(str, seeds))} | " + " | ".join(cells)
                  + f" | {lower}/{n} | {seeds_lower}/{len(seeds)} |")
    print()
    for pair, (lower, n, sl, ns) in totals.items():
        base, other = pair.split(":", 1)
        print(f"- {other} against {base}, all cells pooled: lower in {lower}/{n} (seed, dataset) cells "
              f"(one-sided sign test p = {sign_test(lower, n):.3g}, cells not independent), {sl}/{ns} seed-cells by "
              f"geometric-mean perplexity (p = {sign_test(sl, ns):.3g}); higher in {n - lower}/{n} "
              f"(p = {sign_test(n - lower, n):.3g}).")


if __name__ == "__main__":
    main()
