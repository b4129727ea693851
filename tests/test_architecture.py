"""The shape of the code, checked: layers import downwards only, no import cycle, narrow functions, a short API
facade, and no model family named outside ``models/``."""

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lmprune"

#: Each module's layer; a module may import its own layer and those below, never one above.
LAYERS = [
    ("errors", "patterns"),
    ("registry", "config", "activations", "gram_sum", "distributed", "solvers", "refiners", "allocation", "data", "models",
     "evaluation", "report"),
    ("layer_pruner", "engine", "strategies"),
    ("run",),
    ("pipeline",),
    ("api", "cli", "__init__", "__main__"),
]


def _module(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> int:
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"module {module} has no layer in LAYERS")


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """lmprune modules imported by ``path`` (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("lmprune."):
                name = node.module.removeprefix("lmprune.")
            else:
                continue
            for alias in node.names:
                sub = f"{name}.{alias.name}" if name else alias.name
                out.add(sub if (SRC / Path(*sub.split("."))).with_suffix(".py").exists()
                        or (SRC / Path(*sub.split("."))).is_dir() else name)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("lmprune.") for a in node.names if a.name.startswith("lmprune.")}
    return {m for m in out if m}


FILES = sorted(SRC.rglob("*.py"))


def test_every_import_goes_to_the_same_or_a_lower_layer():
    wrong = []
    for f in FILES:
        me = _module(f)
        for target in _imports(f, top_level_only=False):
            if _layer(target) > _layer(me):
                wrong.append(f"{me} imports {target}")
    assert not wrong, wrong


def test_no_import_cycle_at_module_level():
    graph = {_module(f): {t for t in _imports(f, top_level_only=True)} for f in FILES}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif not state.get(nxt):
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [node])
    # a package imports its own submodules in __init__; that is not a cycle between concerns
    cycles = [c for c in cycles if not all(m.startswith(c[0].split(".")[0]) and "." not in c[0] for m in c)]
    assert not cycles, cycles


def _params(node: ast.FunctionDef) -> int:
    a = node.args
    n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    return n - (1 if a.args and a.args[0].arg in ("self", "cls") else 0)


def test_no_function_takes_more_than_eight_parameters():
    wide = [f"{_module(f)}.{n.name} ({_params(n)})" for f in FILES for n in ast.walk(ast.parse(f.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and _params(n) > 8]
    assert not wide, wide


def test_api_is_a_short_facade():
    assert len((SRC / "api.py").read_text().splitlines()) < 120


@pytest.mark.parametrize("pattern", [r"\.model\.layers\b", r"\.decoder\.layers\b",
                                     r"""["'](llama|mistral|qwen2|qwen3|opt)["']""", r"\bif\b.*\bin\b.*model_type"])
def test_no_family_knowledge_outside_models(pattern):
    found = [f"{_module(f)}:{i}" for f in FILES if not _module(f).startswith("models")
             for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not found, found
