"""Model-family adapters: where the decoder blocks are and which linears are pruned, keyed by ``config.model_type``.

An adapter knows, for one architecture family:

* the dotted path of the decoder block list inside the ``*ForCausalLM`` model;
* the prunable linears of a block, grouped by shared input and listed in forward order
  (q/k/v read the same normalised hidden state; gate/up read the same; each other linear reads its own);
* the shape of the feed-forward part (for block-level methods such as SparseLLM).

Embeddings and ``lm_head`` are never in a block, so they are never pruned.
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
    """

    kind: str
    up: str
    down: str
    gate: str | None = None
    act: str = "silu"


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


_LLAMA_LIKE = FamilyAdapter(
    family="llama",
    blocks_path="model.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    ffn=FFNSpec(kind="swiglu", up="mlp.up_proj", gate="mlp.gate_proj", down="mlp.down_proj", act="silu"),
)

_OPT = FamilyAdapter(
    family="opt",
    blocks_path="model.decoder.layers",
    groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    ffn=FFNSpec(kind="relu", up="fc1", down="fc2", act="relu"),
)

#: config.model_type -> adapter. Families sharing LLaMA's module layout reuse its adapter.
ADAPTERS: dict[str, FamilyAdapter] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "opt": _OPT,
}


def get_adapter(model: nn.Module) -> FamilyAdapter:
    """The adapter for ``model.config.model_type``; the model's structure is checked, not its name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"unsupported model family {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    adapter = ADAPTERS[model_type]
    if model_type == "opt" and getattr(model.config, "activation_function", "relu") != "relu":
        adapter = FamilyAdapter(
            adapter.family, adapter.blocks_path, adapter.groups,
            FFNSpec("relu", "fc1", "fc2", act=model.config.activation_function),
        )
    adapter.linears(adapter.blocks(model)[0])
    return adapter
