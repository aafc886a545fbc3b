"""The ``nir`` runtime: our reader executing a .nir file in numpy (the round-trip path torch -> .nir -> spikes).

The graph semantics (ops, zero-delay timing, host operations, per-timestep token masks) are those documented in
``runtimes.nir_graph``; the model config and masks come from the file's ``stata_deploy`` metadata.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from stata_deploy.config import ModelConfig
from stata_deploy.errors import StataError
from stata_deploy.pruning.masks import TokenMasks
from stata_deploy.results import RunResult
from stata_deploy.runtime_api import Runtime

from .nir_graph import execute, read_graph


class NirRuntime(Runtime):
    name = "nir"
    accepts = ()

    def __init__(self, path: str | Path, batch_size: int = 64, **options):
        super().__init__(path)
        self.graph = read_graph(self.path)
        desc = self.graph.meta
        if not desc.get("config"):
            raise StataError(f"{self.path} has no stata-deploy description in its metadata: not exported by "
                             "`stata-deploy export --to nir`")
        if desc.get("segment") is not None:
            raise StataError(f"{self.path} is segment {desc['segment']} of a --split export; run the full model file")
        self.cfg = ModelConfig.from_dict(desc["config"])
        self.masks = TokenMasks.from_json(desc["masks"]) if desc.get("masks") else None
        self.description = desc
        self.batch_size = max(1, int(batch_size))

    def run(self, x: np.ndarray, record: bool = True) -> RunResult:
        x = np.asarray(x, dtype=np.float32)
        axis = 0 if x.ndim == 4 else 1
        n = x.shape[axis]
        if n <= self.batch_size:
            return execute(self.graph, x, record)
        parts = [execute(self.graph, np.take(x, range(i, min(n, i + self.batch_size)), axis=axis), record)
                 for i in range(0, n, self.batch_size)]
        return RunResult(
            np.concatenate([p.logits_t for p in parts], 1),
            {k: np.concatenate([p.spikes[k] for p in parts], 1) for k in parts[0].spikes},
            np.concatenate([p.inputs for p in parts], 1),
            sum(p.seconds for p in parts),
            {s: np.concatenate([p.kept[s] for p in parts], 1) for s in parts[0].kept},
        )


def inspect(path: str | Path) -> dict:
    """Summary of a .nir file for ``stata-deploy inspect`` (also checks that nir.write(nir.read(f)) is lossless)."""
    from .nir_graph import inspect_graph, verify_lossless

    out = {"path": str(path), **inspect_graph(read_graph(path))}
    diffs = verify_lossless(path)
    out["lossless_rewrite"] = not diffs
    if diffs:
        out["rewrite_differences"] = diffs[:20]
    return out


NirRuntime.inspect = staticmethod(inspect)
