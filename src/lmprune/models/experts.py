"""Mixture-of-experts weights as prunable matrices, and the tokens the router sends to each expert.

transformers (5.x) stores the experts of a MoE layer as 3-D parameters -- ``num_experts x out x in`` used as
``F.linear(x_e, W[e])``, or ``num_experts x in x out`` used as ``x_e @ W[e]`` -- and runs expert ``e`` on the
rows ``x_e`` of the tokens its router selected. Expert ``e``'s slice is one matrix to lmprune
(:class:`ExpertMatrix`, a writable ``out x in`` view), pruned against the Gram matrix of ``x_e`` alone.

:func:`tap_experts` finds ``x_e`` without knowing the family: during a forward it intercepts every matrix
product whose right-hand operand is a slice ``W[e]`` of a watched 3-D parameter (a ``TorchFunctionMode``:
storage, offset and strides identify the parameter and ``e``) and hands the left operand to a callback. The
fused kernels transformers picks by default (``grouped_mm``) do not slice per expert, so the experts' own
("eager") loop is selected for the duration. Experts stored as separate ``nn.Linear`` modules need none of
this: forward hooks on their linears see exactly their routed tokens.

Routed tokens are counted once each, not weighted by the router's score: the Gram matrix is then the input
statistics of the expert's own matrices, which is what the layer objective ``‖X_e Wᵀ − X_e Ŵᵀ‖²`` is about,
and it does not change when earlier pruning shifts the scores a little. (Weighting row ``t`` by its score
``r_t`` would match the block output's error for ``down`` exactly; for ``gate``/``up`` nothing simple does.)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

#: The matrix products an expert loop may use; the second operand is the weight.
_PRODUCTS = {torch.nn.functional.linear: False, torch.matmul: True, torch.mm: True, Tensor.__matmul__: True,
             Tensor.matmul: True, Tensor.mm: True}  # value: the weight is used ``in x out``


@dataclass(frozen=True)
class ExpertParam:
    """A 3-D expert parameter of a block: ``path`` relative to the block, ``num_experts`` slices, stored
    ``in x out`` per expert when ``transposed`` (else ``out x in``)."""

    path: str
    num_experts: int
    transposed: bool

    def rel(self, expert: int) -> str:
        """The relative matrix name of expert ``expert``'s slice (``mlp.experts.down_proj.3``)."""
        return f"{self.path}.{expert}"


class ExpertMatrix:
    """Expert ``index``'s slice of a 3-D parameter seen as a linear: ``weight`` is its ``out x in`` view, so
    reading it and ``copy_`` into it go through to the parameter. Expert biases are not pruned."""

    bias = None

    def __init__(self, param: Tensor, index: int, transposed: bool):
        self.param = param
        self.index = index
        self.transposed = transposed

    @property
    def weight(self) -> Tensor:
        w = self.param.data[self.index]
        return w.T if self.transposed else w

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


def _slice_of(weight: Tensor, params: dict[str, Tensor]) -> tuple[str, int, bool] | None:
    """``(path, expert, as_stored)`` when ``weight`` is ``params[path][expert]`` (``as_stored``) or its transpose."""
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.device.type == "meta":
        return None
    ptr = weight.untyped_storage().data_ptr()
    for path, p in params.items():
        if p.untyped_storage().data_ptr() != ptr or p.device != weight.device:
            continue
        expert, rest = divmod(weight.storage_offset() - p.storage_offset(), p.stride(0))
        if rest or not 0 <= expert < p.shape[0]:
            continue
        if tuple(weight.shape) == tuple(p.shape[1:]) and weight.stride() == p.stride()[1:]:
            return path, expert, True
        if tuple(weight.shape) == tuple(p.shape[2:0:-1]) and weight.stride() == p.stride()[2:0:-1]:
            return path, expert, False
    return None


class _Tap(TorchFunctionMode):
    def __init__(self, params: dict[str, Tensor], on_call: Callable[[str, int, bool, Tensor, Tensor], None]):
        super().__init__()
        self.params = params
        self.on_call = on_call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _PRODUCTS and len(args) >= 2:
            found = _slice_of(args[1], self.params)
            if found is not None:
                path, expert, as_stored = found
                # F.linear takes out x in; a product x @ W takes in x out
                self.on_call(path, expert, _PRODUCTS[func] == as_stored, args[0], out)
        return out


@contextmanager
def _eager_experts(block: nn.Module) -> Iterator[None]:
    """Select the experts' own per-expert loop (transformers' ``eager`` implementation) inside ``block``."""
    changed = []
    for module in block.modules():
        config = getattr(module, "config", None)
        current = getattr(config, "_experts_implementation", None)
        if current not in (None, "eager") and not any(c is config for c, _ in changed):
            changed.append((config, current))
            config._experts_implementation = "eager"
    try:
        yield
    finally:
        for config, value in changed:
            config._experts_implementation = value


@contextmanager
def tap_experts(block: nn.Module, params: dict[str, Tensor],
                on_call: Callable[[str, int, bool, Tensor, Tensor], None]) -> Iterator[None]:
    """While active, every product ``x_e · W[e]`` with ``W`` one of ``params`` (by path) calls
    ``on_call(path, e, transposed, x_e, output)``; ``transposed``: ``W`` is stored ``in x out`` per expert."""
    if not params:
        yield
        return
    with _eager_experts(block), _Tap(params, on_call):
        yield


def three_d_params(block: nn.Module) -> dict[str, Tensor]:
    """The block's 3-D parameters by relative path (candidate expert weights); a convolution's kernel (Mamba's
    depthwise ``conv1d``) is not one."""
    found = {}
    for prefix, module in block.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.ndim == 3:
                found[f"{prefix}.{name}" if prefix else name] = p
    return found


def expert_lists(block: nn.Module, is_matrix: Callable[[nn.Module], bool]) -> list[str]:
    """Paths of ``nn.ModuleList``s of two or more modules of one class holding matrices (experts as modules)."""
    found = []
    for name, module in block.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1
                and any(is_matrix(m) for m in module[0].modules())):
            found.append(name)
    return found


def weight_named(params: dict[str, Tensor], name: str) -> Tensor:
    """The stored weight of the matrix ``name`` among a model's ``params`` (``named_parameters``): ``name.weight``,
    or expert ``e``'s slice of the 3-D parameter for a name ``path.e``."""
    if name + ".weight" in params:
        return params[name + ".weight"]
    path, _, expert = name.rpartition(".")
    if expert.isdigit() and path in params and params[path].ndim == 3:
        return params[path][int(expert)]
    raise KeyError(f"no matrix {name!r} among the model's parameters")
