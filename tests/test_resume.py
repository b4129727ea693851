"""Runs that survive: a run killed with SIGKILL mid-way resumes to the same bits; outputs appear atomically."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmprune.run import checkpoint as ckpt_mod
from lmprune.run.checkpoint import HOLD_ENV, MARKER, staging_dir
from lmprune.cli import main

from conftest import wait_for_hold


def _args(model, out, calib, **over):
    opts = {"--model": model, "--method": "sparsegpt", "--sparsity": "0.5", "--out": out, "--calib": calib,
            "--nsamples": "3", "--seqlen": "24", **over}
    return ["prune", "--quiet"] + [str(x) for kv in opts.items() for x in kv]


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(run.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same_run(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    la = json.loads((a / "lmprune.json").read_text())["layers"]
    lb = json.loads((b / "lmprune.json").read_text())["layers"]
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rs]  # noqa: E731
    assert strip(la) == strip(lb)


def _state(out: Path) -> dict | None:
    path = staging_dir(out) / "checkpoint" / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def test_sigkill_then_resume_is_bit_identical(tmp_path, deep_model, calib_file, capsys):
    out = tmp_path / "run"
    env = {**os.environ, HOLD_ENV: "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmprune.cli", *_args(deep_model, out, calib_file)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_hold(proc, out, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()

    staging = staging_dir(out)
    assert not out.exists()  # nothing at OUT looks finished
    assert (staging / MARKER).is_file() and not (staging / "lmprune.json").exists()
    assert sorted(p.name for p in (staging / "checkpoint").iterdir()) == [
        "block_0000.safetensors", "block_0001.safetensors", "inputs_0001", "state.json"]
    # the next block's inputs, one file per calibration window (written and read back window by window)
    windows = sorted(p.name for p in (staging / "checkpoint" / "inputs_0001").iterdir())
    assert windows == [f"window_{k:05d}.safetensors" for k in range(3)]
    assert all(load_file(str(staging / "checkpoint" / "inputs_0001" / w))["window"].shape == (1, 24, 64)
               for w in windows)

    # a different configuration is refused, naming the difference, and the checkpoint survives
    assert main(_args(deep_model, out, calib_file, **{"--sparsity": "0.6"})) == 2
    assert "differs in: sparsity" in capsys.readouterr().err
    assert _state(out)["done_block"] == 1

    assert main(_args(deep_model, out, calib_file)) == 0
    manifest = json.loads((out / "lmprune.json").read_text())
    assert manifest["resumed_from_block"] == 2
    assert len(manifest["layers"]) == 4 * 7 and len(manifest["block_times_s"]) == 4
    assert not staging.exists() and not (out / "checkpoint").exists() and not (out / MARKER).exists()

    whole = tmp_path / "whole"
    assert main(_args(deep_model, whole, calib_file)) == 0
    assert json.loads((whole / "lmprune.json").read_text())["resumed_from_block"] is None
    _assert_same_run(out, whole)


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, block: int) -> None:
    """Make the checkpoint writer raise after checkpointing ``block`` (an in-process stand-in for a kill)."""
    original = ckpt_mod.CheckpointEvents.block_done

    def block_done(self, done):
        original(self, done)
        if done.index == block:
            raise _Interrupt

    monkeypatch.setattr(ckpt_mod.CheckpointEvents, "block_done", block_done)


@pytest.mark.parametrize("method,extra", [("wanda", {"--allocation": "owl"}), ("sparsegpt", {"--pattern": "2:4"}),
                                          ("sparsegpt", {"--offload-dir": "ACTS"})])
def test_resume_in_process_matches(tmp_path, deep_model, calib_file, monkeypatch, method, extra):
    out, acts = tmp_path / "run", tmp_path / "acts"
    extra = {k: str(acts) if v == "ACTS" else v for k, v in extra.items()}
    args = _args(deep_model, out, calib_file, **{"--method": method, **extra})
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        with pytest.raises(_Interrupt):
            main(args)
    state = _state(out)
    assert state["done_block"] == 2 and not out.exists()
    assert not acts.exists() or list(acts.iterdir()) == []  # offloaded activations are removed after an error too
    before = state["timings"]
    assert before["elapsed_s"] >= sum(state["block_times"]) and before["calibration_time_s"] > 0
    assert main(args) == 0
    manifest = json.loads((out / "lmprune.json").read_text())
    assert manifest["resumed_from_block"] == 3
    # the resumed run reports the whole cost: the interrupted process's time to its last checkpoint plus its own
    assert manifest["time_s"] == pytest.approx(before["elapsed_s"] + manifest["time_this_process_s"])
    assert manifest["calibration_time_s"] > before["calibration_time_s"]
    assert manifest["time_s"] >= manifest["solver_time_s"] and manifest["time_s"] >= sum(manifest["block_times_s"])
    assert "resumed from a checkpoint at block 3" in (out / "report.md").read_text()
    whole = tmp_path / "whole"
    assert main(_args(deep_model, whole, calib_file, **{"--method": method, **extra})) == 0
    _assert_same_run(out, whole)


def test_no_resume_starts_over_and_resume_requires_checkpoint(tmp_path, deep_model, calib_file, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(_args(deep_model, out, calib_file) + ["--resume"]) == 2
    assert "no interrupted run to resume" in capsys.readouterr().err
    with monkeypatch.context() as m:
        _interrupt_after(m, 0)
        with pytest.raises(_Interrupt):
            main(_args(deep_model, out, calib_file))
    assert _state(out)["done_block"] == 0
    assert main(_args(deep_model, out, calib_file, **{"--sparsity": "0.6"}) + ["--no-resume"]) == 0
    m = json.loads((out / "lmprune.json").read_text())
    assert m["resumed_from_block"] is None and m["sparsity"] == 0.6


def test_failed_save_leaves_no_finished_looking_dir(tmp_path, deep_model, calib_file, monkeypatch):
    """An error while writing the report (after the model files) must not leave OUT or a manifest at OUT."""
    from lmprune.report import markdown

    out = tmp_path / "run"

    def broken(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(markdown, "render_report", broken)
    assert main(_args(deep_model, out, calib_file)) == 2
    assert not out.exists()
    staging = staging_dir(out)
    assert (staging / MARKER).is_file() and _state(out)["done_block"] == 3
    monkeypatch.undo()
    assert main(_args(deep_model, out, calib_file)) == 0  # everything pruned: resumes straight to saving
    assert json.loads((out / "lmprune.json").read_text())["resumed_from_block"] == 4
    assert not staging.exists()


def test_streamed_run_killed_then_resumed_is_bit_identical(tmp_path, deep_model, calib_file):
    """--stream writes each finished block as an output shard; the checkpoint holds only inputs and records, and
    a resumed streamed run equals an uninterrupted one."""
    out = tmp_path / "run"
    args = _args(deep_model, out, calib_file) + ["--stream"]
    proc = subprocess.Popen([sys.executable, "-m", "lmprune.cli", *args], env={**os.environ, HOLD_ENV: "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_hold(proc, out, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    staging = staging_dir(out)
    assert not out.exists() and (staging / MARKER).is_file()
    assert sorted(p.name for p in (staging / "checkpoint").iterdir()) == ["inputs_0001", "state.json"]
    assert {p.name for p in staging.glob("*.safetensors")} == {"model-00001-of-00005.safetensors",
                                                               "model-00002-of-00005.safetensors"}
    assert main(args) == 0
    manifest = json.loads((out / "lmprune.json").read_text())
    assert manifest["resumed_from_block"] == 2 and manifest["reload_check"]["ok"]
    assert not staging.exists() and not (out / "checkpoint").exists()
    whole = tmp_path / "whole"
    assert main(_args(deep_model, whole, calib_file) + ["--stream"]) == 0
    _assert_same_run(out, whole)
    in_memory = tmp_path / "memory"
    assert main(_args(deep_model, in_memory, calib_file)) == 0
    _assert_same_run(out, in_memory)
