"""Where a run peaks: ``lmprune ARGS`` in this process, its RSS sampled every 50 ms with the lmprune frames of the
main thread at each new peak (``ffn_memory.PeakWhere``), then the peak, the last peaks' frames and the highest RSS
seen in each innermost lmprune frame (absolute MiB) (issue 18).

    python bench/scale/peak_where.py prune --model /work/scale/llama3-70b-1 --method wanda --stream --calib c4 \\
        --nsamples 4 --seqlen 2048 --dtype bfloat16 --out /tmp/w70 --sparsity 0.5 --blocks 0 --quiet
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ffn_memory import PeakWhere  # noqa: E402


def main() -> int:
    from lmprune.cli import main as lmprune

    where = PeakWhere(threading.main_thread().ident, every=0.05)
    with where:
        rc = lmprune(sys.argv[1:])
    print("rc", rc, "base MiB", round(where.base / 2**20), "peak MiB", round(where.peak / 2**20))
    for mib, frames in where.marks[-6:]:
        print("peak", round(mib + where.base / 2**20), " <- ".join(reversed(frames)))
    for mib, place in where.top_places(12):
        print("place", round(mib + where.base / 2**20), place)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
