"""The description every exported file carries: one module writes and reads it (ONNX, NIR, netx).

A JSON object stored under ``META_KEY`` (ONNX ``metadata_props``, NIR graph ``metadata``)::

    {"format": "stata-deploy-onnx/1" | "stata-deploy-nir", "version": <package version>,
     "weights_sha256": <sha256 of the run's model.safetensors>, "config": ModelConfig.to_dict(), "preset": name,
     "T": T, "masks": TokenMasks.to_json() or null, "mask_source": "static" | "dynamic" | "none",
     "encoding": ENCODING, ...format-specific fields}

It names no path of the machine it was exported on. ``stata-deploy run FILE --compare torch`` finds the run
folder from ``--run RUN`` or, by default, the folder the file lies in (``stata-deploy export RUN`` writes
``RUN/model.<suffix>``); ``weights_sha256`` must match that run's weights (``check_run``), so a file is never
compared with, or explained by, other weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import StataError

META_KEY = "stata_deploy"
# the NIR description's layout (its "format_version"), written by exporters.nir_exporter, read by runtimes.nir_graph:
# 2: host operations per IR node kind (qk, av, ktv, qktv, relu, ternary); 1: per attention kind (ssa_product, ...)
NIR_FORMAT_VERSION = 2
ENCODING = "direct: the image (C, H, W) in [0, 1] is presented at every one of the T timesteps"


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("stata-deploy")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "0+unknown"


def describe(fmt: str, cfg, masks, *, weights_sha256: str | None, mask_source: str, **extra) -> dict:
    """The common description of an exported ``cfg`` with ``masks`` (format-specific fields in ``extra``)."""
    return {
        "format": fmt,
        "version": package_version(),
        "weights_sha256": weights_sha256,
        "config": cfg.to_dict(),
        "preset": cfg.name,
        "T": cfg.T,
        "masks": masks.to_json() if masks is not None else None,
        "mask_source": mask_source,
        "encoding": ENCODING,
        **extra,
    }


def encode(desc: dict) -> str:
    from .fileio import dumps

    return dumps(desc)


def decode(raw, where: str) -> dict:
    """The description from its stored text (str or bytes); one clear error when it is damaged."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    try:
        desc = json.loads(raw)
    except (TypeError, ValueError) as e:
        raise StataError(f"{where}: its stata-deploy description is not valid JSON ({e})") from None
    if not isinstance(desc, dict):
        raise StataError(f"{where}: its stata-deploy description must be a JSON object, got {type(desc).__name__}")
    return desc


def find_run(file: Path, run: str | Path | None) -> Path:
    """The run folder for ``--compare torch``: ``run`` when given, else the folder holding ``file``."""
    from .train.checkpoint import resolve_run

    if run is not None:
        return resolve_run(run)
    folder = Path(file).resolve().parent
    if not (folder / "config.json").is_file():
        raise StataError(f"--compare torch needs the run folder {Path(file).name} was exported from: pass --run RUN "
                         f"(it is not beside the file, in {folder})")
    return folder


def check_run(desc: dict, file: Path, run_dir: Path, weights_sha256: str | None) -> None:
    """Refuse a run whose weights are not the ones ``file`` was exported from."""
    have = (desc or {}).get("weights_sha256")
    if have and weights_sha256 and have != weights_sha256:
        raise StataError(f"--compare torch: {file} was exported from other weights than {run_dir} now holds "
                         f"(sha256 {have[:12]}... vs {weights_sha256[:12]}...): re-export it with `stata-deploy "
                         f"export {run_dir} --to {Path(file).suffix.lstrip('.') or 'FORMAT'}`")
