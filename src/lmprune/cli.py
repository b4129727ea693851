"""``lmprune`` command line: parses arguments and calls :mod:`lmprune.api`. Errors are one line, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

PATTERN_HELP = (
    "unstructured (whole-matrix comparison), unstructured:row, N:M (keeps N non-zeros in every group of M "
    "consecutive input weights: 2:4 keeps 2 of 4), block:B (B×B tiles), row (whole input channels)"
)


class UsageError(ValueError):
    """A command line argparse cannot parse; reported as one line like every other bad input."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``lmprune: error: …``, exit 2), not a usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def _int_at_least(low: int):
    """An argparse type: an integer ``>= low``, checked before anything is loaded."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, not {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, not {value}")
        return value

    return parse


POSITIVE = _int_at_least(1)
SEQLEN = _int_at_least(2)  # a window needs a token to predict from and one to predict


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


def _kv(pairs: list[str] | None) -> dict[str, Any]:
    """``key=value`` options; values parsed as JSON when they parse, else kept as strings."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"option {pair!r} must look like key=value")
        key, raw = pair.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="directory laid out like shared/data (default: $LMPRUNE_DATA_DIR; else the datasets library)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmprune", description="One-shot pruning of causal language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and write a run directory",
                       description="Prune a model. N:M keeps N non-zeros in every group of M consecutive input "
                                   "weights (2:4 keeps 2 of 4).")
    p.add_argument("--recipe", help="TOML/YAML file with any of these options (command-line flags win)")
    p.add_argument("--model", help="HF directory, hub id, .gguf file or alias smollm2-135m")
    p.add_argument("--method", help="magnitude, wanda, sparsegpt, alps, alps-fast, sparsellm")
    p.add_argument("--sparsity", type=float, help="target fraction of zeros in [0, 1)")
    p.add_argument("--out", help="run directory to create")
    p.add_argument("--pattern", help=PATTERN_HELP)
    p.add_argument("--allocation", help="uniform | owl | alpha | FILE.json (per-matrix targets)")
    p.add_argument("--refine", help="none | dsnot")
    p.add_argument("--inner", help="per-matrix solver inside block methods (sparsellm), default sparsegpt")
    p.add_argument("--calib", help="c4 | wikitext2 | ptb | FILE (.txt or .jsonl with 'text')")
    p.add_argument("--nsamples", type=POSITIVE, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=SEQLEN, help="tokens per window (default min(max_position_embeddings, 2048))")
    _add_data_dir(p)
    p.add_argument("--eval", default=None, help="perplexity datasets after pruning, e.g. wikitext2,ptb,c4")
    p.add_argument("--eval-windows", type=POSITIVE, default=None, help="cap on evaluation windows per dataset (reported)")
    p.add_argument("--eval-seqlen", type=SEQLEN, default=None, help="evaluation window length (default: --seqlen)")
    p.add_argument("--eval-dense", action="store_true", help="also evaluate the dense model before pruning")
    p.add_argument("--tasks", default=None, help="zero-shot tasks after pruning (lm-eval), e.g. piqa,arc_easy")
    p.add_argument("--limit", type=POSITIVE, default=None, help="documents per zero-shot task (reported)")
    p.add_argument("--seed", type=int, help="seed of the calibration window sampling (default 0)")
    p.add_argument("--device", help="cpu | cuda")
    p.add_argument("--blocks", help="blocks to prune: all | first-half | 0-14 | 0,3,5")
    p.add_argument("--calib-batch-size", type=POSITIVE,
                   help="calibration windows per block forward pass (default 1; larger is faster on a GPU)")
    p.add_argument("--sequential", action="store_true", default=None,
                   help="collect each input group's Gram matrix after the previous groups were pruned")
    p.add_argument("--offload-activations", action="store_true", default=None,
                   help="keep the calibration activations on the CPU and move one window at a time to --device "
                        "(same result, less device memory)")
    p.add_argument("--offload-dir", metavar="DIR",
                   help="keep the calibration activations in files under DIR, one window in memory at a time "
                        "(same result, host memory independent of --nsamples x --seqlen; removed afterwards); "
                        "SparseLLM keeps its token arrays and float64 moments there too")
    p.add_argument("--solver-opt", action="append", metavar="KEY=VALUE", help="solver option (repeatable)")
    p.add_argument("--method-opt", action="append", metavar="KEY=VALUE", help="block-method option (repeatable)")
    p.add_argument("--alloc-opt", action="append", metavar="KEY=VALUE", help="allocator option (repeatable)")
    p.add_argument("--refine-opt", action="append", metavar="KEY=VALUE", help="refiner option (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue an interrupted run into --out from its last finished block (default: whenever "
                        "its configuration matches); --no-resume discards it and starts over")
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "float16", "bfloat16"),
                   help="precision the model is loaded and propagated in (auto: as saved); every solve "
                        "runs in float32")
    p.add_argument("--save-dtype", default="original", choices=("original", "float32", "float16", "bfloat16"),
                   help="precision of the saved model (original: the model's own dtype; GGUF: float32)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the estimated peak memory by component from the model's config; load no weights")
    p.add_argument("--skip-memory-check", action="store_true",
                   help="start even when the estimated peak exceeds the available memory")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model's repository")
    p.add_argument("--stream", action="store_true",
                   help="larger-than-memory models: read one block at a time from the safetensors shards and write "
                        "it out when done (every allocation; --eval perplexity block by block, no --tasks; "
                        "resumable; saved in --dtype)")
    p.add_argument("--adapter", metavar="FILE.yaml",
                   help="declared model structure (block list, matrices, groups, FFN) where discovery gets it wrong; "
                        "checked against the model")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow pickled .bin weights (read with torch.load(weights_only=True))")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--nproc", type=POSITIVE, default=None,
                   help="data-parallel processes on this machine (launches torchrun for you: the windows are split "
                        "across them, each matrix is solved by one; gloo on CPU, NCCL on CUDA, one GPU per process)")

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model or run directory")
    e.add_argument("--model", required=True, help="run directory, HF directory, hub id, .gguf file or alias "
                                                   "smollm2-135m")
    e.add_argument("--ppl", default=None, help="perplexity datasets, e.g. wikitext2,ptb,c4 (give --ppl, --tasks "
                                               "or both)")
    e.add_argument("--eval-windows", type=POSITIVE, default=None,
                   help="cap on perplexity windows per dataset (reported; default: all, at most 256 for c4)")
    e.add_argument("--seqlen", type=SEQLEN, default=None,
                   help="tokens per perplexity window (default min(max_position_embeddings, 2048))")
    e.add_argument("--tasks", default=None, help="zero-shot tasks, e.g. piqa,arc_easy,arc_challenge")
    e.add_argument("--limit", type=POSITIVE, default=None, help="documents per zero-shot task (reported; default all)")
    e.add_argument("--batch-size", type=POSITIVE, default=8, help="zero-shot batch size")
    e.add_argument("--ppl-batch-size", type=POSITIVE, default=1,
                   help="perplexity windows per forward pass (larger is faster on a GPU, needs more memory)")
    _add_data_dir(e)
    e.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    e.add_argument("--out", default=None, help="write the results as JSON here")
    e.add_argument("--quiet", action="store_true", help="no progress bars")

    a = sub.add_parser("allocate", help="compute and plot a per-matrix sparsity allocation without pruning")
    a.add_argument("--model", required=True, help="HF directory, hub id, .gguf file or alias smollm2-135m")
    a.add_argument("--allocation", required=True, help="owl | alpha | uniform")
    a.add_argument("--sparsity", type=float, required=True, help="target parameter-weighted mean sparsity in [0, 1)")
    a.add_argument("--out", default=None, help="allocation JSON (a PNG plot is written beside it)")
    a.add_argument("--calib", default="c4", help="calibration data for owl: c4 | wikitext2 | ptb | FILE (default c4)")
    a.add_argument("--nsamples", type=POSITIVE, default=128, help="calibration windows for owl (default 128)")
    a.add_argument("--seqlen", type=SEQLEN, default=None,
                   help="tokens per calibration window (default min(max_position_embeddings, 2048))")
    a.add_argument("--seed", type=int, default=0, help="seed of the calibration window sampling (default 0)")
    a.add_argument("--alloc-opt", action="append", metavar="KEY=VALUE",
                   help="allocator option, e.g. epsilon=0.2 (alpha) or lam=0.1 (owl) (repeatable)")
    _add_data_dir(a)
    a.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    a.add_argument("--quiet", action="store_true", help="no progress bars")

    c = sub.add_parser("compare", help="one table and plots over several run directories")
    c.add_argument("runs", nargs="+", help="run directories (or their lmprune.json files)")
    c.add_argument("--out", default=None, help="output directory (default: ./compare)")
    return parser


_PRUNE_FIELDS = ("method", "sparsity", "pattern", "allocation", "refine", "inner", "calib", "nsamples", "seqlen",
                 "seed", "device", "blocks", "sequential", "data_dir", "offload_activations",
                 "offload_dir", "calib_batch_size")


def _cmd_prune(args: argparse.Namespace) -> int:
    from . import api
    from .config import ConfigError, Job, build_config, build_eval, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else {}
    model = args.model or recipe.pop("model", None)
    out = args.out or recipe.pop("out", None)
    recipe.pop("model", None), recipe.pop("out", None)
    eval_list = _csv(args.eval) or list(recipe.pop("eval", []) or [])
    fields = dict(recipe)
    for name in _PRUNE_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    for flag, key in (("solver_opt", "solver_options"), ("method_opt", "method_options"),
                      ("alloc_opt", "allocation_options"), ("refine_opt", "refine_options")):
        if getattr(args, flag):
            fields[key] = {**fields.get(key, {}), **_kv(getattr(args, flag))}
    if not model or not out or "sparsity" not in fields or "method" not in fields:
        raise ConfigError("prune needs --model, --method, --sparsity and --out (or a --recipe giving them)")
    job = Job(
        model=model, out=out, config=build_config(**fields), dtype=args.dtype, save_dtype=args.save_dtype,
        evaluation=build_eval(datasets=eval_list, windows=args.eval_windows, seqlen=args.eval_seqlen,
                              dense=args.eval_dense, tasks=_csv(args.tasks), limit=args.limit),
        stream=args.stream, overwrite=args.overwrite, resume=args.resume, trust_remote_code=args.trust_remote_code,
        trust_pickle=args.trust_pickle, adapter=args.adapter or recipe.pop("adapter", None), memory_check=not args.skip_memory_check, progress=not args.quiet,
        invocation={"argv": ["lmprune", *args.argv]},
    )
    from . import distributed

    nproc = args.nproc or (int(os.environ["WORLD_SIZE"]) if distributed.launched() else 1)
    if args.dry_run:
        from .run.memory import plan_for_job

        print(plan_for_job(job, world_size=nproc).table())
        return 0
    if nproc > 1 and not distributed.launched():
        from .pipeline import validate

        validate(job)  # bad input is one line here, before any process starts
        if job.memory_check:  # the ranks share this machine's memory: all of them must fit
            from .run.memory import check_fits, plan_for_job

            check_fits(plan_for_job(job, world_size=nproc), current_rss=0, ranks_here=nproc)
        return _launch(nproc, args.argv)
    owned = distributed.current() is distributed.SINGLE  # a caller that set up the group keeps it
    world = distributed.init(job.config.device)
    try:
        try:
            manifest = api.run(job)
        except api.RunExists as e:
            if world.is_main:
                print(f"lmprune: {e}")
            return 0
    finally:
        if owned:
            distributed.shutdown()
    if manifest:  # rank 0's; the other ranks return nothing
        _print_summary(manifest, out)
    return 0


def _launch(nproc: int, argv: list[str]) -> int:
    """``lmprune prune ... --nproc N`` as ``torchrun --standalone --nproc-per-node N -m lmprune prune ...``."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "lmprune", *rest]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def _print_summary(m: dict[str, Any], out: str) -> None:
    print(f"pruned {m['model']['spec']} with {m['method']} to {m['achieved_sparsity']:.4f} sparsity "
          f"({m['pattern']}, {m['allocation']}) in {m['time_s']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MiB")
    ppl = m.get("perplexity") or {}
    dense = m.get("dense_perplexity") or {}
    for ds, d in (ppl.get("details") or {}).items():
        before = f"{dense[ds]:.3f} -> " if ds in dense else ""
        print(f"  {ds} perplexity: {before}{d['perplexity']:.3f}  ({d['windows']} windows × {d['seqlen']} tokens)")
    print(f"run directory: {out}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import api
    from .config import ConfigError, build_eval
    from .evaluation.zeroshot import score_table

    if not _csv(args.ppl) and not _csv(args.tasks):
        raise ConfigError("nothing to evaluate: no --ppl and no --tasks given (e.g. --ppl wikitext2)")
    request = build_eval(datasets=_csv(args.ppl), windows=args.eval_windows, seqlen=args.seqlen,
                         tasks=_csv(args.tasks), limit=args.limit, ppl_batch_size=args.ppl_batch_size,
                         task_batch_size=args.batch_size)
    result = api.evaluate(args.model, request, args.data_dir, args.device, not args.quiet)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    ppl = result.get("perplexity") or {}
    cap = ppl.get("eval_windows")
    for ds, v in ppl.items():  # every figure with its window cap and window length
        if isinstance(v, float):
            d = (ppl.get("details") or {}).get(ds, {})
            used = f"{d['windows']} of {d['windows_available']} windows" if "windows" in d else "windows"
            print(f"{ds} perplexity: {v:.3f}  ({used} × {d.get('seqlen', ppl.get('seqlen'))} tokens; "
                  f"{'no window cap' if cap is None else f'cap {cap} windows'})")
    zs = result.get("zeroshot") or {}
    scores = score_table(zs)
    if scores:
        limit = zs.get("limit", args.limit)
        print("zero-shot, 0-shot " + ("(no limit: all documents of each task):" if limit is None
                                      else f"(limit {limit} documents per task):"))
    n_docs = zs.get("n_docs") or {}
    for task, r in scores.items():
        docs = f"  ({n_docs[task]} documents)" if task in n_docs else ""
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float)) + docs)
    if not args.out and not result.get("perplexity") and not result.get("zeroshot"):
        print(text)
    return 0


def _cmd_allocate(args: argparse.Namespace) -> int:
    from . import api
    from .config import build_config

    config = build_config(method="magnitude", sparsity=args.sparsity, allocation=args.allocation,
                          allocation_options=_kv(args.alloc_opt), calib=args.calib, nsamples=args.nsamples,
                          seqlen=args.seqlen, seed=args.seed, data_dir=args.data_dir, device=args.device)
    alloc, paths = api.allocate(args.model, config, args.out, not args.quiet)
    per_block: dict[int, list] = {}
    for m in alloc.matrices:
        per_block.setdefault(m.block, []).append(m)
    print(f"{alloc.method} allocation, target {alloc.sparsity}, weighted mean {alloc.weighted_mean():.6f}, "
          f"{alloc.time_s:.1f} s")
    print("block  metric      sparsity")
    for b, ms in sorted(per_block.items()):
        metric = ms[0].metric
        sp = sum(x.target * x.params for x in ms) / sum(x.params for x in ms)
        print(f"{b:5d}  {metric if metric is not None else float('nan'):10.4f}  {sp:.4f}")
    for p in paths:
        print(f"wrote {p}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from .report.compare import compare_runs

    md = compare_runs([Path(r) for r in args.runs], Path(args.out or "compare"))
    print(Path(md).read_text())
    print(f"wrote {md}")
    return 0


COMMANDS = {"prune": _cmd_prune, "eval": _cmd_eval, "allocate": _cmd_allocate, "compare": _cmd_compare}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(f"lmprune: error: {e}", file=sys.stderr)
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if getattr(args, "quiet", False):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("lmprune: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("lmprune: terminated (SIGTERM); the finished blocks are checkpointed: repeat the command to resume",
              file=sys.stderr)
        return 143
    except (ValueError, FileNotFoundError, OSError, RuntimeError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"lmprune: error: {msg}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM (what schedulers send) ends the run like Ctrl-C: cleanly, with its checkpoint kept."""


def _terminated(signum, frame) -> None:
    raise Terminated


if __name__ == "__main__":
    sys.exit(main())
