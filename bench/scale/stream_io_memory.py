"""What a streamed run holds while it opens a model and while it writes the shard of its embeddings and head
(issue 18: at 8B shape both went past the pruning of a block, and past the memory plan).

    python bench/scale/stream_io_memory.py /work/scale/llama3-8b-2 --dtype bfloat16

Two measurements in one fresh process, peak RSS above the baseline sampled every 5 ms (one JSON line):
``open``: ``open_streamed`` of the model (the non-block weights read, the blocks left on ``meta``);
``write``: the non-block tensors, each touched once so that it is resident, written as one shard by the stream's
own writer (save, then read back and compared), above what they already held. Only the writer's staging folder
is written (a temporary folder, removed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matrix_memory import PeakRSS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a local HF directory with safetensors shards")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()

    from lmprune.run.streaming import open_streamed

    with tempfile.TemporaryDirectory() as tmp:
        with PeakRSS() as opened:
            streamed = open_streamed(args.model, Path(tmp) / "staging", dtype=args.dtype)
        stream = streamed.stream
        prefix = stream.blocks_path + "."
        outer = {k: v.detach().contiguous() for k, v in streamed.model.state_dict().items()
                 if not k.startswith(prefix) and k in stream.reader.weight_map}
        for t in outer.values():  # read once, so resident, as after a run has used them
            t.sum()
        held = sum(t.numel() * t.element_size() for t in outer.values()) / 2**20
        with PeakRSS() as written:
            stream._write(outer, "outer.safetensors")
    print(json.dumps({
        "model": args.model, "dtype": args.dtype,
        "open_peak_above_base_mib": round(opened.above_base_mib, 1),
        "outer_tensors": len(outer), "outer_mib": round(held, 1),
        "largest_tensor_mib": round(max(t.numel() * t.element_size() for t in outer.values()) / 2**20, 1),
        "write_peak_above_held_mib": round(written.above_base_mib, 1),
    }), flush=True)


if __name__ == "__main__":
    main()
