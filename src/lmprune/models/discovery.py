"""The structure of a decoder-only causal LM, discovered from the loaded model rather than looked up by family.

:func:`discover` finds, for any model transformers can load:

* **the decoder block list**: the ``nn.ModuleList`` whose children are blocks of one class holding prunable
  matrices (lists nested in another candidate, such as expert lists, are not blocks), confirmed by a probe
  forward in which each block is called exactly once, in index order, on a hidden-state tensor;
* **the prunable matrices of a block**: every ``nn.Linear`` (subclasses included) and transformers' ``Conv1D``
  (weight stored ``in x out``; :class:`Conv1DMatrix` shows it ``out x in`` to the solvers) that the probe forward
  of one block actually calls. Embeddings, ``lm_head`` and norms are never in a block's matrix list;
* **experts** (mixture-of-experts blocks, :attr:`Structure.moe`): each slice ``W[e]`` of a 3-D parameter the
  probe sees used as one expert's matrix (:mod:`lmprune.models.experts`) is a matrix named ``path.e``, and every
  expert of an expert list is listed whether or not the probe routed a token to it; in such a block a non-expert
  matrix with at most one output per expert (a router, a shared expert's gate) is not pruned;
* **their forward order and input groups**: from one probe forward of block 0 on the inputs the model itself
  gives it (hidden states and every keyword argument), with a forward-pre-hook on every matrix. Matrices
  receiving the *same tensor* (the same object, or the same storage, offset, shape and strides) read the same
  input and share one Gram matrix. Values are not compared: two different norms of one hidden state are equal
  at initialisation (unit weights) and still are different inputs;
* **blocks of different structures** (dense and MoE layers in one model): blocks are grouped by their matrices'
  names and shapes, the first block of each group is probed on the inputs the model gives *it*, and the group
  lists are merged (:attr:`Structure.block_kinds`); each block's matrices are those it has;
* **the feed-forward shape** (for block methods such as SparseLLM): the matrix ``down`` and the earlier
  matrices whose outputs make its input, verified numerically on the probe's tensors: ``down_in = act(up(x))``
  (``relu`` kind) or ``act(gate(x)) * up(x)`` (``swiglu`` kind) for one activation of :data:`ACTIVATIONS`.
  Where no such relation holds (a fused ``gate_up`` matrix, experts, a block on ``meta``), :attr:`FFNSpec.reason`
  says why and block methods refuse.

The probe runs on the model's own device. A model whose weights are on ``meta`` (a memory plan, a streamed
model) is probed with its non-block weights given temporary uninitialised storage (virtual memory, never
written) and block 0 run on ``meta``: order and groups come from tensor identity, which ``meta`` keeps. A
mixture-of-experts block 0 gets such storage too, since routing needs values.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import FamilyAdapter, FFNSpec, UnsupportedModelError
from .experts import ExpertMatrix, ExpertParam, expert_lists, tap_experts, three_d_params

#: Keyword arguments of a block call that are not inputs to replay (caches, output switches).
DROPPED_KWARGS = ("past_key_value", "past_key_values", "cache", "layer_past", "use_cache", "output_attentions")

#: Activations an FFN may apply between its up (and gate) and down matrices, tried in this order.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


def is_matrix(module: nn.Module) -> bool:
    """A module whose weight is one prunable 2-D matrix (``nn.Linear`` or transformers' ``Conv1D``)."""
    return isinstance(module, (nn.Linear,) + _conv1d_type())


class Conv1DMatrix:
    """A transformers ``Conv1D`` seen as a linear: ``weight`` is the ``out x in`` view of its ``in x out``
    parameter, so reading it and writing into it (``copy_``) go through to the module's own storage."""

    transposed = True

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def weight(self) -> Tensor:
        return self.module.weight.T

    @property
    def bias(self) -> Tensor | None:
        return self.module.bias

    @property
    def in_features(self) -> int:
        return int(self.module.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.module.weight.shape[1])

    def register_forward_hook(self, hook, **kw):
        return self.module.register_forward_hook(hook, **kw)

    def register_forward_pre_hook(self, hook, **kw):
        return self.module.register_forward_pre_hook(hook, **kw)


def as_matrix(module: nn.Module):
    """``module`` as the engine handles a matrix: a ``nn.Linear`` as is, a ``Conv1D`` through its view."""
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, _conv1d_type()):
        return Conv1DMatrix(module)
    raise UnsupportedModelError(f"{type(module).__name__} is neither a Linear nor a Conv1D")


# ----------------------------------------------------------------------------------------------- block list


def _has_matrix(module: nn.Module) -> bool:
    return any(is_matrix(m) for m in module.modules())


def block_list_candidates(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Module lists of one block class holding prunable matrices, outermost only, largest first."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(c) for c in module}) != 1 or not _has_matrix(module[0]):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found):
            continue
        found.append((name, module))
    return sorted(found, key=lambda c: -sum(p.numel() for p in c[1].parameters()))


def find_blocks_path(model: nn.Module) -> str:
    """The dotted path of the decoder block list, structurally (no forward): the largest candidate list."""
    candidates = block_list_candidates(model)
    if not candidates:
        raise UnsupportedModelError(
            f"no decoder block list found in {type(model).__name__}: no nn.ModuleList of blocks holding Linear or "
            "Conv1D layers (declare one with --adapter FILE.yaml)"
        )
    return candidates[0][0]


def embeddings_and_head(model: nn.Module) -> dict[str, nn.Module]:
    """The input embeddings and the output head by module name, as the model itself names them
    (``get_input_embeddings`` / ``get_output_embeddings``): its largest non-block weights, ``vocab x hidden``."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return {name: m for name, m in model.named_modules() if any(m is w for w in wanted)}


# ----------------------------------------------------------------------------------------------- block calls


class StopForward(Exception):
    """Raised inside a hook to end a probe forward early."""


@dataclass
class BlockCall:
    """What the model passed to one block: positional arguments (the hidden states first) and keywords."""

    args: tuple
    kwargs: dict[str, Any]

    @property
    def hidden(self) -> Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def replay_kwargs(self) -> dict[str, Any]:
        """The keyword arguments to call the block with again (hidden states and caches left out)."""
        return {k: v for k, v in self.kwargs.items() if k != "hidden_states" and k not in DROPPED_KWARGS}


def call_blocks(model: nn.Module, blocks: nn.ModuleList, input_ids: Tensor, *, all_blocks: bool) -> list[BlockCall]:
    """Run ``model`` on ``input_ids`` without running any block: each block's forward is replaced, for this call
    only, by a stub recording its arguments and returning its hidden states unchanged. With ``all_blocks`` the
    model goes on to the last block (the keyword arguments of every block, such as per-layer masks); otherwise
    it stops at block 0. The blocks' own weights are never used (they may be on ``meta``)."""
    calls: list[BlockCall] = []
    last = len(blocks) - 1 if all_blocks else 0

    def stub_for(i: int):
        def stub(*args, **kwargs):
            if len(calls) != i:
                raise UnsupportedModelError(f"block {i} was called out of order (after {len(calls)} block calls)")
            calls.append(BlockCall(args, kwargs))
            if i == last:
                raise StopForward
            return calls[-1].hidden

        return stub

    own = [block.__dict__.get("forward") for block in blocks]  # a forward set on the instance (wrappers) stays
    for i, block in enumerate(blocks):
        block.forward = stub_for(i)
    try:
        with torch.no_grad():
            model(input_ids, use_cache=False)
    except StopForward:
        pass
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
    if len(calls) != last + 1:
        raise UnsupportedModelError(f"the model called {len(calls)} of its {len(blocks)} blocks in a forward pass")
    return calls


def probe_ids(model: nn.Module, length: int = 16) -> Tensor:
    """A short token window valid for ``model``'s vocabulary (for structure only; values do not matter)."""
    vocab = int(getattr(model.config, "vocab_size", 0) or 0) or 2
    return ((torch.arange(length) * 7 + 3) % vocab).unsqueeze(0)


# ----------------------------------------------------------------------------------------------- block probe


@dataclass
class _Call:
    rel: str
    x: Tensor
    out: Tensor


def _same_input(a: Tensor, b: Tensor) -> bool:
    if a is b:
        return True
    if a.device.type == "meta" or b.device.type == "meta" or a.device != b.device:
        return False
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.storage_offset() ==
            b.storage_offset() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)


def _moe_parts(block: nn.Module) -> list[str]:
    """Parts of ``block`` that hold experts: 3-D weights, or lists of identical modules holding matrices."""
    return list(three_d_params(block)) + expert_lists(block, is_matrix)


def _probe_block(block: nn.Module, call: BlockCall) -> tuple[list[_Call], list[str], dict[str, ExpertParam]]:
    """One forward of ``block`` on ``call``: each matrix's first call (name, input, output) in forward order,
    expert slices of 3-D parameters included (named ``path.e``); the matrices the forward never called; the 3-D
    parameters used as expert matrices."""
    named = {n: m for n, m in block.named_modules() if n and is_matrix(m)}
    cubes = three_d_params(block)
    seen: dict[str, _Call] = {}
    order: list[str] = []
    used: dict[str, ExpertParam] = {}

    def record(rel: str, x: Tensor, out: Tensor) -> None:
        if rel not in seen:
            seen[rel] = _Call(rel, x, out)
            order.append(rel)

    def on_expert(path: str, expert: int, transposed: bool, x: Tensor, out: Tensor) -> None:
        used.setdefault(path, ExpertParam(path, int(cubes[path].shape[0]), transposed))
        record(used[path].rel(expert), x, out)

    handles = [m.register_forward_hook(lambda _m, args, out, n=n: record(n, args[0], out)) for n, m in named.items()]
    try:
        with torch.no_grad(), tap_experts(block, cubes, on_expert):
            block(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    unused = [path for path in cubes if path not in used]
    if unused and block.get_parameter(unused[0]).device.type != "meta":
        raise UnsupportedModelError(f"the 3-D parameter '{unused[0]}' is not used as one matrix per expert "
                                    "(declare the matrices with --adapter FILE.yaml)")
    return [seen[r] for r in order], [n for n in named if n not in seen], used


def _expert_key(rel: str, lists: list[str], cubes: dict[str, ExpertParam]) -> tuple[str, int, str] | None:
    """``(family, expert, member)`` of an expert matrix name; None for an ordinary matrix. A 3-D parameter's
    slices form the family ``""`` (their members are the parameters), an expert list its own."""
    path, _, tail = rel.rpartition(".")
    if path in cubes and tail.isdigit():
        return "", int(tail), path
    for part in lists:
        if rel.startswith(part + "."):
            index, _, member = rel[len(part) + 1:].partition(".")
            if index.isdigit():
                return part, int(index), member
    return None


def _without_routers(calls: list[_Call], lists: list[str], cubes: dict[str, ExpertParam], n_experts: int,
                     block: nn.Module) -> tuple[list[_Call], list[str]]:
    """In a mixture-of-experts block, the matrices that score experts (a router with one output per expert, a
    shared expert's one-output gate) are not pruned: any non-expert matrix with at most ``n_experts`` outputs."""
    if not n_experts:
        return calls, []
    routers = [c.rel for c in calls if _expert_key(c.rel, lists, cubes) is None
               and as_matrix(block.get_submodule(c.rel)).out_features <= n_experts]
    return [c for c in calls if c.rel not in routers], routers


def _expand_experts(groups: tuple[tuple[str, ...], ...], lists: list[str], cubes: dict[str, ExpertParam],
                    sizes: dict[str, int]) -> tuple[tuple[str, ...], ...]:
    """``groups`` with every expert family written out for all its experts, the probe having called only the
    routed ones: at the family's first group, expert 0's groups, then expert 1's, ... (the experts' loop
    order), each expert's groups shaped like those of the lowest expert the probe called."""
    keys = {r: _expert_key(r, lists, cubes) for g in groups for r in g}
    lowest: dict[str, int] = {}
    for k in keys.values():
        if k is not None:
            lowest[k[0]] = min(lowest.get(k[0], k[1]), k[1])
    template: dict[str, list[tuple[str, ...]]] = {}
    for g in groups:
        k = keys[g[0]]
        if k is not None and k[1] == lowest[k[0]]:
            template.setdefault(k[0], []).append(tuple(keys[r][2] for r in g))
    out: list[tuple[str, ...]] = []
    done: set[str] = set()
    for g in groups:
        k = keys[g[0]]
        if k is None:
            out.append(g)
            continue
        if k[0] in done:
            continue
        done.add(k[0])
        family = k[0]
        for e in range(sizes[family]):
            for members in template[family]:
                out.append(tuple(cubes[m].rel(e) if family == "" else f"{family}.{e}.{m}" for m in members))
    return tuple(out)


def _groups(calls: list[_Call]) -> tuple[tuple[str, ...], ...]:
    groups: list[list[_Call]] = []
    for c in calls:
        for g in groups:
            if _same_input(g[0].x, c.x):
                g.append(c)
                break
        else:
            groups.append([c])
    return tuple(tuple(c.rel for c in g) for g in groups)


def _rel_err(pred: Tensor, actual: Tensor) -> float:
    pred, actual = pred.double().reshape(-1), actual.double().reshape(-1)
    return float((pred - actual).norm() / actual.norm().clamp_min(1e-30))


def _tolerance(t: Tensor) -> float:
    return 1e-4 if t.dtype in (torch.float32, torch.float64) else 2e-2


def _best_act(fn: Callable[[Callable], Tensor], target: Tensor) -> tuple[str | None, float]:
    errs = {name: _rel_err(fn(act), target) for name, act in ACTIVATIONS.items()}
    name = min(errs, key=errs.get)
    return (name, errs[name]) if errs[name] <= _tolerance(target) else (None, errs[name])


def _infer_ffn(calls: list[_Call], groups: tuple[tuple[str, ...], ...], moe: list[str]) -> FFNSpec:
    """The FFN from the probe's tensors: the last matrix whose input is an activation of earlier outputs."""
    if moe:
        return FFNSpec("unknown", "", "", verified=False, reason=f"mixture-of-experts feed-forward ({', '.join(moe)})")
    if not calls or calls[0].x.device.type == "meta":
        return FFNSpec("unknown", "", "", verified=False, reason="the feed-forward could not be verified (weights not in memory)")
    index = {c.rel: i for i, c in enumerate(calls)}
    group_of = {r: g for g in groups for r in g}
    fused = None
    for d in reversed(calls):
        width = d.x.shape[-1]
        earlier = [c for c in calls[: index[d.rel]] if c.out.shape[:-1] == d.x.shape[:-1]]
        for u in reversed(earlier):
            if u.out.shape[-1] != width:
                if u.out.shape[-1] == 2 * width:
                    a, b = u.out.chunk(2, dim=-1)
                    act, _ = _best_act(lambda f: f(a) * b, d.x)
                    if act is not None:
                        fused = f"fused gate/up matrix {u.rel} (act {act}) feeding {d.rel}"
                continue
            act, _ = _best_act(lambda f: f(u.out), d.x)
            if act is not None:
                return FFNSpec("relu", u.rel, d.rel, act=act, verified=True)
            for g in earlier:
                if g is u or g.out.shape[-1] != width or group_of[g.rel] is not group_of[u.rel]:
                    continue
                act, _ = _best_act(lambda f: f(g.out) * u.out, d.x)
                if act is not None:
                    return FFNSpec("swiglu", u.rel, d.rel, gate=g.rel, act=act, verified=True)
    reason = fused or "no matrix's input is act(up(x)) or act(gate(x)) * up(x) of earlier matrices on the probe"
    return FFNSpec("unknown", "", "", verified=False, reason=reason)


# ----------------------------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class Structure(FamilyAdapter):
    """A discovered (or declared) structure; used wherever the engine takes a :class:`FamilyAdapter`."""

    #: Relative names of the matrices stored ``in x out`` (``Conv1D``).
    transposed: frozenset[str] = frozenset()
    #: Parts of a block holding experts (3-D parameters, expert lists); block methods refuse such blocks.
    moe: tuple[str, ...] = ()
    #: How the structure was found: "discovered" or "declared" (an adapter file).
    origin: str = "discovered"
    #: Details for reports: probe timings, matrices never called, the FFN check.
    details: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: 3-D expert parameters; expert ``e`` of ``p`` is the matrix named ``p.rel(e)``.
    experts: tuple[ExpertParam, ...] = ()
    #: Paths of expert lists (experts as modules); their members' matrices are ordinary matrices.
    expert_lists: tuple[str, ...] = ()
    #: Blocks of different structures (dense and MoE layers): the block indices of each; empty when all are
    #: alike. ``groups`` then covers all of them and a block's matrices are those it has.
    block_kinds: tuple[tuple[int, ...], ...] = ()

    def is_expert(self, rel: str) -> bool:
        return _expert_key(rel, list(self.expert_lists), {c.path: c for c in self.experts}) is not None

    def linears(self, block: nn.Module) -> dict[str, Any]:
        found: dict[str, Any] = {}
        slices = {c.rel(e): (c, e) for c in self.experts for e in range(c.num_experts)}
        for name in self.linear_names():
            if name in slices:
                cube, e = slices[name]
                try:
                    found[name] = ExpertMatrix(block.get_parameter(cube.path), e, cube.transposed)
                except AttributeError:
                    if not self.block_kinds:
                        raise UnsupportedModelError(f"{self.family}: block has no expert parameter "
                                                    f"'{cube.path}'") from None
                continue
            try:
                module = block.get_submodule(name)
            except AttributeError:
                if self.block_kinds:
                    continue  # a matrix of another kind of block
                raise UnsupportedModelError(f"{self.family}: block has no matrix '{name}'") from None
            if not is_matrix(module):
                raise UnsupportedModelError(
                    f"{self.family}: '{name}' is {type(module).__name__}, neither a Linear nor a Conv1D")
            found[name] = as_matrix(module)
        return found

    def summary(self, model: nn.Module | None = None) -> dict[str, Any]:
        """A JSON-ready description (for the manifest and the benchmark table)."""
        out = {"origin": self.origin, "blocks_path": self.blocks_path, "groups": [list(g) for g in self.groups],
               "conv1d": sorted(self.transposed), "ffn": {"kind": self.ffn.kind, "up": self.ffn.up,
               "gate": self.ffn.gate, "down": self.ffn.down, "act": self.ffn.act, "verified": self.ffn.verified,
               "reason": self.ffn.reason}, "moe": list(self.moe),
               "experts": [{"path": c.path, "num_experts": c.num_experts, "stored": "in x out" if c.transposed
                            else "out x in"} for c in self.experts] + [{"path": p} for p in self.expert_lists],
               **({"block_kinds": [list(k) for k in self.block_kinds]} if self.block_kinds else {}),
               **self.details}
        if model is not None:
            out["blocks"] = len(self.blocks(model))
        return out


def _meta_storage(model: nn.Module, skip_prefix: str):
    """Give every ``meta`` parameter and buffer outside ``skip_prefix`` uninitialised CPU storage; returns the
    undo function. Memory is reserved, not written (a probe reads a few embedding rows)."""
    saved: list[tuple[dict, str, Any]] = []
    made: dict[int, Any] = {}
    for name, module in model.named_modules():
        if name == skip_prefix or name.startswith(skip_prefix + "."):
            continue
        for store in (module._parameters, module._buffers):
            for key, t in list(store.items()):
                if t is None or t.device.type != "meta":
                    continue
                if id(t) not in made:
                    empty = torch.zeros(t.shape, dtype=t.dtype) if t.is_floating_point() and t.numel() < 2**16 \
                        else torch.empty(t.shape, dtype=t.dtype)
                    made[id(t)] = nn.Parameter(empty, t.requires_grad) if isinstance(t, nn.Parameter) else empty
                saved.append((store, key, t))
                store[key] = made[id(t)]

    def undo():
        for store, key, t in saved:
            store[key] = t

    return undo


def _to_meta(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.to("meta")
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_meta(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_meta(v) for k, v in obj.items()}
    return obj


def _signature(block: nn.Module) -> tuple:
    """What makes two blocks the same structure: their matrices and 3-D parameters, by name and shape."""
    matrices = tuple((n, tuple(m.weight.shape)) for n, m in block.named_modules() if n and is_matrix(m))
    return matrices, tuple((n, tuple(p.shape)) for n, p in three_d_params(block).items())


@dataclass
class _Kind:
    """The probe of one block structure's first block: its matrix groups (experts written out, routers left
    out) and what the checks and reports need."""

    groups: tuple[tuple[str, ...], ...]
    calls: list[_Call]
    never: list[str]
    cubes: dict[str, ExpertParam]
    lists: list[str]
    routers: list[str]
    moe: list[str]

    @property
    def names(self) -> list[str]:
        return [r for g in self.groups for r in g]

    @property
    def slices(self) -> set[str]:
        return {c.rel(e) for c in self.cubes.values() for e in range(c.num_experts)}


def _probe_kind(block: nn.Module, call: BlockCall, on_meta: bool, model_name: str) -> _Kind:
    moe = _moe_parts(block)
    # Routing depends on values, which meta tensors lack: a MoE block gets storage for its probe instead
    # (reserved, not written: zero pages), the others are probed on meta.
    routed = on_meta and bool(moe)
    if on_meta and not routed:
        call = BlockCall(_to_meta(call.args), _to_meta(call.kwargs))
    call = BlockCall(call.args, call.replay_kwargs() | ({"hidden_states": call.kwargs["hidden_states"]}
                                                        if not call.args else {}))
    undo_block = _meta_storage(block, "\0") if routed else None
    try:
        calls, never, cubes = _probe_block(block, call)
    except (RuntimeError, NotImplementedError) as e:
        if not on_meta:
            raise
        raise UnsupportedModelError(f"{model_name}: its blocks cannot be probed without weights "
                                    f"({str(e).splitlines()[0]})") from None
    finally:
        if undo_block is not None:
            undo_block()
    lists = expert_lists(block, is_matrix)
    sizes = {part: len(block.get_submodule(part)) for part in lists}
    sizes.update({"": p.num_experts for p in cubes.values()})
    calls, routers = _without_routers(calls, lists, cubes, max(sizes.values(), default=0), block)
    return _Kind(_expand_experts(_groups(calls), lists, cubes, sizes), calls, never, cubes, lists, routers, moe)


def _merge_groups(kinds: list[tuple[tuple[str, ...], ...]], blocks: list[list[int]]) -> tuple[tuple[str, ...], ...]:
    """One group list for blocks of several structures: each structure's groups in its own order, a group they
    share once. (A block's own groups are this list restricted to its matrices.)"""
    merged = list(kinds[0])
    for groups, idx in zip(kinds[1:], blocks[1:]):
        at = -1
        for g in groups:
            if g in merged:
                at = merged.index(g)
                continue
            clash = next((h for h in merged if set(h) & set(g)), None)
            if clash is not None:
                raise UnsupportedModelError(f"decoder blocks group {clash[0]} differently (block {idx[0]}); declare "
                                            "the matrices with --adapter FILE.yaml")
            at += 1
            merged.insert(at, g)
    return tuple(merged)


def discover(model: nn.Module, input_ids: Tensor | None = None) -> Structure:
    """The structure of ``model`` (see the module docstring); ``input_ids`` (``1 x L``) is the probe window
    (default: :func:`probe_ids`)."""
    start = time.perf_counter()
    path = find_blocks_path(model)
    blocks = model.get_submodule(path)
    ids = probe_ids(model) if input_ids is None else input_ids.reshape(1, -1)
    first_param = next(blocks[0].parameters())
    on_meta = first_param.device.type == "meta"
    undo = _meta_storage(model, path) if any(p.device.type == "meta" for p in model.parameters()) else None
    try:
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        calls = call_blocks(model, blocks, ids.to(device), all_blocks=True)
    finally:
        if undo is not None:
            undo()
    hidden = calls[0].hidden
    if not isinstance(hidden, Tensor) or not hidden.is_floating_point() or hidden.ndim != 3:
        raise UnsupportedModelError(f"'{path}' blocks are not called on a hidden-state tensor")
    extra = [a for a in calls[0].args[1:] if isinstance(a, Tensor)]
    if extra:
        raise UnsupportedModelError(
            f"'{path}' blocks take a second input beside the hidden states (a {tuple(extra[0].shape)} tensor, "
            "such as per-layer token embeddings), which lmprune does not capture per window yet")
    t_model = time.perf_counter() - start
    kinds: dict[tuple, list[int]] = {}
    for i, block in enumerate(blocks):
        kinds.setdefault(_signature(block), []).append(i)
    probe_start = time.perf_counter()
    probed = [_probe_kind(blocks[idx[0]], calls[idx[0]], on_meta, type(model).__name__) for idx in kinds.values()]
    t_block = time.perf_counter() - probe_start
    for kind, idx in zip(probed, kinds.values()):
        if not kind.groups:
            raise UnsupportedModelError(f"the blocks at '{path}' call no Linear or Conv1D layer (block {idx[0]})")
    groups = _merge_groups([k.groups for k in probed], list(kinds.values()))
    names = [r for g in groups for r in g]
    cubes: dict[str, ExpertParam] = {}
    for kind in probed:
        for c in kind.cubes.values():
            if cubes.setdefault(c.path, c) != c:
                raise UnsupportedModelError(f"decoder blocks differ in their experts at '{c.path}'")
    lists = list(dict.fromkeys(p for k in probed for p in k.lists))
    moe = list(dict.fromkeys(p for k in probed for p in k.moe))
    conv = frozenset(n for k, idx in zip(probed, kinds.values()) for n in k.names
                     if n not in k.slices and not isinstance(blocks[idx[0]].get_submodule(n), nn.Linear))
    if len(probed) == 1:
        ffn = _infer_ffn(probed[0].calls, _groups(probed[0].calls), moe)
    else:
        ffn = FFNSpec("unknown", "", "", verified=False,
                      reason=f"decoder blocks of {len(probed)} structures (first blocks "
                             f"{', '.join(str(idx[0]) for idx in kinds.values())})")
    family = str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))
    routers = list(dict.fromkeys(r for k in probed for r in k.routers))
    details = {"probe_tokens": int(ids.shape[-1]), "model_probe_s": t_model, "block_probe_s": t_block,
               "time_s": time.perf_counter() - start,
               "not_called": list(dict.fromkeys(n for k in probed for n in k.never if n not in names)),
               "on_meta": on_meta, **({"routers": routers} if routers else {})}
    block_kinds = tuple(tuple(idx) for idx in kinds.values()) if len(kinds) > 1 else ()
    return Structure(family, path, groups, ffn, conv, tuple(moe), "discovered", details, tuple(cubes.values()),
                     tuple(lists), block_kinds)


# ----------------------------------------------------------------------------------------------- entry point

_CACHE: "weakref.WeakKeyDictionary[nn.Module, Structure]" = weakref.WeakKeyDictionary()


def declare(model: nn.Module, structure: Structure) -> None:
    """Use ``structure`` for ``model`` from now on (an adapter file)."""
    _CACHE[model] = structure


def remembered(model: nn.Module) -> Structure | None:
    """The structure already known for ``model`` (declared, or discovered earlier), else None."""
    return _CACHE.get(model)


def structure_of(model: nn.Module) -> Structure:
    """The structure of ``model``: declared, or discovered once and remembered for this model object."""
    found = _CACHE.get(model)
    if found is None:
        found = discover(model)
        _CACHE[model] = found
    return found


def prunable_structure(model: nn.Module) -> Structure:
    """:func:`structure_of` (kept as the name the adapters use: what it returns can be pruned)."""
    return structure_of(model)
