"""Where two pruned models of the same source differ, block by block: mask agreement, sparsity, weight difference.

    python bench/peer/compare_models.py A/model.safetensors B/model.safetensors [--blocks 0,1,14,29]

For every pruned matrix (``model.layers.N.*.weight`` with two dimensions): the fraction of entries whose zero /
non-zero status is the same in both, each model's sparsity, and ‖W_A − W_B‖ / ‖W_A‖. Printed per block (mean over
its matrices), so a difference present from block 0 (a different rule) can be told from one that grows from
nothing block by block (rounding carried through the calibration activations).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

from safetensors import safe_open


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--blocks", default=None, help="comma-separated block indices (default all)")
    ap.add_argument("--matrices", action="store_true", help="one line per matrix")
    args = ap.parse_args()
    chosen = None if args.blocks is None else {int(b) for b in args.blocks.split(",")}
    per_block = defaultdict(list)
    with safe_open(args.a, "pt") as fa, safe_open(args.b, "pt") as fb:
        for key in fa.keys():
            m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", key)
            if not m:
                continue
            block = int(m.group(1))
            if chosen is not None and block not in chosen:
                continue
            wa, wb = fa.get_tensor(key).float(), fb.get_tensor(key).float()
            if wa.dim() != 2:
                continue
            za, zb = wa == 0, wb == 0
            row = {"name": m.group(2), "mask_equal": (za == zb).float().mean().item(), "sp_a": za.float().mean().item(),
                   "sp_b": zb.float().mean().item(), "rel_diff": ((wa - wb).norm() / wa.norm()).item(),
                   "extra_zeros_b": int(zb.sum() - za.sum())}
            per_block[block].append(row)
            if args.matrices:
                print(f"{block:3d} {row['name']:<18} mask equal {row['mask_equal']:.5f}  sparsity {row['sp_a']:.5f} / "
                      f"{row['sp_b']:.5f}  rel diff {row['rel_diff']:.4f}  extra zeros in B {row['extra_zeros_b']}")
    print("| block | mask equal (mean) | sparsity A | sparsity B | ‖W_A − W_B‖/‖W_A‖ (mean) | extra zeros in B |")
    print("|---|---|---|---|---|---|")
    for block in sorted(per_block):
        rows = per_block[block]
        n = len(rows)
        print(f"| {block} | {sum(r['mask_equal'] for r in rows) / n:.5f} | {sum(r['sp_a'] for r in rows) / n:.5f} | "
              f"{sum(r['sp_b'] for r in rows) / n:.5f} | {sum(r['rel_diff'] for r in rows) / n:.4f} | "
              f"{sum(r['extra_zeros_b'] for r in rows)} |")


if __name__ == "__main__":
    main()
