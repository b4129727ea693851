"""Zero-shot prompts of the nine standard tasks, as lm-evaluation-harness builds them, for the local JSONL files.

Every task is scored by log-likelihood: each answer choice ``i`` gives one request ``(context_i, continuation_i)``
and the prediction is the choice with the highest ``log p(continuation | context)`` (``acc``), or the highest
log-likelihood per character of the choice (``acc_norm``). Most tasks share one context and vary the
continuation; WinoGrande (partial scoring) varies the context and shares the continuation; LAMBADA has one
request whose ``acc`` is whether the target is the greedy continuation.

The field names are those of ``<data_dir>/zeroshot/<task>.jsonl`` (see the data README). This module is pure
Python: it imports neither torch nor lm-eval, so prompts can be checked without either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

TARGET_DELIMITER = " "  # the harness's default between a context and each answer choice


class Prompt(NamedTuple):
    """The requests of one document.

    ``context`` is one string shared by all continuations, or (partial scoring) a tuple with one context per
    choice and a single shared continuation. ``gold`` indexes the right choice.
    """

    context: str | tuple[str, ...]
    continuations: list[str]
    gold: int

    def pairs(self) -> list[tuple[str, str]]:
        """The ``(context, continuation)`` pairs whose log-likelihoods are compared, one per choice."""
        if isinstance(self.context, tuple):
            (continuation,) = self.continuations
            return [(c, continuation) for c in self.context]
        return [(self.context, c) for c in self.continuations]


@dataclass(frozen=True)
class TaskSpec:
    """One task: the fields its documents need, how to prompt them, what the harness reports, and the
    equivalent harness YAML fields (Jinja templates or feature names over the local field names)."""

    name: str
    fields: tuple[str, ...]
    build: Callable[[dict[str, Any]], Prompt]
    metrics: tuple[str, ...]
    output_type: str
    harness: dict[str, Any]


class FunctionRef(str):
    """A dotted path to a function, written as the harness's ``!function`` YAML tag."""


def _choices(doc: dict, key: str = "choices") -> list[str]:
    return [TARGET_DELIMITER + c for c in doc[key]]


def _question_answer(doc: dict) -> Prompt:
    return Prompt(f"Question: {doc['question']}\nAnswer:", _choices(doc), int(doc["label"]))


def _piqa(doc: dict) -> Prompt:
    return Prompt(
        f"Question: {doc['goal']}\nAnswer:",
        [TARGET_DELIMITER + doc["sol1"], TARGET_DELIMITER + doc["sol2"]],
        int(doc["label"]),
    )


def _openbookqa(doc: dict) -> Prompt:
    return Prompt(doc["question_stem"], _choices(doc), int(doc["label"]))


def hellaswag_query(query: str) -> str:
    """The harness's HellaSwag context from the local ``query``.

    The harness builds ``activity_label + ": " + ctx_a + " " + ctx_b.capitalize()``; the local ``query`` is
    already cleaned of WikiHow markup but keeps ``ctx_b`` (the fragment after ``ctx_a``'s last sentence, e.g.
    "he", "the lady") lower-case. Capitalising the first letter of the text after the last ". " restores it;
    where ``ctx_b`` is empty that text is a sentence already capitalised, so nothing changes.
    """
    head, sep, tail = query.rpartition(". ")
    return head + sep + tail[:1].upper() + tail[1:]


def hellaswag_process_docs(dataset):
    """``process_docs`` hook for the harness: rewrites ``query`` with :func:`hellaswag_query`."""
    return dataset.map(lambda doc: {"query": hellaswag_query(doc["query"])})


def _hellaswag(doc: dict) -> Prompt:
    # the local endings are the harness's preprocessed ones already
    return Prompt(hellaswag_query(doc["query"]), _choices(doc, "endings"), int(doc["label"]))


def _winogrande(doc: dict) -> Prompt:
    return Prompt(tuple(doc["options"]), [TARGET_DELIMITER + doc["continuation"]], int(doc["label"]))


def _boolq(doc: dict) -> Prompt:
    return Prompt(
        f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
        [TARGET_DELIMITER + "no", TARGET_DELIMITER + "yes"],
        int(doc["label"]),
    )


def _rte(doc: dict) -> Prompt:
    return Prompt(
        f"{doc['sentence1']}\nQuestion: {doc['sentence2']} True or False?\nAnswer:",
        [TARGET_DELIMITER + "True", TARGET_DELIMITER + "False"],
        int(doc["label"]),
    )


def _lambada(doc: dict) -> Prompt:
    # equals the harness's split of `text` at its last space (checked on the whole local file)
    return Prompt(doc["context"], [" " + doc["target"]], 0)


_ACC_NORM = ("acc", "acc_norm")
_MC = "multiple_choice"
_QA_TEXT = "Question: {{question}}\nAnswer:"

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("piqa", ("goal", "sol1", "sol2", "label"), _piqa, _ACC_NORM, _MC, {
            "doc_to_text": "Question: {{goal}}\nAnswer:",
            "doc_to_choice": "{{[sol1, sol2]}}",
            "doc_to_target": "label",
        }),
        TaskSpec("arc_easy", ("question", "choices", "label"), _question_answer, _ACC_NORM, _MC, {
            "doc_to_text": _QA_TEXT, "doc_to_choice": "choices", "doc_to_target": "label",
        }),
        TaskSpec("arc_challenge", ("question", "choices", "label"), _question_answer, _ACC_NORM, _MC, {
            "doc_to_text": _QA_TEXT, "doc_to_choice": "choices", "doc_to_target": "label",
        }),
        TaskSpec("hellaswag", ("query", "endings", "label"), _hellaswag, _ACC_NORM, _MC, {
            "process_docs": FunctionRef(f"{__name__}.hellaswag_process_docs"),
            "doc_to_text": "query", "doc_to_choice": "endings", "doc_to_target": "label",
        }),
        # doc_to_text naming an integer field tells the harness the choices are contexts (partial scoring)
        TaskSpec("winogrande", ("options", "continuation", "label"), _winogrande, ("acc",), _MC, {
            "doc_to_text": "label", "doc_to_choice": "options", "doc_to_target": "continuation",
        }),
        TaskSpec("boolq", ("passage", "question", "label"), _boolq, ("acc",), _MC, {
            "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
            "doc_to_choice": ["no", "yes"],
            "doc_to_target": "label",
        }),
        TaskSpec("rte", ("sentence1", "sentence2", "label"), _rte, ("acc",), _MC, {
            "doc_to_text": "{{sentence1}}\nQuestion: {{sentence2}} True or False?\nAnswer:",
            "doc_to_choice": ["True", "False"],
            "doc_to_target": "label",
        }),
        TaskSpec("openbookqa", ("question_stem", "choices", "label"), _openbookqa, _ACC_NORM, _MC, {
            "doc_to_text": "question_stem", "doc_to_choice": "choices", "doc_to_target": "label",
        }),
        TaskSpec("lambada_openai", ("context", "target"), _lambada, ("perplexity", "acc"), "loglikelihood", {
            "doc_to_text": "context", "doc_to_target": "{{' ' + target}}",
        }),
    )
}

DEFAULT_TASKS: tuple[str, ...] = tuple(TASKS)


def task_spec(task: str) -> TaskSpec:
    """The spec of ``task``; a one-line ``ValueError`` naming it when unknown."""
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown zero-shot task {task!r}; known tasks: {', '.join(TASKS)}") from None


def build_prompts(task: str, doc: dict[str, Any]) -> Prompt:
    """``(context, continuations, gold)`` of one document of ``task`` (a row of ``<task>.jsonl``)."""
    spec = task_spec(task)
    missing = [f for f in spec.fields if f not in doc]
    if missing:
        raise ValueError(f"{task} document lacks field(s) {', '.join(missing)}; it has {', '.join(doc)}")
    return spec.build(doc)
