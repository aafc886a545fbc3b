"""The interface every exporter implements (registered under the entry-point group ``stata_deploy.exporters``)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from .pruning.masks import TokenMasks


class Exporter(ABC):
    """Lowers a trained model (eval mode) and its static masks to a file.

    ``export`` must write atomically (``stata_deploy.fileio``: atomic, in memory first) and
    leave no file behind when it fails; an op it cannot lower raises ``UnsupportedOpError`` naming the op.
    It returns a JSON-able summary (at least {"path": str}); anything a reader must know goes in "notes".
    """

    name: str = "?"
    suffix: str = ""
    # The options this exporter honours (e.g. "split"); the CLI refuses any other one that is given.
    accepts: tuple[str, ...] = ()

    @abstractmethod
    def export(self, model, masks: TokenMasks | None, out: Path, **options) -> dict: ...
