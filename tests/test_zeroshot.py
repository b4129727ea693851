"""Zero-shot prompts (against the harness's own task definitions) and offline scoring of a tiny model."""

from __future__ import annotations

import ast
import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from lmprune.evaluation.prompts import TASKS, Prompt, build_prompts, hellaswag_query

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("LMPRUNE_DATA_DIR", REPO.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "zeroshot").is_dir(),
    reason=f"zero-shot data not found at {DATA_DIR / 'zeroshot'} (set LMPRUNE_DATA_DIR)",
)

# One made-up document per task in the local JSONL format, and the prompt it must give.
DOCS = {
    "piqa": {"goal": "How do I dry wet shoes?", "sol1": "Stuff them with newspaper.", "sol2": "Fill them with water.",
             "label": 0},
    "arc_easy": {"question": "Which gas do plants take in?", "choices": ["oxygen", "carbon dioxide", "helium", "neon"],
                 "label": 1},
    "arc_challenge": {"question": "What makes the Moon shine?", "choices": ["its own fire", "reflected sunlight",
                      "city lights", "lava"], "label": 1},
    "hellaswag": {"query": "Baking cookies: A woman mixes flour in a bowl. she", "endings": [
        "pours the batter into a pan.", "rides a bicycle.", "sings to the bowl.", "paints the oven."], "label": 0},
    "winogrande": {"options": ["The cup did not fit in the box because the cup",
                               "The cup did not fit in the box because the box"],
                   "continuation": "was too big.", "label": 0},
    "boolq": {"passage": "Whales are mammals that live in the ocean.", "question": "is a whale a mammal", "label": 1},
    "rte": {"sentence1": "The cat slept on the mat all day.", "sentence2": "The cat was awake.", "label": 1, "idx": 7},
    "openbookqa": {"question_stem": "Ice melts when it is", "choices": ["cooled", "heated", "painted", "named"],
                   "label": 1},
    "lambada_openai": {"text": "She opened the door and saw her old friend", "context":
                       "She opened the door and saw her old", "target": "friend"},
}

EXPECTED = {
    "piqa": Prompt("Question: How do I dry wet shoes?\nAnswer:",
                   [" Stuff them with newspaper.", " Fill them with water."], 0),
    "arc_easy": Prompt("Question: Which gas do plants take in?\nAnswer:",
                       [" oxygen", " carbon dioxide", " helium", " neon"], 1),
    "arc_challenge": Prompt("Question: What makes the Moon shine?\nAnswer:",
                            [" its own fire", " reflected sunlight", " city lights", " lava"], 1),
    "hellaswag": Prompt("Baking cookies: A woman mixes flour in a bowl. She",
                        [" pours the batter into a pan.", " rides a bicycle.", " sings to the bowl.",
                         " paints the oven."], 0),
    "winogrande": Prompt(("The cup did not fit in the box because the cup",
                          "The cup did not fit in the box because the box"), [" was too big."], 0),
    "boolq": Prompt("Whales are mammals that live in the ocean.\nQuestion: is a whale a mammal?\nAnswer:",
                    [" no", " yes"], 1),
    "rte": Prompt("The cat slept on the mat all day.\nQuestion: The cat was awake. True or False?\nAnswer:",
                  [" True", " False"], 1),
    "openbookqa": Prompt("Ice melts when it is", [" cooled", " heated", " painted", " named"], 1),
    "lambada_openai": Prompt("She opened the door and saw her old", [" friend"], 0),
}

# The same documents in the original datasets' format, as the harness's own task YAMLs read them.
ORIGINAL = {
    "piqa": DOCS["piqa"],
    "arc_easy": {"question": DOCS["arc_easy"]["question"], "answerKey": "B",
                 "choices": {"text": DOCS["arc_easy"]["choices"], "label": ["A", "B", "C", "D"]}},
    "arc_challenge": {"question": DOCS["arc_challenge"]["question"], "answerKey": "2",
                      "choices": {"text": DOCS["arc_challenge"]["choices"], "label": ["1", "2", "3", "4"]}},
    "hellaswag": {"activity_label": "Baking cookies", "ctx_a": "A woman mixes flour in a bowl.", "ctx_b": "she",
                  "endings": DOCS["hellaswag"]["endings"], "label": "0"},
    "winogrande": {"sentence": "The cup did not fit in the box because the _ was too big.", "option1": "cup",
                   "option2": "box", "answer": "1"},
    "boolq": DOCS["boolq"],
    "rte": DOCS["rte"],
    "openbookqa": {"question_stem": DOCS["openbookqa"]["question_stem"], "answerKey": "B",
                   "choices": {"text": DOCS["openbookqa"]["choices"], "label": ["A", "B", "C", "D"]}},
    "lambada_openai": {"text": DOCS["lambada_openai"]["text"]},
}
HARNESS_YAML = {
    "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
    "boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml", "lambada_openai": "lambada/lambada_openai.yaml",
}


def test_every_task_has_a_fixed_document():
    assert set(DOCS) == set(TASKS) == set(EXPECTED) == set(ORIGINAL)


@pytest.mark.parametrize("task", list(TASKS))
def test_prompt_strings(task):
    assert build_prompts(task, DOCS[task]) == EXPECTED[task]


def test_pairs_vary_context_for_partial_scoring():
    pairs = build_prompts("winogrande", DOCS["winogrande"]).pairs()
    assert pairs == [("The cup did not fit in the box because the cup", " was too big."),
                     ("The cup did not fit in the box because the box", " was too big.")]
    assert build_prompts("piqa", DOCS["piqa"]).pairs()[1] == (EXPECTED["piqa"].context, " Fill them with water.")


def test_hellaswag_query_capitalises_only_the_trailing_fragment():
    assert hellaswag_query("Skiing: A man skis down. the man") == "Skiing: A man skis down. The man"
    assert hellaswag_query("Home: How to cook. Boil water.") == "Home: How to cook. Boil water."


def _harness_value(spec, doc):
    """What the harness makes of a doc_to_text/doc_to_choice/doc_to_target entry (field, template or list)."""
    from lm_eval.utils import apply_template

    if callable(spec) or isinstance(spec, list):
        return spec(doc) if callable(spec) else spec
    if spec in doc:
        return doc[spec]
    text = apply_template(spec, doc)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@pytest.mark.parametrize("task", list(TASKS))
def test_prompts_match_the_harness_own_task(task):
    """The harness's own YAML on the original-format document gives the same requests and gold answer."""
    pytest.importorskip("lm_eval")
    import datasets
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / HARNESS_YAML[task])
    doc = ORIGINAL[task]
    if "process_docs" in cfg:
        doc = cfg["process_docs"](datasets.Dataset.from_list([doc]))[0]
    text = _harness_value(cfg["doc_to_text"], doc)
    target = _harness_value(cfg["doc_to_target"], doc)
    ours = build_prompts(task, DOCS[task])
    if cfg["output_type"] == "loglikelihood":
        assert ours.pairs() == [(text, target)]
        return
    choices = _harness_value(cfg["doc_to_choice"], doc)
    if isinstance(text, int):  # partial scoring: the choices are the contexts
        pairs, gold = [(c, " " + target) for c in choices], text
    else:
        pairs, gold = [(text, " " + c) for c in choices], target
    assert ours.pairs() == pairs
    assert ours.gold == gold
    assert set(TASKS[task].metrics) == {m["metric"] for m in cfg["metric_list"]}


def test_unknown_task_and_missing_field():
    with pytest.raises(ValueError, match="unknown zero-shot task 'piqa2'"):
        build_prompts("piqa2", DOCS["piqa"])
    with pytest.raises(ValueError, match="lacks field"):
        build_prompts("piqa", {"goal": "x"})


@pytest.fixture
def one_task_data_dir(tmp_path):
    (tmp_path / "zeroshot").mkdir()
    (tmp_path / "zeroshot" / "piqa.jsonl").write_text(json.dumps(DOCS["piqa"]) + "\n")
    return tmp_path


def test_missing_task_file_is_a_clear_error(one_task_data_dir):
    from lmprune.evaluation.zeroshot import evaluate_tasks

    with pytest.raises(ValueError, match=r"'arc_easy': data file .*arc_easy\.jsonl not found"):
        evaluate_tasks(None, None, ["piqa", "arc_easy"], data_dir=one_task_data_dir)
    with pytest.raises(ValueError, match="unknown zero-shot task 'nope'"):
        evaluate_tasks(None, None, ["nope"], data_dir=one_task_data_dir)


def test_data_dir_defaults_to_the_environment(one_task_data_dir, monkeypatch):
    from lmprune.evaluation.zeroshot import evaluate_tasks

    monkeypatch.setenv("LMPRUNE_DATA_DIR", str(one_task_data_dir))
    with pytest.raises(ValueError, match=f"{one_task_data_dir}.*boolq\\.jsonl not found"):
        evaluate_tasks(None, None, ["boolq"])


def test_missing_lm_eval_says_how_to_install(one_task_data_dir, monkeypatch):
    from lmprune.evaluation.zeroshot import evaluate_tasks

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"pip install 'lmprune\[eval\]'"):
        evaluate_tasks(None, None, ["piqa"], data_dir=one_task_data_dir)


def _first_docs(task: str, n: int) -> list[dict]:
    with open(DATA_DIR / "zeroshot" / f"{task}.jsonl") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


@pytest.fixture(scope="module")
def tiny_lm():
    """A 2-layer random LLaMA with a byte-level BPE tokenizer trained here on the first documents of each task."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.dumps(doc) for task in TASKS for doc in _first_docs(task, 5)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config), tokenizer


@needs_data
def test_tiny_model_scores_five_documents_of_each_task_offline(tiny_lm):
    pytest.importorskip("lm_eval")
    from lmprune.evaluation.zeroshot import evaluate_tasks, score_table

    model, tokenizer = tiny_lm
    result = evaluate_tasks(model, tokenizer, list(TASKS), data_dir=DATA_DIR, limit=5, batch_size=4,
                            log_samples=True)
    assert result["limit"] == 5 and result["offline"] is True
    assert result["n_docs"] == {t: 5 for t in TASKS}
    assert result["lm_eval_version"]
    scores = score_table(result)
    assert set(scores) == set(TASKS)
    for task, spec in TASKS.items():
        for metric in spec.metrics:
            assert metric in scores[task], (task, metric)
        for metric in ("acc", "acc_norm"):
            if metric in scores[task]:
                assert scores[task][metric] in {i / 5 for i in range(6)}
    assert scores["lambada_openai"]["perplexity"] > 1.0
    # the harness ran exactly the requests build_prompts describes, document by document
    for task in TASKS:
        samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
        for sample, doc in zip(samples, _first_docs(task, 5), strict=True):
            assert [tuple(a[:2]) for a in sample["arguments"]] == build_prompts(task, doc).pairs(), task


def test_online_unknown_task_is_named():
    from types import SimpleNamespace

    from lmprune.evaluation.zeroshot import _check_online_tasks

    manager = SimpleNamespace(all_tasks=["piqa", "arc_easy"])
    _check_online_tasks(manager, ["piqa"])
    with pytest.raises(ValueError, match="unknown lm-eval task.*piqa_xl"):
        _check_online_tasks(manager, ["piqa", "piqa_xl"])
