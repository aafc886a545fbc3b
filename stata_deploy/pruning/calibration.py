"""Calibration: dynamic top-k on a few batches frozen into static masks."""
from __future__ import annotations

import numpy as np
import torch

from ..errors import StataError
from .masks import TokenMasks
from .scorers import num_keep



SCHEDULES = ("per-timestep", "fixed")


@torch.no_grad()
def calibrate_masks(model, batches, progress=None, schedule: str = "per-timestep") -> TokenMasks:
    """Freeze static masks: per site (and, with ``schedule="per-timestep"``, per timestep) keep the tokens most
    often kept by dynamic top-k on the calibration batches (later sites restricted to what earlier sites keep).

    ``schedule="fixed"``: the same tokens at every timestep (counts summed over T). A fixed schedule is entirely
    structural, so a pruned NIR file is exact for a reader that ignores our metadata."""
    if schedule not in SCHEDULES:
        raise StataError(f"unknown mask schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    cfg = model.cfg
    if not cfg.prune.active:
        raise StataError("this model has no pruning configured (method none or keep 1.0): nothing to calibrate")
    model.eval()
    T, n_full = cfg.T, cfg.num_tokens
    counts: dict[int, np.ndarray] = {}
    for xb in batches:
        out = model(xb)
        for site, g in out.kept.items():  # g: (T, B, k) global positions
            c = counts.setdefault(site, np.zeros((T, n_full), dtype=np.int64))
            gi = g.cpu().numpy()
            for t in range(T):
                np.add.at(c[t], gi[t].reshape(-1), 1)
        if progress is not None:
            progress.update(1)
    mode = "skip" if cfg.prune.method == "tp" else "drop"
    sites: dict[int, np.ndarray] = {}
    allowed = np.ones((T, n_full), dtype=bool)
    fixed = 1 if cfg.anchor else 0
    n_present = cfg.num_image_tokens
    for site in sorted(counts):
        k = num_keep(n_present, cfg.prune.keep)
        m = np.zeros((T, n_full), dtype=bool)
        for t in range(T):
            c = (counts[site].sum(0) if schedule == "fixed" else counts[site][t]).astype(float)
            c[~allowed[t]] = -1
            c[:fixed] = -1
            order = np.argsort(-c, kind="stable")[:k]
            m[t, order] = True
            m[t, :fixed] = True
        sites[site] = m
        if mode == "drop":
            allowed = m
            n_present = k
    return TokenMasks(sites, n_full, T, mode, meta={"method": cfg.prune.method, "keep": cfg.prune.keep,
                                                    "schedule": schedule})
