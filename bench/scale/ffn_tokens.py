"""How SparseLLM's feed-forward problem grows with the calibration tokens, and what that makes of a whole-model
projection (issue 18).

A layer-wise solver's time does not depend on the tokens (it reads a Gram matrix); SparseLLM's FFN problem does:
every round passes over ``tokens x d_ff`` auxiliaries (products with ``d x d_ff`` weights and the ``d_ff x d_ff``
update inverse, and the next round's moments), beside per-round work that does not grow with them (the ``d_ff``-wide
factorisations, inverses and inner solves). So its time is modelled as ``a + b · T`` per shape, fitted by least
squares on cells of ``bench/scale/ffn_memory.py`` (the run's default options, SparseGPT inside, in memory) at
several token counts ``T``.

Cells are scaled-down shapes with a real model's proportions (``--cell D,F,T``). Two shapes with the same
proportions at two widths give how ``a`` and ``b`` grow with the width (exponents ``p`` and ``q``:
``a ∝ width^p``, ``b ∝ width^q``); with them, a fitted shape is carried to the real one of its proportions
(``--carry NAME=D,F:FACTOR``, e.g. ``7b=1024,2752:4``), and the table gives the ratio by which the FFN problem's
time at ``--project`` tokens exceeds its time at ``--measured`` tokens (the tokens of a measured block, whose FFN
time that ratio then multiplies).

    python bench/scale/ffn_tokens.py --root /work/scale/ffn-tokens --cell 1024,2752,2048 --cell 1024,2752,8192 \\
        --cell 1024,2752,32768 --cell 2048,5504,2048 --cell 2048,5504,8192 --widths 1024,2752:2048,5504 \\
        --carry 7b=1024,2752:4 --project 262144 --measured 8192
    python bench/scale/ffn_tokens.py --root /work/scale/ffn-tokens ... --table    # print only

Every cell is ``ROOT/D-F-T.json`` and is skipped when it exists (resumable cell by cell).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_cell(root: Path, d: int, f: int, t: int, rounds: int | None, threads: int) -> None:
    out = root / f"{d}-{f}-{t}.json"
    if out.exists():
        return
    cmd = [sys.executable, str(HERE / "ffn_memory.py"), "--d", str(d), "--dff", str(f), "--tokens", str(t),
           "--threads", str(threads), *(["--rounds", str(rounds)] if rounds else [])]
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return
    out.write_text(done.stdout.strip().splitlines()[-1] + "\n")


def cells(root: Path) -> dict[tuple[int, int], dict[int, float]]:
    """Seconds by shape ``(D, F)`` and tokens."""
    got: dict[tuple[int, int], dict[int, float]] = {}
    for path in sorted(root.glob("*-*-*.json")):
        c = json.loads(path.read_text())
        got.setdefault((c["d"], c["dff"]), {})[c["tokens"]] = c["seconds"]
    return got


def fit(times: dict[int, float]) -> tuple[float, float]:
    """``a, b`` of ``seconds = a + b · T`` by least squares (two or more token counts)."""
    ts = sorted(times)
    n = len(ts)
    mt = sum(ts) / n
    ms = sum(times[t] for t in ts) / n
    b = sum((t - mt) * (times[t] - ms) for t in ts) / sum((t - mt) ** 2 for t in ts)
    return ms - b * mt, b


def _pair(text: str) -> tuple[int, int]:
    d, f = text.split(",")
    return int(d), int(f)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--cell", action="append", default=[], metavar="D,F,T")
    ap.add_argument("--rounds", type=int, default=None, help="default: the run's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--widths", default=None, metavar="D,F:D,F",
                    help="two shapes of the same proportions whose fits give the width exponents")
    ap.add_argument("--carry", action="append", default=[], metavar="NAME=D,F:FACTOR")
    ap.add_argument("--project", type=int, default=262144)
    ap.add_argument("--measured", type=int, default=8192)
    ap.add_argument("--table", action="store_true", help="print the tables, run nothing")
    args = ap.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    if not args.table:
        for spec in args.cell:
            d, f, t = map(int, spec.split(","))
            run_cell(args.root, d, f, t, args.rounds, args.threads)

    got = cells(args.root)
    print("| D, F | tokens: seconds | a (s) | b (ms per token) | largest misfit |\n|---|---|---:|---:|---:|")
    fits = {}
    for shape, times in sorted(got.items()):
        if len(times) < 2:
            continue
        a, b = fits[shape] = fit(times)
        misfit = max(abs(a + b * t - s) / s for t, s in times.items())
        cols = ", ".join(f"{t}: {s:.1f}" for t, s in sorted(times.items()))
        print(f"| {shape[0]}, {shape[1]} | {cols} | {a:.1f} | {b * 1e3:.3f} | {misfit:.1%} |")
    if not args.widths:
        return 0
    small, large = map(_pair, args.widths.split(":"))
    if small not in fits or large not in fits:
        print("\n(the width exponents need fits of both --widths shapes)")
        return 0
    k = large[0] / small[0]
    p = math.log(fits[large][0] / fits[small][0], k)
    q = math.log(fits[large][1] / fits[small][1], k)
    print(f"\nwidth exponents from {small} to {large}: a ∝ width^{p:.2f}, b ∝ width^{q:.2f}")
    print(f"\n| real shape | carried from (D, F) × factor | a (s) | b (ms per token) | FFN time at {args.project} "
          f"tokens / at {args.measured} |\n|---|---|---:|---:|---:|")
    for spec in args.carry:
        name, rest = spec.split("=")
        shape_text, factor = rest.split(":")
        shape, factor = _pair(shape_text), float(factor)
        if shape not in fits:
            continue
        a = fits[shape][0] * factor**p
        b = fits[shape][1] * factor**q
        ratio = (a + b * args.project) / (a + b * args.measured)
        print(f"| {name} | {shape[0]}, {shape[1]} × {factor:g} | {a:.0f} | {b * 1e3:.3f} | {ratio:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
