"""Reference inference in torch that records every neuron layer's output (the parity oracle)."""
from __future__ import annotations

import time

import numpy as np
import torch

from .nn.neurons import NEURON_TYPES
from .pruning.masks import TokenMasks
from .results import RunResult


def neuron_layers(model) -> list[str]:
    """Names of all neuron modules in forward order (the keys of RunResult.spikes)."""
    return [n for n, m in model.named_modules() if isinstance(m, NEURON_TYPES)]


@torch.no_grad()
def run_torch(model, x: torch.Tensor, masks: TokenMasks | None = None, record: bool = True) -> RunResult:
    """Run ``model`` on x (B, C, H, W) or (T, B, C, H, W); record each neuron layer's output."""
    model.eval()
    spikes: dict[str, np.ndarray] = {}
    hooks = []
    if record:
        for name, m in model.named_modules():
            if isinstance(m, NEURON_TYPES):
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, name=name: spikes.__setitem__(name, out.detach().cpu().numpy())))
    try:
        t0 = time.perf_counter()
        out = model(x, masks=masks)
        dt = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    kept = {s: g.cpu().numpy() for s, g in out.kept.items()}
    return RunResult(out.logits_t.cpu().numpy(), spikes, model.encode(x).cpu().numpy(), dt, kept)
