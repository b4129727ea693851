"""The error every layer raises for input that cannot run (one line, shown as ``lmprune: error: …``, exit 2), and
the one-line form of a YAML parse error shared by recipes and adapter files."""

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the problem."""


def yaml_problem(e: yaml.YAMLError) -> str:
    """One line from a YAML error: where (1-based line and column) and what."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = " ".join(str(x) for x in (getattr(e, "problem", None), getattr(e, "context", None)) if x)
    what = what or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what
