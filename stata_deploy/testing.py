"""Helpers for tests and benchmarks: untrained models that fire, and random per-timestep masks.

Untrained weights with default BatchNorm barely spike, so parity checks on them would compare mostly zeros.
"""
from __future__ import annotations

import numpy as np
import torch

from .pruning.masks import TokenMasks


def liven_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Set every BatchNorm (eval statistics 0/1, gain 3-6, bias ~ N(0.4, 0.6)) so that every layer fires."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.weight.copy_(3.0 + 3.0 * torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.6 * torch.randn(m.bias.shape, generator=g) + 0.4)
    return model


def random_timestep_masks(cfg, site: int = 1, keep: float = 0.5, seed: int = 0) -> TokenMasks:
    """Drop-mode masks at one site keeping round(keep * (n - 1)) random image tokens per timestep, anchor (0) kept."""
    rng = np.random.default_rng(seed)
    T, n = cfg.T, cfg.num_tokens
    k = max(1, int(round(keep * (n - 1))))
    m = np.zeros((T, n), dtype=bool)
    for t in range(T):
        m[t, 0] = True
        m[t, 1 + rng.choice(n - 1, k, replace=False)] = True
    return TokenMasks({site: m}, n, T, "drop")
