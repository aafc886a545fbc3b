"""The torch reference runtime: runs a run folder (config.json + model.safetensors) eagerly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stata_deploy.train.checkpoint import load_model, resolve_run
from stata_deploy.inference import run_torch
from stata_deploy.pruning.masks import TokenMasks
from stata_deploy.results import RunResult
from stata_deploy.runtime_api import Runtime


class TorchRuntime(Runtime):
    name = "torch"
    accepts = ("threads",)

    def __init__(self, path, masks: TokenMasks | str | Path | None = "auto", **options):
        super().__init__(path)
        run_dir = self.run_dir = resolve_run(path)
        self.model, self.meta = load_model(run_dir)
        self.cfg = self.model.cfg
        if masks == "auto":
            masks = run_dir / "masks.json" if (run_dir / "masks.json").is_file() else None
        if isinstance(masks, (str, Path)):
            path, masks = masks, TokenMasks.load(masks)
            masks.check_weights(self.meta.get("weights_sha256"), path, run_dir)
        if masks is not None:
            masks.check_model(self.cfg)
        self.masks = masks

    def run(self, x: np.ndarray, record: bool = True) -> RunResult:
        return run_torch(self.model, torch.as_tensor(np.asarray(x, dtype=np.float32)), self.masks, record)
