"""Peak memory of SparseLLM's feed-forward problem at a given shape, and where it peaks (issue 18).

Builds a random SwiGLU problem, or with ``--relu`` an OPT-style ReLU one with biases (``--tokens`` × ``--d``
correlated inputs, ``--dff`` × ``--d`` weights), runs
lmprune's SparseLLM FFN solver on it with the run's default options and the SparseGPT inner solver, and samples
the process's RSS every 5 ms (with ``--aux-dir`` the inputs and targets are written to files there first, as
the block strategy keeps them with ``--offload-dir``). Printed as one JSON line: the peak above the baseline (the
inputs, in memory or not, and the weights built before the solve), the innermost lmprune frames of the main thread when each new peak was reached (the
last one is where the solve peaks), the time, the plan's workspace for the same shape
(``run.memory._solver_workspace``) for comparison, a SHA-256 of the pruned matrices (to show that a memory
change left the result's bits alone), and the MiB the process wrote (``written_mib``: with ``--aux-dir``, its files).

``--phases N`` adds the N lines of lmprune with the highest RSS seen while each ran: how high every phase of the
solve stands, not only the one that sets the peak. Run it with ``MALLOC_MMAP_THRESHOLD_=65536`` so that RSS
follows the live tensors at these scaled-down shapes as it does at real ones (where every temporary is above
glibc's mmap threshold anyway).

    python bench/scale/ffn_memory.py --d 1024 --dff 2752 --tokens 2048 [--rounds 2] [--threads 1] [--aux-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
import traceback
from pathlib import Path

import psutil
import torch


class PeakWhere:
    """Highest RSS between ``__enter__`` and ``__exit__``, with the lmprune frames of ``thread`` at each new peak
    more than 1% above the last one recorded."""

    def __init__(self, thread: int, every: float = 0.005):
        self.thread, self.every, self.stop = thread, every, threading.Event()
        self.proc = psutil.Process()
        self.marks: list[tuple[float, list[str]]] = []
        #: the highest RSS seen at each place (innermost lmprune frame of ``thread``), for ``--phases``
        self.places: dict[str, int] = {}

    def __enter__(self) -> "PeakWhere":
        self.base = self.peak = self.proc.memory_info().rss
        self.worker = threading.Thread(target=self._run, daemon=True)
        self.worker.start()
        return self

    def _run(self) -> None:
        last = self.base
        while not self.stop.is_set():
            rss = self.proc.memory_info().rss
            where = self._where()
            if where and rss > self.places.get(where[-1], 0):
                self.places[where[-1]] = rss
            if rss > self.peak:
                self.peak = rss
                if rss > last * 1.01:
                    last = rss
                    self.marks.append((round((rss - self.base) / 2**20, 1), where))
            time.sleep(self.every)

    def _where(self) -> list[str]:
        frame = sys._current_frames().get(self.thread)
        return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)
                if "lmprune" in f.filename][-3:]

    def top_places(self, n: int) -> list[tuple[float, str]]:
        """The ``n`` places with the highest RSS seen there, in MiB above the baseline."""
        ranked = sorted(self.places.items(), key=lambda kv: -kv[1])[:n]
        return [(round((rss - self.base) / 2**20, 1), place) for place, rss in ranked]

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.worker.join()


def _written_mib() -> float | None:
    """MiB this process has passed to ``write()`` so far (``wchar`` of Linux's ``/proc/self/io``: the input files
    with ``--aux-dir``, and whatever the solve parks there); None where there is no such file."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _digest(results) -> str:
    h = hashlib.sha256()
    for role in sorted(results):
        h.update(role.encode())
        h.update(results[role].weight.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, required=True)
    ap.add_argument("--dff", type=int, required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=None, help="default: the run's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--aux-dir", default=None,
                    help="keep the inputs, targets and auxiliaries in files in this folder (what a run with "
                         "--offload-dir does)")
    ap.add_argument("--chunk-tokens", type=int, default=None,
                    help="default: the run's (a shape scaled down from a real one keeps its T / chunk ratio)")
    ap.add_argument("--relu", action="store_true", help="an OPT-style ReLU FFN with biases instead of SwiGLU")
    ap.add_argument("--phases", type=int, default=0,
                    help="also print the N places (innermost lmprune line) with the highest RSS seen at each")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmprune.config import PruneConfig
    from lmprune.layer_pruner import LayerPruner
    from lmprune.patterns import parse_pattern
    from lmprune.activations import TokenRows
    from lmprune.run.memory import BlockTokens, _solver_workspace
    from lmprune.solvers.sparsellm import FFNData, prune_ffn_relu, prune_ffn_swiglu
    from lmprune.strategies.sparsellm import StrategyOptions

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.d, generator=g) + 0.5 * torch.randn(args.tokens, 1, generator=g)
    w = {"up": torch.randn(args.dff, args.d, generator=g) / args.d**0.5,
         "gate": torch.randn(args.dff, args.d, generator=g) / args.d**0.5,
         "down": torch.randn(args.d, args.dff, generator=g) / args.dff**0.5}
    if args.relu:
        b = {"up": 0.1 * torch.randn(args.dff, generator=g), "down": 0.1 * torch.randn(args.d, generator=g)}
        y = torch.relu(x @ w["up"].T + b["up"]) @ w["down"].T + b["down"]
    else:
        y = (torch.nn.functional.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T
    opts = StrategyOptions().model_dump(exclude={"sequential_attention", "single_round_blocks", "preset"})
    if args.rounds is not None:
        opts["rounds"] = args.rounds
    if args.chunk_tokens is not None:
        opts["chunk_tokens"] = args.chunk_tokens
    pruner = LayerPruner.build("sparsegpt", "none", parse_pattern("unstructured"), {}, {})
    inner = lambda weight, gram, target: pruner.solve(weight, gram, target)  # noqa: E731
    config = PruneConfig(method="sparsellm", sparsity=0.5, method_options={"chunk_tokens": opts["chunk_tokens"]},
                         offload_dir=args.aux_dir)
    sizes = BlockTokens(args.tokens, args.d, args.dff)
    planned = max(_solver_workspace(config, o, i, sizes) for o, i in ((args.dff, args.d), (args.d, args.dff)))
    if args.aux_dir is None:  # the inputs and targets, which the plan's workspace counts, are held before the baseline
        planned -= 4.0 * 2 * args.tokens * args.d
    else:  # in files, as the strategy hands them over: the chunks read are the solve's
        x_rows, y_rows = (TokenRows(args.tokens, args.d, directory=args.aux_dir) for _ in range(2))
        x_rows.write(slice(None), x), y_rows.write(slice(None), y)
        x, y = x_rows, y_rows
    planned /= 2**20
    with PeakWhere(threading.get_ident()) as mem:
        start = time.perf_counter()
        if args.relu:
            data = FFNData.relu(x, y, w["up"], b["up"], w["down"], b["down"])
            out = prune_ffn_relu(data, parse_pattern("unstructured"), 0.5, inner, aux_dir=args.aux_dir, **opts)
        else:
            data = FFNData.swiglu(x, y, w["up"], w["gate"], w["down"])
            out = prune_ffn_swiglu(data, parse_pattern("unstructured"), 0.5, inner, aux_dir=args.aux_dir, **opts)
        seconds = time.perf_counter() - start
    words = {"D^2": args.d**2, "D*F": args.d * args.dff, "F^2": args.dff**2, "T*F": args.tokens * args.dff}
    print(json.dumps({
        "ffn": "relu" if args.relu else "swiglu", "d": args.d, "dff": args.dff, "tokens": args.tokens, "rounds": opts["rounds"], "chunk_tokens": opts["chunk_tokens"],
        "aux_in_files": args.aux_dir is not None,
        "threads": args.threads,
        "seconds": round(seconds, 1), "peak_above_base_mib": round((mem.peak - mem.base) / 2**20, 1),
        "planned_workspace_mib": round(planned, 1), "float32_word_counts": words,
        "best_round": str(out.stats["best_round"]), "peaks": mem.marks[-6:], "weights_sha256": _digest(out.results),
        "written_mib": _written_mib(),
        **({"places": mem.top_places(args.phases)} if args.phases else {}),
    }), flush=True)


if __name__ == "__main__":
    main()
