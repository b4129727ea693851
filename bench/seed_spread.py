"""How far single-run perplexities move with the calibration seed, and whether a method's gain over its baseline
survives that spread: Markdown tables of finished run directories grouped by method, blocks and setting.

    python bench/seed_spread.py bench/out/issue4/*/
    python bench/seed_spread.py --pair sparsegpt:sparsegpt+dsnot --pair wanda:wanda+dsnot bench/out/issue4/*/

The first table lists every seed's perplexity per dataset and the max/min ratio. The second compares each method
of a ``--pair BASE:OTHER`` with its baseline on the same seed (the same calibration sample), so the change a method
makes is read against the seed-to-seed spread of the baseline itself.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from runs_table import blocks_label, load_manifest, method_label, perplexities, setting_label

Key = tuple[str, str, str]  # method label, blocks, setting


def load(runs: list[Path]) -> tuple[dict[Key, dict[int, dict[str, float]]], list[str]]:
    """``{(method, blocks, setting): {seed: {dataset: perplexity}}}`` and the datasets in first-seen order."""
    cells: dict[Key, dict[int, dict[str, float]]] = defaultdict(dict)
    datasets: list[str] = []
    for run in runs:
        m = load_manifest(run)
        if m["method"] == "dense":
            continue
        ppl = perplexities(m)
        datasets += [d for d in ppl if d not in datasets]
        key = (method_label(m), blocks_label(m), setting_label(m))
        if m["seed"] in cells[key]:
            raise SystemExit(f"{run}: a second run of {key} with seed {m['seed']}")
        cells[key][m["seed"]] = ppl
    return cells, datasets


def spread_table(cells: dict[Key, dict[int, dict[str, float]]], datasets: list[str]) -> list[str]:
    """Every cell run under more than one seed: the perplexity of each seed and max/min per dataset."""
    lines = ["| method | blocks | setting | seeds |" + "".join(f" {d} by seed | max/min |" for d in datasets),
             "|" + "---|" * (4 + 2 * len(datasets))]
    for (label, blocks, setting), by_seed in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if len(by_seed) < 2:
            continue
        seeds = sorted(by_seed)
        row = f"| {label} | {blocks} | {setting} | {', '.join(map(str, seeds))} |"
        for d in datasets:
            values = [by_seed[s][d] for s in seeds if d in by_seed[s]]
            row += f" {' / '.join(f'{v:.1f}' for v in values)} | {max(values) / min(values):.2f} |"
        lines.append(row)
    return lines


def paired_table(cells: dict[Key, dict[int, dict[str, float]]], datasets: list[str],
                 pairs: list[tuple[str, str]]) -> list[str]:
    """Per pair and setting: the change OTHER makes to BASE on each shared seed, and on how many (seed, dataset)
    cases OTHER is lower."""
    lines = ["| base → other | blocks | setting | seeds |" + "".join(f" {d} change by seed |" for d in datasets)
             + " lower in |", "|" + "---|" * (5 + len(datasets))]
    for base, other in pairs:
        for (label, blocks, setting), base_runs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if label != base or (other, blocks, setting) not in cells:
                continue
            other_runs = cells[(other, blocks, setting)]
            seeds = sorted(set(base_runs) & set(other_runs))
            if not seeds:
                continue
            row, lower, total = f"| {base} → {other} | {blocks} | {setting} | {', '.join(map(str, seeds))} |", 0, 0
            for d in datasets:
                changes = [other_runs[s][d] / base_runs[s][d] - 1 for s in seeds if d in base_runs[s] and d in other_runs[s]]
                lower += sum(c < 0 for c in changes)
                total += len(changes)
                row += f" {' / '.join(f'{c:+.0%}' for c in changes)} |"
            lines.append(row + f" {lower}/{total} |")
    return lines


def main(argv: list[str]) -> int:
    pairs = [tuple(argv[i + 1].split(":", 1)) for i, a in enumerate(argv) if a == "--pair"]
    runs = [Path(a) for a in argv if (Path(a) / "lmprune.json").is_file()]
    cells, datasets = load(runs)
    print("\n".join(spread_table(cells, datasets)))
    if pairs:
        print()
        print("\n".join(paired_table(cells, datasets, pairs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
