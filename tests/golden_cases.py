"""The golden cases: every method × pattern × allocation × refiner on tiny models, and the run modes of the CLI.

Each case prunes a tiny random model and reduces the result to the SHA-256 of its weights (or to the one-line
error a combination that cannot run gives). ``tests/golden/hashes.json`` holds the values recorded before the
pipeline rebuild; ``test_golden.py`` recomputes them. Regenerate (only when a change of results is intended and
explained) with ``python tests/golden_cases.py``.

Bit-identity needs the same float reduction order, so the cases run at one torch thread and the file records the
torch version and CPU capability they were taken on; on another combination the test says so and skips.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden" / "hashes.json"

METHODS = ["magnitude", "wanda", "sparsegpt", "alps", "alps-fast", "sparsellm", "sparsellm@alps"]
PATTERNS = ["unstructured", "unstructured:row", "2:4", "block:4", "row"]
ALLOCATIONS = ["uniform", "owl", "alpha"]
REFINERS = ["none", "dsnot"]
OTHER_FAMILIES = ["qwen2", "opt"]


def environment_key() -> dict[str, str]:
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": "1"}


def weights_sha(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fields(method: str) -> dict[str, str]:
    if "@" in method:
        block, inner = method.split("@")
        return {"method": block, "inner": inner}
    return {"method": method}


def in_memory_cases() -> list[tuple[str, str, dict]]:
    """``(case id, family, prune fields)`` for the API cases."""
    cases = []
    for m, p, a, r in itertools.product(METHODS, PATTERNS, ALLOCATIONS, REFINERS):
        cases.append((f"llama/{m}/{p}/{a}/{r}", "llama",
                      {**_fields(m), "pattern": p, "allocation": a, "refine": r, "sparsity": 0.6 if p != "2:4" else 0.5}))
    for fam, m, p in itertools.product(OTHER_FAMILIES, METHODS, ["unstructured", "2:4"]):
        cases.append((f"{fam}/{m}/{p}/uniform/none", fam, {**_fields(m), "pattern": p, "sparsity": 0.5}))
    for m in ["sparsegpt", "wanda", "sparsellm"]:
        cases.append((f"llama/{m}/unstructured/uniform/none/sequential", "llama",
                      {**_fields(m), "sparsity": 0.6, "sequential": True}))
    return cases


def run_in_memory(family: str, fields: dict, tokenizer, calib: Path) -> str:
    """SHA-256 of the pruned weights, or ``error: <one line>``."""
    import lmprune
    from conftest import make_model

    model = make_model(family)
    try:
        lmprune.prune(model, tokenizer, progress=False, calib=str(calib), nsamples=3, seqlen=24,
                      allocation_options={"cache_dir": None} if fields.get("allocation") == "alpha" else {},
                      **fields)
    except (ValueError, AssertionError) as e:  # ConfigError and pattern failures
        return "error: " + str(e).strip().splitlines()[0]
    return weights_sha(dict(model.state_dict()))


CLI_CASES = {
    "cli/sparsegpt": [],
    "cli/sparsegpt/offload-dir": ["--offload-dir", "{tmp}/acts"],
    "cli/sparsegpt/sequential": ["--sequential"],
    "cli/wanda/owl/dsnot": ["--method", "wanda", "--allocation", "owl", "--refine", "dsnot"],
    "cli/sparsellm/offload-dir": ["--method", "sparsellm", "--offload-dir", "{tmp}/acts"],
    "cli/sparsegpt/stream": ["--stream"],
    "cli/sparsegpt/2:4/stream": ["--stream", "--pattern", "2:4", "--sparsity", "0.5"],
    "cli/alps/resume-after-kill": ["--method", "alps", "KILL"],
    "cli/sparsegpt/stream/resume-after-kill": ["--stream", "KILL"],
}


def _saved_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(run.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _state(out: Path) -> dict:
    path = out.with_name(f".{out.name}.partial") / "checkpoint" / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def run_cli(case: str, model_dir: Path, calib: Path, tmp: Path) -> str:
    """SHA-256 of the saved tensors of a CLI run (in a subprocess, one thread)."""
    extra = [a.replace("{tmp}", str(tmp)) for a in CLI_CASES[case] if a != "KILL"]
    out = tmp / "run"
    args = ["prune", "--quiet", "--model", str(model_dir), "--method", "sparsegpt", "--sparsity", "0.6",
            "--out", str(out), "--calib", str(calib), "--nsamples", "3", "--seqlen", "24", "--skip-memory-check"]
    # later flags win in argparse, so a case's --method/--sparsity override the defaults above
    args += extra
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LMPRUNE_GOLDEN_THREADS": "1"}
    cmd = [sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from lmprune.cli import main; "
                                 "sys.exit(main(sys.argv[1:]))", *args]
    if "KILL" in CLI_CASES[case]:
        proc = subprocess.Popen(cmd, env={**env, "LMPRUNE_TEST_HOLD_AFTER_BLOCK": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and _state(out).get("done_block", -1) < 1:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode())
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
        if _state(out).get("done_block") != 1:
            raise RuntimeError(f"{case}: the run was not killed after block 1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{case}: {done.stderr.strip().splitlines()[-1:]}")
    return weights_sha(_saved_tensors(out))


def deep_llama(root: Path, tokenizer) -> Path:
    """A tiny LLaMA with four blocks, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM

    from conftest import _config

    cfg = _config("llama")
    cfg.num_hidden_layers = 4
    torch.manual_seed(1)
    path = root / "llama4"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def calib_text(root: Path) -> Path:
    from conftest import _CORPUS

    path = root / "calib.txt"
    path.write_text(" ".join(_CORPUS * 4))
    return path


def compute_all(root: Path, only: set[str] | None = None) -> dict[str, str]:
    from conftest import make_tokenizer

    torch.set_num_threads(1)
    tokenizer = make_tokenizer()
    calib = calib_text(root)
    model_dir = deep_llama(root, tokenizer)
    results = {}
    for case, family, fields in in_memory_cases():
        if only is None or case in only:
            results[case] = run_in_memory(family, fields, tokenizer, calib)
    for i, case in enumerate(CLI_CASES):
        if only is None or case in only:
            tmp = root / f"cli{i}"
            tmp.mkdir()
            results[case] = run_cli(case, model_dir, calib, tmp)
    return results


#: The real model at one thread: bit-identity of the saved weights before and after the rebuild.
REAL_GOLDEN = HERE / "golden" / "smollm2.json"
REAL_CASES = {
    "smollm2/sparsegpt": ["--method", "sparsegpt"],
    "smollm2/alps": ["--method", "alps"],
    "smollm2/sparsellm": ["--method", "sparsellm"],
    "smollm2/wanda/alpha/dsnot": ["--method", "wanda", "--allocation", "alpha", "--refine", "dsnot",
                                  "--alloc-opt", "cache_dir=null"],
}


def run_real(case: str, data_dir: Path, tmp: Path) -> str:
    """SHA-256 of the saved weights of a ``smollm2-135m`` run at 70%, 8 C4 windows of 256 tokens, one thread."""
    out = tmp / case.replace("/", "_")
    args = ["prune", "--quiet", "--model", "smollm2-135m", "--sparsity", "0.7", "--out", str(out),
            "--calib", "c4", "--nsamples", "8", "--seqlen", "256", "--data-dir", str(data_dir), *REAL_CASES[case]]
    cmd = [sys.executable, "-c", "import sys, torch; torch.set_num_threads(1); from lmprune.cli import main; "
                                 "sys.exit(main(sys.argv[1:]))", *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{case}: {done.stderr.strip().splitlines()[-1:]}")
    return weights_sha(_saved_tensors(out))


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE))
    GOLDEN.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        start = time.time()
        if "--real" in sys.argv:
            data = Path(os.environ.get("LMPRUNE_DATA_DIR", HERE.parents[1] / "shared" / "data"))
            hashes = {case: run_real(case, data, Path(d)) for case in REAL_CASES}
            target = REAL_GOLDEN
        else:
            hashes = compute_all(Path(d))
            target = GOLDEN
    target.write_text(json.dumps({"environment": environment_key(), "hashes": hashes}, indent=1) + "\n")
    print(f"{len(hashes)} cases in {time.time() - start:.0f} s -> {target}")
