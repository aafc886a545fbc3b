"""Shared helper for the NIR benchmarks/tests: spiking models without a training run.

Two-epoch tiny training runs barely spike (an untrained model in eval mode barely spikes either), which makes spike
parity trivially true. ``lively_model`` takes a preset with random weights, sets every BatchNorm's running
statistics from one batch of real images (so pre-activations are normalised) and then gives BN a gain of 1.5 and a
bias of 0.2: every layer fires at 15-80%, a real test of parity. Masks come from ``calibrate_masks`` as in
``stata-deploy calibrate``; ``time_varying_masks`` builds a drop-mode schedule that differs per timestep.
"""
from __future__ import annotations

import numpy as np
import torch


def lively_model(preset: str, prune: str = "none", keep: float = 1.0, x_cal=None, seed: int = 0):
    from stata_deploy.config import make_config
    from stata_deploy.nn.model import build_model
    from stata_deploy.pruning.calibration import calibrate_masks

    torch.manual_seed(seed)
    cfg = make_config(preset, prune=dict(method=prune, keep=keep))
    m = build_model(cfg)
    bns = [mod for mod in m.modules() if isinstance(mod, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    for bn in bns:
        bn.momentum = None
        bn.reset_running_stats()
    m.train()
    with torch.no_grad():
        m(torch.as_tensor(x_cal))
    m.eval()
    for bn in bns:
        bn.weight.data.fill_(1.5)
        bn.bias.data.fill_(0.2)
    masks = calibrate_masks(m, [torch.as_tensor(x_cal)]) if cfg.prune.active else None
    return m, masks


def time_varying_masks(cfg, keep: float = 0.5, site: int = 1, extra: int = 6, seed: int = 1):
    """Drop-mode masks for one site whose kept set differs per timestep (union = k + extra tokens)."""
    from stata_deploy.pruning.masks import TokenMasks
    from stata_deploy.pruning.scorers import num_keep

    rng = np.random.default_rng(seed)
    T, n, a = cfg.T, cfg.num_tokens, 1 if cfg.anchor else 0
    k = num_keep(cfg.num_image_tokens, keep)
    pool = rng.choice(np.arange(a, n), size=min(n - a, k + extra), replace=False)
    m = np.zeros((T, n), bool)
    for t in range(T):
        m[t, rng.choice(pool, size=k, replace=False)] = True
        m[t, :a] = True
    return TokenMasks({site: m}, n, T, "drop")


def spike_mismatches(ref: dict, got: dict, real_rtol: float = 1e-4) -> tuple[dict, int, int]:
    """Per-layer mismatch counts (exact for spikes, rtol for real-valued layers such as A2OS2A's ReLU K)."""
    per, tot, n = {}, 0, 0
    for k, v in ref.items():
        a = got.get(k)
        if a is None or a.shape != v.shape:
            per[k] = v.size
            tot += v.size
            n += v.size
            continue
        real = not np.all(np.isin(v, (-1.0, 0.0, 1.0)))
        mm = int((~np.isclose(a, v, rtol=real_rtol, atol=1e-5)).sum()) if real else int((a != v).sum())
        per[k] = mm
        tot += mm
        n += v.size
    return per, tot, n


def root_flips(ref: dict, got: dict) -> int:
    """Mismatches in the first mismatching layer of each sample (the flips that start a divergence)."""
    names = list(ref)
    B = next(iter(ref.values())).shape[1]
    roots = 0
    for b in range(B):
        for k in names:
            a = got.get(k)
            if a is None:
                break
            r = ref[k][:, b]
            if np.all(np.isin(r, (-1.0, 0.0, 1.0))):
                d = int((a[:, b] != r).sum())
            else:  # real-valued layer (A2OS2A's ReLU K): float tolerance
                d = int((~np.isclose(a[:, b], r, rtol=1e-4, atol=1e-5)).sum())
            if d:
                roots += d
                break
    return roots
