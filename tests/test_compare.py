"""`compare_runs` on synthetic run directories: table, CSV, plots, dense first."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lmprune.report.compare import compare_runs, load_run, read_csv, table_rows
from lmprune.report.plots import block_stats

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _layers(n_blocks: int, sparsity: float) -> list[dict]:
    layers = []
    for b in range(n_blocks):
        for kind, shape in (("self_attn.q_proj", [8, 8]), ("mlp.down_proj", [8, 16])):
            layers.append({"name": f"model.layers.{b}.{kind}", "shape": shape,
                           "sparsity": sparsity, "rel_error": 0.01 * (b + 1)})
    return layers


def _write_run(root: Path, name: str, **fields) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "lmprune.json").write_text(json.dumps(fields))
    return run


@pytest.fixture
def runs(tmp_path):
    sparse = _write_run(
        tmp_path, "sparsegpt_50", method="sparsegpt", sparsity=0.5, pattern="unstructured", allocation="uniform",
        achieved_sparsity=0.5, layers=_layers(3, 0.5),
        perplexity={"wikitext2": 30.5, "c4": 45.25, "eval_windows": 4, "seqlen": 1024},
        zeroshot={"piqa": {"acc": 0.6, "acc_norm": 0.62}, "arc_easy": {"acc": 0.4, "acc_norm": 0.38},
                  "limit": 20, "n_docs": {"piqa": 20, "arc_easy": 20}},
        time_s=12.5, peak_rss_mb=900.0)
    dense = _write_run(
        tmp_path, "dense", method="dense", sparsity=0.0, pattern="unstructured", allocation="uniform",
        achieved_sparsity=0.0, layers=[],
        perplexity={"wikitext2": 20.0, "c4": 30.0, "eval_windows": 4, "seqlen": 1024},
        zeroshot={"piqa": {"acc": 0.7, "acc_norm": 0.71}, "arc_easy": {"acc": 0.5, "acc_norm": 0.45}, "limit": 20},
        time_s=0.0, peak_rss_mb=800.0)
    return sparse, dense


def test_compare_writes_table_csv_and_plots(runs, tmp_path):
    sparse, dense = runs
    out = tmp_path / "cmp"
    md_path = compare_runs([sparse, dense], out)
    assert md_path == out / "comparison.md"
    md = md_path.read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].split(" | ")[:4] == ["| run", "configuration", "allocation", "pattern"]
    assert table[1].startswith("| dense | dense |")  # dense first although listed second
    assert table[2].startswith("| sparsegpt_50 | sparsegpt | uniform | unstructured | 50.0 | 50.0 | 45.25 | 30.50 |")
    assert "60.0 / 62.0" in table[2] and "| 50.0 |" in table[2]  # piqa acc/acc_norm; average of 60 and 40
    assert "| 60.0 |" in table[1]  # dense average of 70 and 50
    assert "4 windows × 1024 tokens" in md and "first 20 documents" in md
    assert "mean acc over piqa, arc_easy" in md

    with open(out / "comparison.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["dense", "sparsegpt_50"]
    assert float(rows[1]["ppl_wikitext2"]) == 30.5
    assert float(rows[1]["arc_easy_acc_norm"]) == pytest.approx(0.38)
    assert float(rows[1]["zeroshot_avg_acc"]) == pytest.approx(0.5)
    assert float(rows[1]["peak_rss_mb"]) == 900.0

    for png in ("perplexity_vs_sparsity.png", "zeroshot_vs_sparsity.png", "layers_sparsegpt_50.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
        assert f"]({png})" in md
    assert not (out / "layers_dense.png").exists()


def test_explicit_dense_run_goes_first(runs, tmp_path):
    sparse, dense = runs
    md = compare_runs([sparse], tmp_path / "cmp", dense=dense, plots=False).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| dense", "| sparsegpt_50"]
    assert not (tmp_path / "cmp" / "perplexity_vs_sparsity.png").exists()


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no lmprune.json"):
        compare_runs([tmp_path], tmp_path / "cmp")


def test_runs_without_zero_shot_have_no_average_column(tmp_path):
    a = _write_run(tmp_path, "a", method="wanda", sparsity=0.5, perplexity={"wikitext2": 40.0})
    b = _write_run(tmp_path, "b", method="wanda", sparsity=0.7, allocation={"name": "owl"}, pattern="2:4",
                   perplexity={"wikitext2": 400.0})
    md = compare_runs([b, a], tmp_path / "cmp").read_text()
    assert "zero-shot avg" not in md and "zeroshot_vs_sparsity.png" not in md
    assert "| b | wanda + owl | owl | 2:4 | 70.0 |" in md
    assert load_run(b).series == "wanda (owl, 2:4)"


def test_a_refiner_is_part_of_the_method_label(tmp_path):
    run = _write_run(tmp_path, "r", method="wanda", sparsity=0.6, config={"refine": "dsnot"})
    assert load_run(run).method == "wanda+dsnot"
    plain = _write_run(tmp_path, "p", method="wanda", sparsity=0.6, config={"refine": "none"})
    assert load_run(plain).method == "wanda"


def test_block_stats_weights_sparsity_by_matrix_size():
    layers = [
        {"name": "model.layers.0.self_attn.q_proj", "shape": [4, 4], "sparsity": 0.25, "rel_error": 0.1},
        {"name": "model.layers.0.mlp.down_proj", "shape": [4, 12], "sparsity": 0.75, "rel_error": 0.2},
        {"name": "model.layers.1.mlp.down_proj", "shape": [4, 12], "sparsity": 0.5},
        {"name": "lm_head", "shape": [4, 4], "sparsity": 0.0},
    ]
    blocks, sparsity, errors = block_stats(layers)
    assert blocks == [0, 1]
    assert sparsity == pytest.approx([(0.25 * 16 + 0.75 * 48) / 64, 0.5])
    assert errors == {"q_proj": {0: 0.1}, "down_proj": {0: 0.2}}


def test_zero_shot_scores_beside_the_manifest_are_read(tmp_path):
    run = _write_run(tmp_path, "w", method="wanda", sparsity=0.5, perplexity={"wikitext2": 40.0})
    (run / "zeroshot.json").write_text(json.dumps(
        {"zeroshot": {"rte": {"acc": 0.55}, "limit": 50, "n_docs": {"rte": 50}}}))
    loaded = load_run(run)
    assert loaded.zeroshot == {"rte": {"acc": 0.55}} and loaded.zeroshot_limit == 50


def test_plot_run_writes_the_per_block_plot_into_the_run(runs):
    from lmprune.report.plots import plot_run

    sparse, dense = runs
    assert plot_run(sparse).read_bytes()[:8] == PNG_MAGIC
    assert (sparse / "layers.png").is_file()
    assert plot_run(dense) is None  # no pruned layers, no plot


def test_nested_zero_shot_form_is_read(tmp_path):
    run = _write_run(tmp_path, "n", method="wanda", sparsity=0.5,
                     zeroshot={"tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.65}}, "limit": 10})
    loaded = load_run(run)
    assert loaded.zeroshot == {"piqa": {"acc": 0.6, "acc_norm": 0.65}} and loaded.zeroshot_limit == 10


def test_dense_row_from_eval_dense_figures(tmp_path):
    ppl = {"wikitext2": 30.0, "eval_windows": 4, "seqlen": 64}
    model = {"spec": "tiny", "sha256": "abc", "dtype": "float32"}
    a = _write_run(tmp_path, "wanda_50", method="wanda", sparsity=0.5, model=model, perplexity=ppl,
                   dense_perplexity={"wikitext2": 20.0})
    b = _write_run(tmp_path, "wanda_70", method="wanda", sparsity=0.7, model=model,
                   perplexity={**ppl, "wikitext2": 90.0}, dense_perplexity={"wikitext2": 20.0})
    md = compare_runs([a, b], tmp_path / "cmp", plots=False).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| dense (--eval-dense) | dense | - | - | 0.0 | — | 20.00 |")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| wanda_50", "| wanda_70"]
    assert "Dense row: perplexity only" in md and "run(s) wanda_50, wanda_70 (4 windows × 64 tokens)" in md
    with open(tmp_path / "cmp" / "comparison.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows[0]["run"] == "dense (--eval-dense)" and float(csv_rows[0]["ppl_wikitext2"]) == 20.0
    assert csv_rows[0]["eval_windows"] == "4" and csv_rows[0]["seqlen"] == "64" and csv_rows[0]["time_s"] == ""

    # a third run with other settings: the dense figures matching most runs are used, the other is named
    c = _write_run(tmp_path, "sgpt_50", method="sparsegpt", sparsity=0.5, model=model,
                   perplexity={"wikitext2": 25.0, "eval_windows": 8, "seqlen": 64},
                   dense_perplexity={"wikitext2": 19.0})
    md = compare_runs([a, b, c], tmp_path / "cmp2", plots=False).read_text()
    assert "| dense (--eval-dense) | dense | - | - | 0.0 | — | 20.00 |" in md and "19.00" not in md
    assert "Not used, as they were taken with other settings or on another model: 8 windows × 64 tokens " \
           "(runs sgpt_50)" in md

    # a tie between settings: no dense row, and the note says why
    md = compare_runs([a, c], tmp_path / "cmp3", plots=False).read_text()
    assert "| dense" not in md and "No dense row" in md and "Pass a dense run directory" in md

    # a real dense run wins over the recorded figures
    d = _write_run(tmp_path, "dense", method="dense", sparsity=0.0, perplexity={"wikitext2": 21.0, **ppl})
    md = compare_runs([a, d], tmp_path / "cmp4", plots=False).read_text()
    assert "--eval-dense" not in md and "| dense | dense |" in md


def test_csv_reads_back_into_the_same_table(runs, tmp_path):
    sparse, dense = runs
    compare_runs([sparse, dense], tmp_path / "cmp", plots=False)
    back = read_csv(tmp_path / "cmp" / "comparison.csv")
    assert [r.name for r in back] == ["dense", "sparsegpt_50"]
    assert back[1].perplexity == {"c4": 45.25, "wikitext2": 30.5}
    assert back[1].zeroshot == {"piqa": {"acc": 0.6, "acc_norm": 0.62}, "arc_easy": {"acc": 0.4, "acc_norm": 0.38}}
    assert (back[1].sparsity, back[1].time_s, back[1].peak_rss_mb) == (0.5, 12.5, 900.0)
    original = [load_run(dense), load_run(sparse)]
    strip = ("path",)
    assert ([{k: v for k, v in row.items() if k not in strip} for row in table_rows(back)]
            == [{k: v for k, v in row.items() if k not in strip} for row in table_rows(original)])


def test_rows_name_the_configuration(tmp_path):
    """The table's configuration column is the manifest's configuration label (issue 21): which SparseLLM, which
    AlphaPruning rule, which refiner."""
    run = tmp_path / "sllm"
    run.mkdir()
    manifest = {"method": "sparsellm", "sparsity": 0.7, "pattern": "unstructured", "allocation": "alpha",
                "achieved_sparsity": 0.7, "perplexity": {"wikitext2": 10.0}, "eval_windows": 2, "seqlen": 32,
                "config": {"method": "sparsellm", "inner": "sparsegpt", "allocation": "alpha",
                           "allocation_options": {"xmin_rule": "peak_reference"}},
                "resolved_options": {"solver": "sparsegpt", "method_options": {"refit_down": True,
                                                                               "select": "best"}}}
    (run / "lmprune.json").write_text(json.dumps(manifest))
    r = load_run(run)
    row = table_rows([r])[0]
    assert row["configuration"] == r.label and row["configuration"].startswith("sparsellm(sparsegpt")
    assert "peak_reference" in row["configuration"]
    md = compare_runs([run], tmp_path / "cmp")
    assert f"| sllm | {r.label} |" in md.read_text()
