"""lmprune beside llm-compressor (issue 20): the same calibration windows, the same evaluation, paired by seed.

    PYTHONPATH=src LMPRUNE_DATA_DIR=/work/shared/data python bench/peer/study.py            # run (resumable) + report
    python bench/peer/study.py --report                                                     # tables and test only
    python bench/peer/study.py --only 'sparsegpt70_*' --seeds 0,1                           # a subset

Runs in lmprune's Python; llm-compressor runs in its own virtual environment (``--peer-python``, default
``$LMPRUNE_PEER_PYTHON`` or ``/work/peer-venv/bin/python``; created as ``bench/peer/README.md`` says). For each
setting × seed:

1. lmprune's calibration windows for the seed are exported from lmprune's own sampler (``export_windows.py``);
2. ``lmprune prune`` (no evaluation) writes a run directory; its manifest's ``calibration.windows_sha256`` must equal
   the exported windows' sha256;
3. ``llmc_prune.py`` (in the peer environment) prunes the same model on the exported windows, in the same order,
   and saves a plain HF directory; the sha256 of the windows its embedding saw must equal lmprune's too;
4. both saved models are evaluated by the same command, ``lmprune eval --ppl wikitext2,ptb,c4``.

Every step is a subprocess with ``OMP_NUM_THREADS`` = ``--threads``, one at a time; its wall time and peak RSS
(``ru_maxrss`` of that child, from ``os.wait4``) are recorded beside the tool's own figures. One JSON record per
tool × setting × seed goes to ``bench/peer/results/`` (committed); a cell whose record exists is skipped, and a
prune whose output already exists is not repeated, so the study resumes where it stopped. Models and run
directories go to ``--root`` (default ``bench/out/peer``, not committed).

The report pairs the two tools per setting, seed and dataset (d = ln ppl_lmprune − ln ppl_llm-compressor) and
tests for a systematic gap: a two-sided sign test and a Wilcoxon signed-rank test over the (setting, seed) units
(d averaged over the three datasets: the datasets of one model are not independent), plus the sign test over all
(setting, seed, dataset) pairs for reference.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODEL = "/work/main/bench/out/smollm2-hf"
DATASETS = ["wikitext2", "ptb", "c4"]
TOOLS = ["lmprune", "llmc"]
TOOL_NAMES = {"lmprune": "lmprune", "llmc": "llm-compressor"}

# name: (method, sparsity, pattern); the order is the run order (the settings with the gap seen first)
SETTINGS = {
    "sparsegpt70": ("sparsegpt", 0.7, "unstructured"),
    "wanda70": ("wanda", 0.7, "unstructured"),
    "sparsegpt50": ("sparsegpt", 0.5, "unstructured"),
    "sparsegpt24": ("sparsegpt", 0.5, "2:4"),
    "wanda50": ("wanda", 0.5, "unstructured"),
}
LABELS = {"sparsegpt70": "SparseGPT 70%", "wanda70": "Wanda 70%", "sparsegpt50": "SparseGPT 50%",
          "sparsegpt24": "SparseGPT 2:4", "wanda50": "Wanda 50%"}


# --- running ------------------------------------------------------------------------------------------------

def run_child(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``cmd`` to completion; its wall time and peak RSS (MiB). Raises on a non-zero exit."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)} (log {log})")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_before": load}


def envs(args) -> tuple[dict[str, str], dict[str, str]]:
    base = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                TOKENIZERS_PARALLELISM="false")
    lm = dict(base, PYTHONPATH=str(REPO / "src"))
    peer = {k: v for k, v in base.items() if k != "PYTHONPATH"}
    return lm, peer


def export_windows(args, seed: int, lm_env) -> tuple[Path, str]:
    path = Path(args.root) / "windows" / f"c4_n{args.nsamples}_l{args.seqlen}_seed{seed}.pt"
    sha_file = path.with_suffix(".sha256")
    if not sha_file.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        out = subprocess.run([sys.executable, str(HERE / "export_windows.py"), "--model", args.model, "--seed",
                              str(seed), "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                              "--out", str(path)], env=lm_env, cwd=REPO, check=True, capture_output=True, text=True)
        sha_file.write_text(out.stdout.strip().splitlines()[-1] + "\n")
    return path, sha_file.read_text().strip()


def evaluate(args, model_dir: Path, out: Path, lm_env, log: Path) -> tuple[dict, dict]:
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "lmprune.cli", "eval", "--model", str(model_dir), "--ppl", ",".join(DATASETS),
               "--eval-windows", str(args.eval_windows), "--seqlen", str(args.eval_seqlen), "--out", str(out),
               "--quiet"]
        usage = run_child(cmd, lm_env, log)
        (out.with_suffix(".usage.json")).write_text(json.dumps(usage))
    data = json.loads(out.read_text())
    usage_file = out.with_suffix(".usage.json")
    return data, json.loads(usage_file.read_text()) if usage_file.exists() else {}


def perplexities(eval_json: dict) -> dict[str, float]:
    ppl = eval_json.get("perplexity", eval_json)
    found = {}
    for d in DATASETS:
        v = ppl[d]
        found[d] = float(v["ppl"] if isinstance(v, dict) else v)
    return found


def run_cell(args, setting: str, seed: int, tool: str, lm_env, peer_env) -> dict:
    method, sparsity, pattern = SETTINGS[setting]
    cell = f"{setting}_s{seed}"
    root = Path(args.root)
    log = root / "logs" / f"{tool}_{cell}.log"
    windows, sha = export_windows(args, seed, lm_env)
    record = {"tool": TOOL_NAMES[tool], "setting": setting, "label": LABELS[setting], "method": method,
              "sparsity": sparsity, "pattern": pattern, "seed": seed, "nsamples": args.nsamples,
              "seqlen": args.seqlen, "threads": args.threads, "eval_windows": args.eval_windows,
              "eval_seqlen": args.eval_seqlen, "windows_sha256": sha}
    if tool == "lmprune":
        run = root / "lmprune" / cell
        usage_file = root / "lmprune" / f"{cell}.usage.json"
        if not (run / "lmprune.json").exists():
            cmd = [sys.executable, "-m", "lmprune.cli", "prune", "--model", args.model, "--method", method,
                   "--sparsity", str(sparsity), "--calib", "c4", "--nsamples", str(args.nsamples), "--seqlen",
                   str(args.seqlen), "--seed", str(seed), "--out", str(run), "--quiet"]
            if pattern != "unstructured":
                cmd += ["--pattern", pattern]
            usage_file.write_text(json.dumps(run_child(cmd, lm_env, log)))
        manifest = json.loads((run / "lmprune.json").read_text())
        seen = manifest["calibration"]["windows_sha256"]
        record.update(prune_usage=json.loads(usage_file.read_text()) if usage_file.exists() else {},
                      tool_time_s=manifest.get("time_s"), tool_peak_rss_mb=manifest.get("peak_rss_mb"),
                      achieved_sparsity=manifest.get("achieved_sparsity"), seen_windows_sha256=seen,
                      versions={k: manifest.get("versions", {}).get(k) for k in ("lmprune", "torch", "transformers",
                                                                                   "torch_threads")})
        model_dir = run
    else:
        model_dir = root / "llmc" / cell
        usage_file = root / "llmc" / f"{cell}.usage.json"
        if not (model_dir / "llmc.json").exists():
            cmd = [args.peer_python, str(HERE / "llmc_prune.py"), "--model", args.model, "--windows", str(windows),
                   "--method", method, "--sparsity", str(sparsity), "--pattern", pattern, "--threads",
                   str(args.threads), "--out", str(model_dir)]
            usage_file.write_text(json.dumps(run_child(cmd, peer_env, log)))
        info = json.loads((model_dir / "llmc.json").read_text())
        seen = info["seen_windows_sha256"]
        record.update(prune_usage=json.loads(usage_file.read_text()) if usage_file.exists() else {},
                      tool_time_s=info["prune_s"], tool_peak_rss_mb=info["peak_rss_mb_self"],
                      achieved_sparsity=info["achieved_sparsity_mean"], seen_windows_sha256=seen,
                      versions=info["versions"])
    if seen != sha:
        raise RuntimeError(f"{tool} {cell}: saw windows {seen}, lmprune's sampler gives {sha}")
    ev, ev_usage = evaluate(args, model_dir, root / "eval" / f"{tool}_{cell}.json", lm_env, log)
    record.update(ppl=perplexities(ev), eval_usage=ev_usage)
    return record


# --- report -------------------------------------------------------------------------------------------------

def load_records() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]


def paired(records: list[dict]) -> list[dict]:
    by = {(r["setting"], r["seed"], r["tool"]): r for r in records}
    rows = []
    for setting in SETTINGS:
        for seed in sorted({r["seed"] for r in records if r["setting"] == setting}):
            a, b = by.get((setting, seed, "lmprune")), by.get((setting, seed, "llm-compressor"))
            if a and b:
                d = {k: math.log(a["ppl"][k]) - math.log(b["ppl"][k]) for k in DATASETS}
                rows.append({"setting": setting, "seed": seed, "lm": a, "pc": b, "d": d,
                             "d_mean": sum(d.values()) / len(d)})
    return rows


def tests(rows: list[dict]) -> dict:
    from scipy import stats

    units = [r["d_mean"] for r in rows]
    pairs = [v for r in rows for v in r["d"].values()]
    out = {"units": len(units), "pairs": len(pairs)}
    if not units:
        return out
    pos, neg = sum(u > 0 for u in units), sum(u < 0 for u in units)
    out["sign_units"] = (pos, neg, stats.binomtest(pos, pos + neg, 0.5).pvalue if pos + neg else float("nan"))
    p_pos, p_neg = sum(v > 0 for v in pairs), sum(v < 0 for v in pairs)
    out["sign_pairs"] = (p_pos, p_neg, stats.binomtest(p_pos, p_pos + p_neg, 0.5).pvalue)
    if len(units) >= 2:
        out["wilcoxon_p"] = float(stats.wilcoxon(units).pvalue)
        out["t"] = stats.ttest_1samp(units, 0.0)
        ci = out["t"].confidence_interval(0.95)
        out["ci"] = (float(ci.low), float(ci.high))
    out["mean_d"] = sum(units) / len(units)
    out["median_d"] = sorted(units)[len(units) // 2] if len(units) % 2 else \
        (sorted(units)[len(units) // 2 - 1] + sorted(units)[len(units) // 2]) / 2
    return out


def report() -> str:
    records = load_records()
    rows = paired(records)
    lines = ["| setting | seed | WikiText-2 lmprune | WikiText-2 llm-c. | PTB lmprune | PTB llm-c. | C4 lmprune | "
             "C4 llm-c. | mean d (ln ppl) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for k in DATASETS:
            cells += [f"{r['lm']['ppl'][k]:.2f}", f"{r['pc']['ppl'][k]:.2f}"]
        lines.append(f"| {LABELS[r['setting']]} | {r['seed']} | " + " | ".join(cells) + f" | {r['d_mean']:+.4f} |")
    lines += ["", "Per setting: geometric mean perplexity over the paired seeds (lmprune / llm-compressor); "
              "d = ln ppl_lmprune − ln ppl_llm-compressor averaged over seeds and datasets, ratio = exp(mean d):", "",
              "| setting | seeds | WikiText-2 | PTB | C4 | mean d | ratio | lmprune lower in |",
              "|---|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        sel = [r for r in rows if r["setting"] == setting]
        if sel:
            ds = [r["d_mean"] for r in sel]
            m = sum(ds) / len(ds)
            gm = []
            for k in DATASETS:
                a = math.exp(sum(math.log(r["lm"]["ppl"][k]) for r in sel) / len(sel))
                b = math.exp(sum(math.log(r["pc"]["ppl"][k]) for r in sel) / len(sel))
                gm.append(f"{a:.2f} / {b:.2f}")
            lines.append(f"| {LABELS[setting]} | {','.join(str(r['seed']) for r in sel)} | " + " | ".join(gm)
                         + f" | {m:+.4f} | {math.exp(m):.3f} | {sum(d < 0 for d in ds)} of {len(ds)} seeds |")
    t = tests(rows)
    lines += [""]
    if t.get("units"):
        pos, neg, p = t["sign_units"]
        lines.append(f"Units (setting × seed): {t['units']}; lmprune higher in {pos}, lower in {neg}; two-sided sign "
                     f"test p = {p:.3g}.")
        pp, pn, p2 = t["sign_pairs"]
        lines.append(f"All (setting × seed × dataset) pairs: {t['pairs']}; lmprune higher in {pp}, lower in {pn}; "
                     f"sign test p = {p2:.3g} (pairs of one model are not independent; for reference).")
        if "wilcoxon_p" in t:
            lines.append(f"Wilcoxon signed-rank over the units: p = {t['wilcoxon_p']:.3g}; paired t-test: "
                         f"t = {t['t'].statistic:.2f}, p = {t['t'].pvalue:.3g}; mean d = {t['mean_d']:+.4f} "
                         f"(ratio {math.exp(t['mean_d']):.3f}), median d = {t['median_d']:+.4f}; 95% interval of the mean d "
                         f"[{t['ci'][0]:+.4f}, {t['ci'][1]:+.4f}] (ratio {math.exp(t['ci'][0]):.3f} to "
                         f"{math.exp(t['ci'][1]):.3f}).")
    lines += ["", "Cost per prune (one thread; wall time and peak RSS of the pruning process, model load and save "
              "included; the tool's own pruning time in brackets; lmprune's process peak includes its reload check of the "
              "saved model, the manifest's peak in brackets is the pruning's):", "",
              "| setting | seed | lmprune wall s | llm-c. wall s | lmprune peak RSS MiB (manifest) | llm-c. peak RSS MiB | "
              "load avg before (lm / llm-c.) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["lm"]["prune_usage"], r["pc"]["prune_usage"]
        lines.append(f"| {LABELS[r['setting']]} | {r['seed']} | {a.get('wall_s', float('nan')):.0f} "
                     f"({r['lm']['tool_time_s']:.0f}) | {b.get('wall_s', float('nan')):.0f} "
                     f"({r['pc']['tool_time_s']:.0f}) | {a.get('peak_rss_mb', float('nan')):.0f} "
                     f"({r['lm']['tool_peak_rss_mb'] or float('nan'):.0f}) | "
                     f"{b.get('peak_rss_mb', float('nan')):.0f} | {a.get('load_before', float('nan')):.1f} / "
                     f"{b.get('load_before', float('nan')):.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--root", default=str(REPO / "bench" / "out" / "peer"))
    ap.add_argument("--peer-python", default=os.environ.get("LMPRUNE_PEER_PYTHON", "/work/peer-venv/bin/python"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--only", default="*", help="fnmatch pattern over SETTING_sSEED, e.g. 'sparsegpt70_*'")
    ap.add_argument("--order", default="sparsegpt70_*,wanda70_*,*_s0,*_s1",
                    help="run order: comma-separated fnmatch patterns over SETTING_sSEED, first match first (default: "
                         "the 70%% settings, where the gap was seen, for every seed; then seed 0 of the rest, then "
                         "seed 1, ...)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=10)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="print the tables and the test; run nothing")
    args = ap.parse_args()
    if not args.report:
        if not os.environ.get("LMPRUNE_DATA_DIR"):
            sys.exit("set LMPRUNE_DATA_DIR (e.g. /work/shared/data)")
        lm_env, peer_env = envs(args)
        RESULTS.mkdir(exist_ok=True)
        seeds = [int(s) for s in args.seeds.split(",")]
        cells = [(setting, seed) for setting in SETTINGS for seed in seeds
                 if fnmatch.fnmatch(f"{setting}_s{seed}", args.only)]
        order = []  # the --order patterns first, in their order; the rest after
        for pattern in args.order.split(",") + ["*"]:
            order += [c for c in cells if c not in order and fnmatch.fnmatch(f"{c[0]}_s{c[1]}", pattern)]
        for setting, seed in order:
            if True:
                for tool in TOOLS:
                    dest = RESULTS / f"{tool}_{setting}_s{seed}.json"
                    if dest.exists():
                        continue
                    t0 = time.time()
                    record = run_cell(args, setting, seed, tool, lm_env, peer_env)
                    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
                    dest.write_text(json.dumps(record, indent=1) + "\n")
                    print(f"{tool} {setting} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                      record["ppl"].items())
                          + f" ({time.time() - t0:.0f} s)", flush=True)
    print(report())


if __name__ == "__main__":
    main()
