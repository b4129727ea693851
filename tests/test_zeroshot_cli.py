"""Zero-shot evaluation through the command line on tiny saved models, offline: `lmprune eval` and `lmprune prune
--tasks`, the limit recorded and printed with the scores, and the run read back by `lmprune compare`."""

from __future__ import annotations

import json

import pytest

from lmprune.cli import main

pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def zeroshot_data(data_dir):
    if not all((data_dir / "zeroshot" / f"{t}.jsonl").is_file() for t in ("piqa", "rte")):
        pytest.skip(f"zero-shot task files not found in {data_dir / 'zeroshot'}")
    return data_dir


def test_eval_scores_tasks_and_reports_the_limit(tmp_path, tiny_model_dirs, zeroshot_data, capsys):
    res = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_model_dirs["llama"]), "--tasks", "piqa,rte", "--limit", "3",
                 "--ppl", "wikitext2", "--eval-windows", "2", "--seqlen", "32", "--batch-size", "4",
                 "--data-dir", str(zeroshot_data), "--out", str(res), "--quiet"]) == 0
    d = json.loads(res.read_text())
    zs = d["zeroshot"]
    assert zs["limit"] == 3 and zs["n_docs"] == {"piqa": 3, "rte": 3}
    assert 0 <= zs["piqa"]["acc"] <= 1 and 0 <= zs["piqa"]["acc_norm"] <= 1 and 0 <= zs["rte"]["acc"] <= 1
    assert d["perplexity"]["eval_windows"] == 2 and d["perplexity"]["seqlen"] == 32
    out = capsys.readouterr().out
    assert "zero-shot, 0-shot (limit 3 documents per task):" in out
    assert "piqa: acc " in out and "(3 documents)" in out
    line = next(x for x in out.splitlines() if x.startswith("wikitext2 perplexity:"))
    assert "2 of " in line and "× 32 tokens; cap 2 windows" in line


def test_prune_records_zero_shot_scores_and_compare_reads_them(tmp_path, tiny_model_dirs, calib_file,
                                                               zeroshot_data):
    out = tmp_path / "run"
    assert main(["prune", "--quiet", "--model", str(tiny_model_dirs["llama"]), "--method", "magnitude",
                 "--sparsity", "0.5", "--calib", str(calib_file), "--nsamples", "1", "--seqlen", "32",
                 "--data-dir", str(zeroshot_data), "--eval", "wikitext2", "--eval-windows", "2", "--eval-dense",
                 "--tasks", "piqa", "--limit", "3", "--out", str(out)]) == 0
    m = json.loads((out / "lmprune.json").read_text())
    assert m["zeroshot"]["limit"] == 3 and m["zeroshot"]["n_docs"] == {"piqa": 3}
    assert 0 <= m["zeroshot"]["piqa"]["acc"] <= 1
    assert set(m["dense_perplexity"]) == {"wikitext2"}

    from lmprune.report.compare import compare_runs

    md = compare_runs([out], tmp_path / "cmp", plots=False).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| dense (--eval-dense) | dense |") and rows[1].startswith("| run | magnitude |")
    assert "first 3 documents per task" in md and "2 windows × 32 tokens" in md
