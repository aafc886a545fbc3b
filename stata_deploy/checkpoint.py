"""Checkpoints: safetensors weights + JSON config. Loading never executes code from a file.

A run directory holds ``config.json`` ({"format", "model": ModelConfig, "train": ..., "dataset": ...}),
``model.safetensors`` and, for resume, ``train_state.safetensors`` + ``train_state.json``. Every file is written
to a temporary file in the same folder and renamed into place, so a crash never leaves a partial checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, StataError

FORMAT = "stata-deploy/1"


def _atomic(path: Path, write) -> None:
    path = Path(path)
    if path.parent and not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StataError(f"cannot create folder {path.parent}: {e.strerror or e}") from None
    fd, tmp = None, None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            fd = None
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise StataError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically with a sha256 of the tensor payload in its metadata; return it."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(tensors, metadata=metadata or {})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load(path.read_bytes())
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]})") from None


def read_json(path: Path, what: str = "file") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object")
    return d


def save_model(run_dir: Path, model: torch.nn.Module, extra: dict | None = None) -> None:
    """Write config.json and model.safetensors (weights first, so a config never points at missing weights)."""
    run_dir = Path(run_dir)
    digest = save_tensors(run_dir / "model.safetensors", model.state_dict(), {"format": FORMAT})
    cfg = {"format": FORMAT, "model": model.cfg.to_dict(), "weights_sha256": digest, **(extra or {})}
    atomic_write_json(run_dir / "config.json", cfg)


def resolve_run(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file() and p.name in ("config.json", "model.safetensors"):
        p = p.parent
    if not p.exists():
        raise CheckpointError(f"run folder not found: {p}")
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a stata-deploy run folder (expected a folder with config.json)")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"{p} is not a stata-deploy run folder: config.json is missing")
    return p


def load_config(run_dir: str | Path) -> tuple[ModelConfig, dict]:
    run_dir = resolve_run(run_dir)
    meta = read_json(run_dir / "config.json", "config")
    if meta.get("format") != FORMAT or "model" not in meta:
        raise CheckpointError(f"{run_dir / 'config.json'} is not a stata-deploy config (format {meta.get('format')!r})")
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"invalid model config in {run_dir / 'config.json'}: {e}") from None
    return cfg, meta


def load_model(run_dir: str | Path, map_location: str = "cpu"):
    """Build the model from config.json and load model.safetensors; mismatches are CheckpointErrors."""
    from .model import build_model

    run_dir = resolve_run(run_dir)
    cfg, meta = load_config(run_dir)
    model = build_model(cfg)
    sd = load_tensors(run_dir / "model.safetensors")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        what = (f"missing {', '.join(missing[:3])}" if missing else "") + (
            f" unexpected {', '.join(unexpected[:3])}" if unexpected else ""
        )
        raise CheckpointError(f"weights in {run_dir} do not match config.json ({what.strip()})")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"weights in {run_dir} do not match config.json: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"weights in {run_dir} contain NaN or infinite values ({k})")
    model.load_state_dict(sd)
    model.to(map_location)
    model.eval()
    return model, meta
