"""lmprune: one-shot pruning of pretrained causal language models."""

__version__ = "0.1.0"
