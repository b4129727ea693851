"""The run directory loses nothing: --overwrite replaces only lmprune runs, one run at a time holds a folder, a full
disk and SIGTERM end in one line with the checkpoint resumable, and silent acceptances are refused."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import wait_for_hold
from lmprune.cli import main
from lmprune.run.checkpoint import HOLD_ENV, staging_dir


def _args(model, out, calib, *extra, **over):
    opts = {"--model": model, "--method": "sparsegpt", "--sparsity": "0.5", "--out": out, "--calib": calib,
            "--nsamples": "3", "--seqlen": "24", **over}
    return ["prune", "--quiet", *[str(x) for kv in opts.items() for x in kv], *extra]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [l for l in err.splitlines() if l.startswith("lmprune:")]
    assert lines, err
    return lines[-1]


def _state(out: Path) -> dict:
    try:
        return json.loads((staging_dir(out) / "checkpoint" / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _weights(run: Path) -> dict:
    out = {}
    for f in sorted(run.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def _hold(args: list[str], out: Path, block: int, env_extra: dict | None = None) -> subprocess.Popen:
    """Start the CLI in a subprocess that pauses after checkpointing ``block``; wait until it got there."""
    env = {**os.environ, HOLD_ENV: str(block), **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "lmprune.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_hold(proc, out, block)
    return proc


# --- 1. --overwrite replaces only lmprune runs ---------------------------------------------------------------

def test_overwrite_refuses_a_users_folder_and_keeps_it(tmp_path, deep_model, calib_file, capsys):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "notes.txt").write_text("keep")
    assert main(_args(deep_model, user, calib_file, "--overwrite")) == 2
    assert "not an lmprune run" in _err(capsys)
    assert (user / "notes.txt").read_text() == "keep" and sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    assert not staging_dir(user).exists()


def test_overwrite_refuses_a_plain_file(tmp_path, deep_model, calib_file, capsys):
    target = tmp_path / "file"
    target.write_text("keep")
    assert main(_args(deep_model, target, calib_file, "--overwrite")) == 2
    assert "not a directory" in _err(capsys)
    assert target.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_overwrite_replaces_a_run_and_leaves_nothing_beside_it(tmp_path, deep_model, calib_file):
    out = tmp_path / "run"
    assert main(_args(deep_model, out, calib_file)) == 0
    assert main(_args(deep_model, out, calib_file, "--overwrite", **{"--sparsity": "0.6"})) == 0
    assert json.loads((out / "lmprune.json").read_text())["sparsity"] == 0.6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- 2. one run at a time -----------------------------------------------------------------------------------

def test_second_run_into_the_same_out_is_refused_naming_the_holder(tmp_path, deep_model, calib_file, capsys):
    out = tmp_path / "run"
    args = _args(deep_model, out, calib_file)
    first = _hold(args, out, 1)
    try:
        assert main(args) == 2
        msg = _err(capsys)
        assert f"in use by process {first.pid}" in msg
        assert _state(out)["done_block"] == 1  # the first run's checkpoint is untouched
        assert main(args + ["--overwrite"]) == 2  # not even --overwrite takes a held folder
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert main(args) == 0  # the kernel released the lock with the killed process: the run resumes
    manifest = json.loads((out / "lmprune.json").read_text())
    assert manifest["resumed_from_block"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# --- 4. a full disk -----------------------------------------------------------------------------------------

def _disk_full_after(monkeypatch, module, name: str, calls_ok: int) -> None:
    original = getattr(module, name)
    count = {"n": 0}

    def failing(*a, **kw):
        count["n"] += 1
        if count["n"] > calls_ok:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(*a, **kw)

    monkeypatch.setattr(module, name, failing)


def test_full_disk_during_checkpoint_is_one_line_and_stays_resumable(tmp_path, deep_model, calib_file, monkeypatch,
                                                                      capsys):
    from lmprune.run import checkpoint

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _disk_full_after(m, checkpoint, "save_file", 3 + 1 + 3 + 1)  # blocks 0 and 1: 3 windows + the block each
        assert main(_args(deep_model, out, calib_file)) == 2
    msg = _err(capsys)
    assert "no space left on device writing the checkpoint of block 2" in msg and "MiB needed" in msg
    assert "repeat the command to resume" in msg
    assert _state(out)["done_block"] == 1 and not out.exists()
    assert main(_args(deep_model, out, calib_file)) == 0
    assert json.loads((out / "lmprune.json").read_text())["resumed_from_block"] == 2
    whole = tmp_path / "whole"
    assert main(_args(deep_model, whole, calib_file)) == 0
    assert _same_weights(out, whole)


def test_full_disk_while_saving_the_model_is_one_line(tmp_path, deep_model, calib_file, monkeypatch, capsys):
    from transformers import PreTrainedModel

    out = tmp_path / "run"

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedModel, "save_pretrained", full)
        assert main(_args(deep_model, out, calib_file)) == 2
    msg = _err(capsys)
    assert "no space left on device writing the pruned model in" in msg and "MiB needed" in msg
    assert _state(out)["done_block"] == 3 and not out.exists()
    assert main(_args(deep_model, out, calib_file)) == 0  # space freed: straight to saving
    assert json.loads((out / "lmprune.json").read_text())["resumed_from_block"] == 4


# --- 6. an allocation file that does not average the target ---------------------------------------------------

def test_allocation_file_mean_must_match_the_sparsity(tmp_path, deep_model, calib_file, capsys):
    plan_run = tmp_path / "alpha"
    assert main(_args(deep_model, plan_run, calib_file, **{"--method": "wanda", "--allocation": "alpha",
                                                         "--alloc-opt": "cache_dir=null"})) == 0
    plan = plan_run / "allocation.json"
    out = tmp_path / "run"
    assert main(_args(deep_model, out, calib_file, **{"--allocation": str(plan), "--sparsity": "0.7"})) == 2
    msg = _err(capsys)
    assert "averages 0.5000 sparsity, not the --sparsity 0.7" in msg
    assert not out.exists() and not staging_dir(out).exists()
    assert main(_args(deep_model, out, calib_file, **{"--allocation": str(plan)})) == 0


# --- 9. a model naming its own code -----------------------------------------------------------------------------

def _with_own_code(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "custom.py").write_text("from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
                                   "class MyConfig(LlamaConfig):\n    model_type = 'llama'\n\n\n"
                                   "class MyModel(LlamaForCausalLM):\n    config_class = MyConfig\n")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom.MyConfig", "AutoModelForCausalLM": "custom.MyModel"}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_own_code_without_the_flag_warns_and_drops_auto_map(tmp_path, deep_model, calib_file, capsys):
    model = _with_own_code(deep_model, tmp_path / "own")
    out = tmp_path / "run"
    assert main(_args(model, out, calib_file)) == 0
    err = capsys.readouterr().err
    assert "lmprune: warning:" in err and "auto_map" in err and "--trust-remote-code" in err
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert not (out / "custom.py").exists()
    assert "auto_map" in json.loads((out / "lmprune.json").read_text())["model"]


def test_own_code_with_the_flag_passes_the_memory_check_and_is_copied(tmp_path, deep_model, calib_file):
    model = _with_own_code(deep_model, tmp_path / "own")
    out = tmp_path / "run"
    assert main(_args(model, out, calib_file, "--trust-remote-code")) == 0  # memory check included
    assert json.loads((out / "config.json").read_text())["auto_map"] == {"AutoConfig": "custom.MyConfig",
                                                                         "AutoModelForCausalLM": "custom.MyModel"}
    assert (out / "custom.py").read_text() == (model / "custom.py").read_text()


# --- 10. SIGTERM --------------------------------------------------------------------------------------------------

def test_sigterm_ends_in_one_line_and_keeps_the_checkpoint(tmp_path, deep_model, calib_file):
    out = tmp_path / "run"
    args = _args(deep_model, out, calib_file)
    proc = _hold(args, out, 1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert err.strip().splitlines()[-1].startswith("lmprune: terminated (SIGTERM)")
    assert _state(out)["done_block"] == 1 and not out.exists()
    assert main(args) == 0
    assert json.loads((out / "lmprune.json").read_text())["resumed_from_block"] == 2
