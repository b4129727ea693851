"""Engine passes that only measure: the per-channel input norms ``‖X_j‖₂`` OWL allocates from.

Run through the engine like a pruning pass (same store, same devices, same streaming events), with no layer
pruner: each block's inputs go through the dense block once with hooks accumulating ``Σ_t x_tj²`` per input
group -- a vector per input, not a Gram matrix.
"""

from __future__ import annotations

from torch import Tensor


class InputNorms:
    """A block strategy that records ``‖X_j‖₂`` of every prunable matrix's input, by full matrix name."""

    def __init__(self) -> None:
        self.norms: dict[str, Tensor] = {}

    def __call__(self, ctx) -> None:
        for rel, norms in ctx.collect_input_norms(ctx.names).items():
            self.norms[ctx.full_name(rel)] = norms.cpu()
