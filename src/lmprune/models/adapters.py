"""The structure the engine works on: where the decoder blocks are and which matrices of a block are pruned.

A :class:`FamilyAdapter` says, for one model:

* the dotted path of the decoder block list inside the ``*ForCausalLM`` model;
* the prunable linears of a block, grouped by shared input and listed in forward order
  (q/k/v read the same normalised hidden state; gate/up read the same; each other linear reads its own);
* the shape of the feed-forward part (for block-level methods such as SparseLLM).

Embeddings and ``lm_head`` are never in a block, so they are never pruned.

Structures are discovered from the loaded model (:mod:`lmprune.models.discovery`), or declared in an adapter
file where discovery needs help (:mod:`lmprune.models.declared`); :func:`get_adapter` returns the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedModelError(ValueError):
    """The model's family has no adapter, or its modules are not where the adapter expects them."""


@dataclass(frozen=True)
class FFNSpec:
    """The feed-forward part of a block.

    ``relu``: ``down(act(up(x)))`` with biases (OPT's fc1 → ReLU → fc2); ``gate`` is None.
    ``swiglu``: ``down(act(gate(x)) * up(x))`` without biases (LLaMA, Qwen2, Mistral).
    ``unknown``: no such shape could be verified; ``reason`` says why (block methods refuse the model).
    """

    kind: str
    up: str
    down: str
    gate: str | None = None
    act: str = "silu"
    #: Checked numerically on the model's own tensors (discovery) or declared (an adapter file).
    verified: bool = True
    reason: str = ""


@dataclass(frozen=True)
class FamilyAdapter:
    family: str
    blocks_path: str
    groups: tuple[tuple[str, ...], ...]
    ffn: FFNSpec

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        try:
            blocks = model.get_submodule(self.blocks_path)
        except AttributeError:
            raise UnsupportedModelError(
                f"{self.family} adapter: model has no decoder blocks at '{self.blocks_path}'"
            ) from None
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise UnsupportedModelError(f"{self.family} adapter: '{self.blocks_path}' is not a list of blocks")
        return blocks

    def is_expert(self, rel: str) -> bool:
        """Is ``rel`` one expert's matrix of a mixture-of-experts layer (fed only the tokens routed to it)?"""
        return False

    def linear_names(self) -> list[str]:
        """Relative names of the prunable linears of a block, in forward order."""
        return [name for group in self.groups for name in group]

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        found = {}
        for name in self.linear_names():
            try:
                module = block.get_submodule(name)
            except AttributeError:
                raise UnsupportedModelError(f"{self.family} adapter: block has no linear '{name}'") from None
            if not isinstance(module, nn.Linear):
                raise UnsupportedModelError(f"{self.family} adapter: '{name}' is {type(module).__name__}, not Linear")
            found[name] = module
        return found

    def full_name(self, block_index: int, rel: str) -> str:
        return f"{self.blocks_path}.{block_index}.{rel}"

    def matrices(self, model: nn.Module) -> list[tuple[str, int, nn.Linear]]:
        """``(full name, block index, linear)`` for every prunable matrix of the model."""
        out = []
        for i, block in enumerate(self.blocks(model)):
            for rel, lin in self.linears(block).items():
                out.append((self.full_name(i, rel), i, lin))
        return out


def get_adapter(model: nn.Module) -> FamilyAdapter:
    """The structure of ``model``: declared for it, or discovered from it (and remembered); refuses in one line a
    model lmprune cannot prune (no block list, mixture-of-experts blocks)."""
    from .discovery import prunable_structure

    return prunable_structure(model)
