"""A declared structure (``--adapter FILE.yaml``): for the layouts discovery gets wrong, checked against the model.

The file says where the blocks are and which matrices of a block are pruned, grouped by shared input, in forward
order; the feed-forward shape is optional (without it, block methods such as SparseLLM refuse the model)::

    blocks: model.layers                    # dotted path of the decoder block list
    groups:                                 # matrices reading one input share a Gram matrix
      - [self_attn.q_proj, self_attn.k_proj, self_attn.v_proj]
      - [self_attn.o_proj]
      - [mlp.gate_proj, mlp.up_proj]
      - [mlp.down_proj]
    ffn: {kind: swiglu, gate: mlp.gate_proj, up: mlp.up_proj, down: mlp.down_proj, act: silu}

``matrices: [a, b, ...]`` may replace ``groups`` (each matrix then reads its own input). Checked against the
model: the block list exists and is a non-empty ``nn.ModuleList``; every matrix exists in every block and is a
``nn.Linear`` or ``Conv1D``; no matrix is named twice; the matrices of a group have the same input width; the FFN
names declared matrices, its kind is ``relu`` (``down(act(up(x)))``) or ``swiglu`` (``down(act(gate(x)) *
up(x))``, with a gate) and its activation one lmprune knows. Any violation is one line naming the file and the
entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from torch import nn

from ..errors import yaml_problem
from .adapters import FFNSpec, UnsupportedModelError
from .discovery import ACTIVATIONS, Structure, as_matrix, is_matrix

_KEYS = {"blocks", "groups", "matrices", "ffn"}


class AdapterFileError(UnsupportedModelError):
    """An adapter file that cannot be read or does not fit the model."""


def read_adapter_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise AdapterFileError(f"cannot read adapter file {p}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise AdapterFileError(f"cannot parse adapter file {p}: {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"adapter file {p}: expected a mapping with 'blocks' and 'groups'")
    unknown = set(data) - _KEYS
    if unknown:
        raise AdapterFileError(f"adapter file {p}: unknown key {sorted(unknown)[0]!r} (known: {', '.join(sorted(_KEYS))})")
    return data


def _groups(data: dict[str, Any], where: str) -> tuple[tuple[str, ...], ...]:
    if ("groups" in data) == ("matrices" in data):
        raise AdapterFileError(f"{where}: give exactly one of 'groups' and 'matrices'")
    if "matrices" in data:
        raw = [[m] for m in data["matrices"] or []]
    else:
        raw = data["groups"] or []
    if not raw or not all(isinstance(g, list) and g and all(isinstance(m, str) for m in g) for g in raw):
        raise AdapterFileError(f"{where}: 'groups' must be a non-empty list of non-empty lists of matrix names")
    names = [m for g in raw for m in g]
    dup = next((m for m in names if names.count(m) > 1), None)
    if dup:
        raise AdapterFileError(f"{where}: matrix {dup!r} is named twice")
    return tuple(tuple(g) for g in raw)


def _ffn(data: dict[str, Any], names: set[str], where: str) -> FFNSpec:
    spec = data.get("ffn")
    if spec is None:
        return FFNSpec("unknown", "", "", verified=False, reason=f"{where} declares no 'ffn'")
    if not isinstance(spec, dict) or spec.get("kind") not in ("relu", "swiglu"):
        raise AdapterFileError(f"{where}: ffn.kind must be 'relu' or 'swiglu'")
    kind, act = spec["kind"], spec.get("act", "silu" if spec["kind"] == "swiglu" else "relu")
    extra = set(spec) - {"kind", "up", "gate", "down", "act"}
    if extra:
        raise AdapterFileError(f"{where}: unknown ffn key {sorted(extra)[0]!r}")
    if act not in ACTIVATIONS:
        raise AdapterFileError(f"{where}: ffn.act {act!r} is not one of {', '.join(ACTIVATIONS)}")
    roles = ("up", "down", "gate") if kind == "swiglu" else ("up", "down")
    for role in roles:
        if spec.get(role) not in names:
            raise AdapterFileError(f"{where}: ffn.{role} must name one of the declared matrices")
    if kind == "relu" and spec.get("gate"):
        raise AdapterFileError(f"{where}: a 'relu' ffn has no gate (use kind: swiglu)")
    return FFNSpec(kind, spec["up"], spec["down"], gate=spec.get("gate"), act=act, verified=True,
                   reason="declared")


def load_adapter_file(path: str | Path, model: nn.Module) -> Structure:
    """The structure declared in ``path``, checked against ``model``."""
    where = f"adapter file {path}"
    data = read_adapter_file(path)
    blocks_path = data.get("blocks")
    if not isinstance(blocks_path, str) or not blocks_path:
        raise AdapterFileError(f"{where}: 'blocks' must be the dotted path of the decoder block list")
    try:
        blocks = model.get_submodule(blocks_path)
    except AttributeError:
        raise AdapterFileError(f"{where}: the model has no module '{blocks_path}'") from None
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise AdapterFileError(f"{where}: '{blocks_path}' is not a non-empty list of blocks")
    groups = _groups(data, where)
    names = [m for g in groups for m in g]
    transposed = set()
    for i, block in enumerate(blocks):
        for name in names:
            try:
                module = block.get_submodule(name)
            except AttributeError:
                raise AdapterFileError(f"{where}: block {i} has no matrix '{name}'") from None
            if not is_matrix(module):
                raise AdapterFileError(f"{where}: '{name}' is {type(module).__name__}, neither a Linear nor a Conv1D")
            if not isinstance(module, nn.Linear):
                transposed.add(name)
        for g in groups:
            widths = {as_matrix(block.get_submodule(m)).in_features for m in g}
            if len(widths) > 1:
                raise AdapterFileError(f"{where}: group {list(g)} mixes input widths {sorted(widths)}")
    ffn = _ffn(data, set(names), where)
    if ffn.kind != "unknown":
        mats = {r: as_matrix(blocks[0].get_submodule(r)) for r in (ffn.up, ffn.gate, ffn.down) if r}
        width = mats[ffn.down].in_features
        if any(mats[r].out_features != width for r in (ffn.up, ffn.gate) if r):
            raise AdapterFileError(f"{where}: the ffn's up/gate outputs do not have {ffn.down}'s input width {width}")
    family = str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))
    return Structure(family, blocks_path, groups, ffn, frozenset(transposed), (),
                     "declared", {"adapter_file": str(path)})


def use_adapter_file(model: nn.Module, path: str | Path | None) -> None:
    """From now on, ``model``'s structure is the one ``path`` declares (nothing when ``path`` is None)."""
    if path is not None:
        from .discovery import declare

        declare(model, load_adapter_file(path, model))
