"""Named text sources, offline first.

A data directory (``--data-dir`` or ``$LMPRUNE_DATA_DIR``) laid out like ``shared/data``::

    text/wikitext2_test.raw   text/ptb_test.txt   text/c4_validation_2k.jsonl.gz

resolves the names ``wikitext2``, ``ptb`` and ``c4``. Without a data directory the same names load through
``datasets`` (needs the Hub). Any other name is a path to a ``.txt`` file (one text) or a ``.jsonl``/
``.jsonl.gz`` file (one document per line, field ``text``).

Evaluation texts follow the SparseGPT/Wanda protocol (see the data README); C4 documents 0-1099 are for
evaluation only and 1100-1999 for calibration, so calibration never sees evaluated text.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

NAMED = ("wikitext2", "ptb", "c4")
C4_EVAL_DOCS = range(0, 1100)
C4_CALIB_DOCS = range(1100, 2000)
_FILES = {
    "wikitext2": "text/wikitext2_test.raw",
    "ptb": "text/ptb_test.txt",
    "c4": "text/c4_validation_2k.jsonl.gz",
}


class DataError(ValueError):
    """A dataset name or file that cannot be resolved or read."""


@dataclass
class TextSource:
    """Documents of one source plus provenance for the manifest."""

    name: str
    documents: list[str]
    origin: str  # file path or "datasets:<id>"
    sha256: str | None
    join: str = " "  # how documents become one evaluation stream
    stream: bool = False  # calibration windows come from the joined text, not from single documents

    def joined(self) -> str:
        return self.join.join(self.documents)


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The data directory: the explicit argument, else ``$LMPRUNE_DATA_DIR``, else None (online)."""
    value = explicit if explicit is not None else os.environ.get("LMPRUNE_DATA_DIR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory not found: {path}")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{path}: line {n} is not valid JSON") from None
    return rows


def _wikitext_rows(raw: str) -> list[str]:
    """Rows as the HF dataset has them: each line with its newline, blank lines as empty strings."""
    return [line if line.strip() else "" for line in raw.splitlines(keepends=True)]


def _named_offline(name: str, root: Path, split: str) -> TextSource:
    path = root / _FILES[name]
    if not path.is_file():
        raise DataError(f"dataset {name!r}: file not found: {path}")
    sha = _sha256(path)
    if name == "wikitext2":
        rows = _wikitext_rows(path.read_text(encoding="utf-8"))
        return TextSource(name, rows, str(path), sha, join="\n\n", stream=True)
    if name == "ptb":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return TextSource(name, lines, str(path), sha, join=" ", stream=True)
    docs = [r["text"] for r in _read_jsonl(path)]
    docs = [docs[i] for i in (C4_EVAL_DOCS if split == "eval" else C4_CALIB_DOCS) if i < len(docs)]
    return TextSource(name, docs, f"{path}[{split}]", sha, join=" ")


def _named_online(name: str, split: str) -> TextSource:
    try:
        from datasets import load_dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise DataError("no data directory given and the datasets library is missing") from None
    try:
        if name == "wikitext2":
            rows = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
            return TextSource(name, list(rows), "datasets:wikitext/wikitext-2-raw-v1:test", None, "\n\n", True)
        if name == "ptb":
            rows = load_dataset("ptb_text_only", "penn_treebank", split="test")["sentence"]
            return TextSource(name, [r.strip() for r in rows], "datasets:ptb_text_only:test", None, " ", True)
        shard = "en/c4-validation.00000-of-00008.json.gz"
        rows = load_dataset("allenai/c4", data_files={"validation": shard}, split="validation")["text"]
        docs = [rows[i] for i in (C4_EVAL_DOCS if split == "eval" else C4_CALIB_DOCS)]
        return TextSource(name, docs, f"datasets:allenai/c4:{shard}[{split}]", None, " ")
    except Exception as e:  # the Hub raises many types; report one line
        raise DataError(
            f"dataset {name!r}: no data directory (--data-dir / LMPRUNE_DATA_DIR) and datasets failed: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None


def _file_source(spec: str) -> TextSource:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"unknown dataset {spec!r}: not one of {', '.join(NAMED)} and not a file")
    sha = _sha256(path)
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        rows = _read_jsonl(path)
        if not rows or "text" not in rows[0]:
            raise DataError(f"{path}: JSONL documents need a 'text' field")
        return TextSource(path.name, [r["text"] for r in rows], str(path), sha, join=" ")
    return TextSource(path.name, [path.read_text(encoding="utf-8")], str(path), sha, join="", stream=True)


def load_source(spec: str, split: str = "eval", root: str | os.PathLike | None = None) -> TextSource:
    """Resolve a dataset name or file. ``split`` is "eval" or "calib" (matters for C4)."""
    if split not in ("eval", "calib"):
        raise ValueError(f"split must be 'eval' or 'calib', not {split!r}")
    if spec in NAMED:
        directory = data_dir(root)
        return _named_offline(spec, directory, split) if directory else _named_online(spec, split)
    return _file_source(spec)
