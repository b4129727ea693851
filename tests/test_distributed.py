"""Data-parallel pruning over torch.distributed: 2 gloo ranks on the CPU against one process.

The 2-rank runs of the equivalence tests share one torchrun launch (``tests/dist_worker.py`` runs every command
in one process group); the killed-rank test goes through ``lmprune prune --nproc 2`` like a user would.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import _config, wait_for_hold
from lmprune.cli import main
from lmprune.distributed import SINGLE, assign_owners, shard_bounds
from lmprune.run.checkpoint import HOLD_ENV, staging_dir

HERE = Path(__file__).resolve().parent
NSAMPLES = 5  # odd: 2 ranks hold 3 and 2 windows
#: 320 tokens: more than the widest input (128), so every Gram matrix has full rank.
SEQLEN = 64

#: name -> extra options; each is pruned by 1 and by 2 processes
CASES = {
    "magnitude": ["--method", "magnitude"],
    "wanda": ["--method", "wanda"],
    "sparsegpt": ["--method", "sparsegpt"],
    "alps": ["--method", "alps"],
    "sparsellm": ["--method", "sparsellm"],
    "sparsegpt-owl": ["--method", "sparsegpt", "--allocation", "owl", "--sparsity", "0.6"],
    "wanda-alpha": ["--method", "wanda", "--allocation", "alpha", "--sparsity", "0.6"],
    "sparsegpt-2of4": ["--method", "sparsegpt", "--pattern", "2:4"],
    # streamed, the activations in files: each rank its own folder under the one --offload-dir
    "sparsegpt-stream": ["--method", "sparsegpt", "--stream", "--offload-dir", "{root}/offload"],
    # the FFN problem's inputs gathered from both ranks into files, in token chunks of 100
    "sparsellm-stream": ["--method", "sparsellm", "--stream", "--offload-dir", "{root}/offload",
                         "--method-opt", "chunk_tokens=100"],
}


def _model(root: Path, tokenizer, layers: int, seed: int) -> Path:
    cfg = _config("llama")
    cfg.num_hidden_layers = layers
    torch.manual_seed(seed)
    path = root / f"llama{layers}"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _argv(model: Path, out: Path, calib: Path, extra: list[str]) -> list[str]:
    extra = [e.format(root=out.parent) for e in extra]
    argv = ["prune", "--quiet", "--model", str(model), "--out", str(out), "--nsamples", str(NSAMPLES),
            "--seqlen", str(SEQLEN), "--calib", str(calib), *extra]
    if "--sparsity" not in extra:
        argv += ["--sparsity", "0.5"]
    if "alpha" in extra:
        argv += ["--alloc-opt", f"cache_dir={out.parent / 'alpha-cache'}"]
    return argv


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer, calib_file):
    """Every case pruned by one process (in this one) and by two (one torchrun launch for all)."""
    root = tmp_path_factory.mktemp("dist")
    (root / "offload").mkdir()
    models = {2: _model(root, tokenizer, 2, 0), 4: _model(root, tokenizer, 4, 1)}
    jobs, pairs = [], {}
    for name, extra in CASES.items():
        model = models[2]
        one, two = root / f"{name}-1", root / f"{name}-2"
        assert main(_argv(model, one, calib_file, extra)) == 0
        jobs.append(_argv(model, two, calib_file, extra))
        pairs[name] = (one, two)
    resume_ref = root / "resume-ref"
    jobs.append(_argv(models[4], resume_ref, calib_file, ["--method", "sparsegpt"]))
    spec = root / "jobs.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([*_torchrun(2), str(HERE / "dist_worker.py"), str(spec)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"pairs": pairs, "models": models, "resume_ref": resume_ref, "root": root}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(run.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _manifest(run: Path) -> dict:
    return json.loads((run / "lmprune.json").read_text())


def _nll(run: Path, tokens: torch.Tensor) -> float:
    model = AutoModelForCausalLM.from_pretrained(run)
    with torch.no_grad():
        return float(model(tokens, labels=tokens).loss)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one(runs, name):
    one, two = runs["pairs"][name]
    # The Gram sums are exact in float64 whatever the order windows and ranks add them in (engine.add_gram_), so
    # the two runs differ only where a solver's float32 arithmetic depends on the thread count (here: ALPS's
    # weights by ~2e-5, masks equal); the bounds below are the issue's.
    m1, m2 = _manifest(one), _manifest(two)
    assert m1["world_size"] == 1 and m2["world_size"] == 2
    assert m2["distributed"]["windows_per_rank"] == [[0, 3], [3, 5]]  # every window once, contiguous
    w1, w2 = _weights(one), _weights(two)
    pruned = {layer["name"] + ".weight" for layer in m1["layers"]}
    assert pruned == {layer["name"] + ".weight" for layer in m2["layers"]}
    same = total = 0
    for k in w1:
        if k not in pruned:
            assert torch.equal(w1[k], w2[k]), k  # nothing else changes
            continue
        same += int(((w1[k] != 0) == (w2[k] != 0)).sum())
        total += w1[k].numel()
        rel = float((w1[k] - w2[k]).norm() / w1[k].norm().clamp_min(1e-12))
        assert rel < 1e-3, (k, rel)
    assert same / total >= 0.999, same / total
    for a, b in zip(m1["layers"], m2["layers"]):  # the records of every rank's matrices reach rank 0
        assert a["name"] == b["name"] and a["pattern_ok"] and b["pattern_ok"]
        assert abs(a["rel_error"] - b["rel_error"]) <= 1e-3 * max(a["rel_error"], 1e-6) + 1e-6
    assert abs(m1["achieved_sparsity"] - m2["achieved_sparsity"]) < 1e-3
    # both ranks solved matrices (and measured their errors): the records say which
    assert {layer["stats"]["owner_rank"] for layer in m2["layers"]} == {0, 1}
    if "stream" in name:
        assert m1["run_options"]["stream"] and m2["run_options"]["stream"]
        assert not list((one.parent / "offload").iterdir())  # every rank's activation files are gone
    assert all(layer["error_time_s"] > 0 for layer in m2["layers"])
    if "owl" in name or "alpha" in name:
        t1 = {m["name"]: m["target"] for m in m1["allocation_detail"]["matrices"]}
        t2 = {m["name"]: m["target"] for m in m2["allocation_detail"]["matrices"]}
        assert t1.keys() == t2.keys() and all(abs(t1[k] - t2[k]) < 1e-4 for k in t1)
    tokens = torch.arange(2, 66).remainder(300).unsqueeze(0)
    n1, n2 = _nll(one, tokens), _nll(two, tokens)
    assert abs(torch.tensor(n2 - n1).exp().item() - 1) < 0.01  # perplexity within 1%


def test_shards_cover_every_window_once():
    for n in range(1, 12):
        for size in range(1, n + 1):
            bounds = [shard_bounds(n, size, r) for r in range(size)]
            assert [i for lo, hi in bounds for i in range(lo, hi)] == list(range(n))
            sizes = [hi - lo for lo, hi in bounds]
            assert max(sizes) - min(sizes) <= 1
    assert SINGLE.shard(7) == slice(0, 7)


def test_owners_balance_cost():
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 2.0]
    owners = assign_owners(costs, 2)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert sorted(load) == [10.0, 10.0]
    assert assign_owners(costs, 1) == [0] * len(costs)


def test_owner_cost_counts_the_factorisation():
    """At LLaMA-2-7B's shapes on two ranks, down_proj (in = 11008: its in³ factorisation and its error report
    dominate) is solved alone; an ``out · in²`` model would pair it with a 4096 × 4096 matrix (the 7B run's
    79 s against 56 s per block)."""
    from types import SimpleNamespace

    from lmprune.strategies.layerwise import solve_cost

    shapes = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
              "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
    lins = [SimpleNamespace(weight=torch.empty(s, device="meta")) for s in shapes.values()]
    owners = dict(zip(shapes, assign_owners([solve_cost(lin) for lin in lins], 2)))
    assert [k for k, o in owners.items() if o == owners["down"]] == ["down"]


def _state(out: Path) -> dict:
    try:
        return json.loads((staging_dir(out) / "checkpoint" / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def test_killed_rank_resumes_to_the_same_weights(runs, calib_file):
    """``--nproc 2`` killed (one rank, SIGKILL) after block 1: the run ends everywhere, and the same command
    resumes it to the weights of an uninterrupted 2-rank run."""
    out = runs["root"] / "resumed"
    argv = [sys.executable, "-m", "lmprune", *_argv(runs["models"][4], out, calib_file, ["--method", "sparsegpt"]),
            "--nproc", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env={**env, HOLD_ENV: "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_hold(proc, out, 1, timeout=240)
    deadline = time.time() + 240
    assert len(list((staging_dir(out) / "checkpoint").glob("inputs_0001_rank*"))) == 2
    victim = None
    while victim is None and time.time() < deadline:  # rank 1 may still be writing; it holds after its barrier
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if p.environ().get("RANK") == "1" and "lmprune" in " ".join(p.cmdline()):
                    victim = p
            except psutil.Error:
                pass
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    assert proc.wait(120) != 0  # the other rank is ended too, and the launcher reports the failure
    proc.stderr.close()
    assert not out.exists() and _state(out)["done_block"] == 1

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = _manifest(out)
    assert m["resumed_from_block"] == 2 and m["world_size"] == 2
    ref, got = _weights(runs["resume_ref"]), _weights(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(nodes: list[Path], argv: list[str], env: dict, port: int) -> list[subprocess.Popen]:
    """One torchrun agent per "node" (one rank each, static rendezvous on this host), each in its own working
    directory, so a relative ``--out`` is a different folder on each: nodes without a shared file system."""
    procs = []
    for i, node in enumerate(nodes):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={i}",
                  "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}"]
        procs.append(subprocess.Popen([*launch, "-m", "lmprune", *argv], cwd=node, env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    return procs


def test_two_nodes_without_a_shared_file_system_resume(runs, calib_file):
    """``torchrun --nnodes 2``, each node writing ``--out`` to its own disk: rank 0 keeps the run directory and the
    checkpoint state, rank 1 only its own windows; killed after block 1 on both nodes, the same two commands
    resume it to the weights of the one-node 2-rank run, and rank 1's node keeps nothing afterwards."""
    nodes = [runs["root"] / "node0", runs["root"] / "node1"]
    for node in nodes:
        node.mkdir()
    argv = _argv(runs["models"][4], Path("run"), calib_file, ["--method", "sparsegpt"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1",
           "LMPRUNE_DIST_TIMEOUT": "120"}
    procs = _two_nodes(nodes, argv, {**env, HOLD_ENV: "1"}, _free_port())
    try:
        wait_for_hold(procs[0], nodes[0] / "run", 1, timeout=240)
        assert list((staging_dir(nodes[1] / "run") / "checkpoint").glob("inputs_0001_rank1"))
    finally:
        for p in procs:  # both nodes go down (torchrun starts its workers in sessions of their own)
            tree = [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]
            for q in tree:
                q.kill()
            psutil.wait_procs(tree, timeout=60)
            p.wait(60)
            p.stderr.close()
    assert _state(nodes[0] / "run")["done_block"] == 1 and not _state(nodes[1] / "run")

    # rank 1 started where its checkpoint is not (another node, say): it refuses in one line, and both end
    import shutil

    kept = runs["root"] / "node1-kept"
    shutil.move(nodes[1], kept)
    nodes[1].mkdir()
    procs = _two_nodes(nodes, argv, env, _free_port())
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    assert "lmprune: error: rank 1: its checkpointed inputs .run.partial/checkpoint/inputs_0001_rank1 are missing" \
        in errs[1]
    assert _state(nodes[0] / "run")["done_block"] == 1  # nothing already computed was lost
    nodes[1].rmdir()
    shutil.move(kept, nodes[1])

    procs = _two_nodes(nodes, argv, env, _free_port())
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(errs)[-6000:]
    m = _manifest(nodes[0] / "run")
    assert m["resumed_from_block"] == 2 and m["world_size"] == 2
    ref, got = _weights(runs["resume_ref"]), _weights(nodes[0] / "run")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert not list(nodes[1].iterdir())  # rank 1's checkpointed windows were removed with the run's end
