"""The interface every runtime implements (registered under the entry-point group ``stata_deploy.runtimes``)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .pruning.masks import TokenMasks
from .results import RunResult


class Runtime(ABC):
    """Loads one exported model file (or run folder) and runs batches of inputs.

    After construction ``cfg`` (the model config) and ``masks`` (static TokenMasks or None) describe the model.
    ``run`` takes x (B, C, H, W) or (T, B, C, H, W) float32 and returns a RunResult with every neuron layer's
    spikes (same names and layout as ``stata_deploy.inference.run_torch``).
    """

    name: str = "?"
    # The command-line options this runtime honours (besides the file): the CLI refuses any other one that is given
    # (e.g. --precision for a runtime that has no choice, --timeout where nothing runs in a child process).
    accepts: tuple[str, ...] = ()

    def __init__(self, path: str | Path, **options):
        self.path = Path(path)
        self.cfg: ModelConfig
        self.masks: TokenMasks | None = None

    @abstractmethod
    def run(self, x: np.ndarray, record: bool = True) -> RunResult: ...

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
