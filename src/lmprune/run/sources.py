"""Where a run's blocks come from: a model held in memory, or (:mod:`lmprune.run.streaming`) safetensors shards
read one block at a time. The pipeline sees the same few operations either way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..allocation.base import MatrixInfo
from ..engine import BlockEvents
from ..models.adapters import FamilyAdapter
from ..models.loading import ModelSource


@dataclass
class LoadedModel:
    """A model whose every block is in memory."""

    model: nn.Module
    tokenizer: Any
    source: ModelSource | None = None  # None for a model handed to the API

    streamed = False

    def read_events(self) -> BlockEvents | None:
        """Events for a pass over the original blocks (OWL's statistics, a dense evaluation)."""
        return None

    def prune_events(self, write: bool = True) -> BlockEvents | None:
        """Events for the pruning pass (streaming loads each block there and, with ``write``, writes it out)."""
        return None

    def matrix_infos(self, adapter: FamilyAdapter, blocks: list[int]) -> list[MatrixInfo]:
        """The prunable matrices of ``blocks`` as an allocator sees them."""
        chosen = set(blocks)
        return [MatrixInfo(n, b, lin.weight.detach()) for n, b, lin in adapter.matrices(self.model) if b in chosen]

    def describe(self, spec: str) -> dict[str, Any]:
        """The manifest's ``model`` entry."""
        m = self.model
        return {
            "spec": spec, "kind": self.source.kind, "path": self.source.path, "sha256": self.source.sha256,
            "model_type": m.config.model_type, "parameters": sum(p.numel() for p in m.parameters()),
            "dtype": str(next(m.parameters()).dtype).removeprefix("torch."), **self.source.details,
        }

    def weights_on(self, device: str | torch.device):
        """Context for work that needs the whole model on ``device`` (evaluation)."""
        return _on_device(self.model, device)


class _on_device:
    def __init__(self, model: nn.Module, device: str | torch.device):
        self.model, self.device = model, device

    def __enter__(self) -> nn.Module:
        self.model.to(self.device)
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.to("cpu")
