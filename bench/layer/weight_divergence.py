"""Where two pruned runs of the same model part ways: per block, the fraction of mask entries they disagree on and
the relative Frobenius difference of their weights, over the block's pruned matrices.

    python bench/layer/weight_divergence.py RUN_A RUN_B

Used to tell a bug from rounding: two runs that differ only in thread count agree to rounding in the first blocks
and then drift as near-tied mask choices flip (see bench/RESULTS.md, "Reproducibility at high sparsity").
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from safetensors.torch import load_file


def pruned_matrices(run: Path) -> list[str]:
    return [layer["name"] + ".weight" for layer in json.loads((run / "lmprune.json").read_text())["layers"]]


def main(argv: list[str]) -> int:
    a_dir, b_dir = map(Path, argv[:2])
    names = pruned_matrices(a_dir)
    if names != pruned_matrices(b_dir):
        raise SystemExit("the two runs pruned different matrices")
    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    flips, entries, diff2, norm2 = defaultdict(int), defaultdict(int), defaultdict(float), defaultdict(float)
    for name in names:
        block = int(re.search(r"\.(\d+)\.", name).group(1))
        wa, wb = a[name].float(), b[name].float()
        flips[block] += int(((wa != 0) ^ (wb != 0)).sum())
        entries[block] += wa.numel()
        diff2[block] += float((wa - wb).pow(2).sum())
        norm2[block] += float(wa.pow(2).sum())
    print("| block | mask entries that differ | ‖W_a − W_b‖ / ‖W_a‖ |\n|---|---|---|")
    for block in sorted(entries):
        print(f"| {block} | {flips[block] / entries[block]:.2e} | {(diff2[block] / norm2[block]) ** 0.5:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
