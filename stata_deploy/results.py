"""The one result type every runtime returns."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunResult:
    """Outputs of one batch through a runtime.

    logits_t: (T, B, classes) head output per timestep; spikes: neuron layer name (the torch module path, e.g.
    ``blocks.0.attn.q_lif``) -> its output (T, B, ...) in the slot layout of the model (pruned tokens absent);
    inputs: the encoded input (T, B, C, H, W) (the first conv's real-valued input); seconds: wall time of the run;
    kept: per pruning site the kept token positions (T, B, k) in the full block sequence (tp: the block's selection).
    """

    logits_t: np.ndarray
    spikes: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: np.ndarray | None = None
    seconds: float = 0.0
    kept: dict[int, np.ndarray] = field(default_factory=dict)  # site -> (T, B, k) kept token positions

    @property
    def logits(self) -> np.ndarray:
        return self.logits_t.mean(0)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(-1)
