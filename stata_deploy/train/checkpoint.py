"""Checkpoints: safetensors weights + JSON config. Loading never executes code from a file.

A run directory holds ``config.json`` ({"format", "model": ModelConfig, "weights_sha256", "train": ...,
"dataset": ...}), ``model.safetensors`` and, for resume, ``checkpoints/step-<N>.safetensors`` (the two newest
training checkpoints: weights, optimizer state, RNG states, and the loop position as JSON metadata, with a sha256
of all of it stored inside the file and verified when loading). Every file is written to a temporary file in the
same folder, fsynced and renamed into place, so a crash never leaves a partial file under its final name.

Only safetensors and JSON are ever read: pickle-based ``.pt``/``.pth`` files are refused before anything in them
is interpreted (unpickling can execute arbitrary code).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
# One module owns the atomic write (stata_deploy.fileio); re-exported for the callers that import it from here.
from .. import fileio
from ..fileio import atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: F401

FORMAT = "stata-deploy/1"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file atomically with a sha256 of the tensor payload in its metadata; return it."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(tensors, metadata=metadata or {})
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _read_bytes(path: Path) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, expected a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _parse_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    if data.startswith(PICKLE_MAGIC):
        raise CheckpointError(f"{path} is a pickle-based PyTorch file; refusing to load it (unpickling can run code). "
                              f"stata-deploy reads safetensors + JSON only")
    try:
        return load(data)
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0]})") from None


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never pickle)."""
    return _parse_tensors(Path(path), _read_bytes(path))


def _safetensors_metadata(path: Path, data: bytes) -> dict[str, str]:
    import struct

    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        return dict(header.get("__metadata__") or {})
    except (struct.error, ValueError, AttributeError, TypeError):
        raise CheckpointError(f"{path} is not a valid safetensors file (bad header)") from None


# bytes per element of every safetensors dtype
_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
                   "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
_ST_FLOAT = {"F8_E4M3", "F8_E5M2", "F16", "BF16", "F32", "F64"}
_ST_MAX_HEADER = 100_000_000  # the safetensors library's own limit on the JSON header


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of every tensor in a safetensors file, from its JSON header alone: only the first
    8 + header-length bytes are read, never the tensor data. The header is checked for consistency (known dtypes,
    non-negative integer shapes, each tensor's byte range inside the file and of the size its shape needs), so a
    truncated or forged file is refused before anything is allocated. Pickle files are refused first."""
    import struct

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, expected a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    bad = f"{path} is not a valid safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if head.startswith(PICKLE_MAGIC):
                raise CheckpointError(f"{path} is a pickle-based PyTorch file; refusing to load it (unpickling can "
                                      f"run code). stata-deploy reads safetensors + JSON only")
            if len(head) < 8:
                raise CheckpointError(f"{bad} (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _ST_MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{bad} (bad header: {n} header bytes in a file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{bad} (bad header)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (bad header)")
    payload = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = e["dtype"], e["shape"], e["data_offsets"]
            ok = (dtype in _ST_DTYPE_BYTES and isinstance(shape, list)
                  and all(type(d) is int and d >= 0 for d in shape) and type(a) is int and type(b) is int)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{bad} (bad header entry for {name!r})")
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= a <= b <= payload:
            raise CheckpointError(f"{bad} (truncated: {name} needs bytes {a}..{b} of a {payload}-byte payload)")
        if b - a != numel * _ST_DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{bad} ({name}: shape {tuple(shape)} of {dtype} does not fit its {b - a} bytes)")
        out[name] = (dtype, tuple(shape))
    return out


def check_weights_header(run_dir: Path, cfg: ModelConfig, header: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Tensor names, shapes and dtype kinds in a safetensors header (``safetensors_header``) against what
    ``build_model(cfg)`` holds, BEFORE any model is built: the expected tensors come from a model built on torch's
    ``meta`` device (shapes only, no memory), and the block count and head shape are compared first for a
    message that names the config field."""
    import re

    from ..nn.model import build_model

    where = f"weights in {run_dir} do not match config.json"
    blocks = {int(m.group(1)) for k in header if (m := re.match(r"blocks\.(\d+)\.", k))}
    nblocks = max(blocks) + 1 if blocks else 0
    if nblocks != cfg.depth:
        raise CheckpointError(f"{where}: it says depth {cfg.depth}, model.safetensors holds {nblocks} blocks")
    hw = header.get("head.weight")
    if hw is not None and hw[1] != (cfg.num_classes, cfg.dim):
        raise CheckpointError(f"{where}: head.weight has shape {hw[1]}, num_classes {cfg.num_classes} and dim "
                              f"{cfg.dim} need {(cfg.num_classes, cfg.dim)}")
    with torch.device("meta"):
        expected = {k: (v.is_floating_point(), tuple(v.shape)) for k, v in build_model(cfg).state_dict().items()}
    diff = _name_diff(expected, header)
    if diff:
        raise CheckpointError(f"{where} ({diff})")
    for k, (dtype, shape) in header.items():
        is_float, want = expected[k]
        if shape != want:
            raise CheckpointError(f"{where}: {k} has shape {shape}, expected {want}")
        if is_float != (dtype in _ST_FLOAT):
            raise CheckpointError(f"{where}: {k} is stored as {dtype}, expected a {'float' if is_float else 'integer'}"
                                  " tensor")


def _name_diff(expected, got) -> str:
    """'missing a, b unexpected c' for two collections of tensor names ('' when they agree)."""
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    return " ".join(([f"missing {', '.join(missing[:3])}"] if missing else [])
                    + ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []))


def read_json(path: Path, what: str = "file") -> dict:
    return fileio.read_json(path, what, CheckpointError)


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
    for key in ("train", "dataset", "metrics"):  # read by eval / run / energy (e.g. meta["train"]["dataset"])
        if key in meta and not isinstance(meta[key], dict):
            raise CheckpointError(f"{run_dir / 'config.json'}: {key!r} must be a JSON object, got {meta[key]!r}")
    ds = meta.get("train", {}).get("dataset")
    if ds is not None and not isinstance(ds, str):
        raise CheckpointError(f"{run_dir / 'config.json'}: train.dataset must be a dataset name, got {ds!r}")
    sha = meta.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise CheckpointError(f"{run_dir / 'config.json'}: weights_sha256 must be a sha256 hex string, got {sha!r}")
    return cfg, meta


def load_model(run_dir: str | Path, map_location: str = "cpu"):
    """Build the model from config.json and load model.safetensors; mismatches are CheckpointErrors.

    The weights are checked against config.json: names, shapes, finite values, and the sha256 recorded when they
    were saved (``weights_sha256``, when present). The config's bounds (ModelConfig.validate) and the names and
    shapes in the safetensors header are checked before the model is built or the tensor data is read."""
    from ..nn.model import build_model

    run_dir = resolve_run(run_dir)
    cfg, meta = load_config(run_dir)
    wpath = run_dir / "model.safetensors"
    check_weights_header(run_dir, cfg, safetensors_header(wpath))
    model = build_model(cfg)
    data = _read_bytes(wpath)
    sd = _parse_tensors(wpath, data)
    expected = model.state_dict()
    diff = _name_diff(expected, sd)
    if diff:
        raise CheckpointError(f"weights in {run_dir} do not match config.json ({diff})")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(
                f"weights in {run_dir} do not match config.json: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}"
            )
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"weights in {run_dir} contain NaN or infinite values ({k})")
    want = meta.get("weights_sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"{wpath} does not match the sha256 recorded in config.json (corrupted or replaced)")
    model.load_state_dict(sd)
    model.to(map_location)
    model.eval()
    return model, meta


# ----------------------------------------------------------------------------------------------------------------
# Training checkpoints (resume): self-verifying safetensors files in RUN/checkpoints, the two newest kept.

TRAIN_FORMAT = "stata-deploy-train/1"
CKPT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2


def _state_digest(tensors: dict[str, torch.Tensor], state_json: str) -> str:
    """sha256 over the JSON state and every tensor's name, dtype, shape and bytes (in name order)."""
    h = hashlib.sha256(state_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CKPT_DIR


def list_train_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the training checkpoints in RUN/checkpoints, newest first."""
    d = checkpoint_dir(run_dir)
    out = []
    if d.is_dir():
        for p in d.glob("step-*.safetensors"):
            try:
                out.append((int(p.name[len("step-") : -len(".safetensors")]), p))
            except ValueError:
                continue
    return sorted(out, reverse=True)


def save_train_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict,
                          keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write RUN/checkpoints/step-<step>.safetensors atomically (temp + fsync + rename) with a sha256 of its whole
    content inside, then delete older checkpoints beyond the ``keep`` newest (and any newer leftovers of an
    abandoned timeline). The previous checkpoint is deleted only after the new one is complete."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    state_json = json.dumps(state, sort_keys=True)
    path = checkpoint_dir(run_dir) / f"step-{step:09d}.safetensors"
    save_tensors(path, tensors, {"format": TRAIN_FORMAT, "state": state_json,
                                 "sha256": _state_digest(tensors, state_json)})
    older = [p for s, p in list_train_checkpoints(run_dir) if s < step][: max(0, keep - 1)]
    for s, p in list_train_checkpoints(run_dir):
        if p != path and p not in older:
            try:
                p.unlink()
            except OSError:
                pass
    return path


def read_train_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and verify one training checkpoint; CheckpointError if it is truncated, corrupted or not ours."""
    data = _read_bytes(path)
    tensors = _parse_tensors(path, data)
    md = _safetensors_metadata(path, data)
    if md.get("format") != TRAIN_FORMAT or "state" not in md or "sha256" not in md:
        raise CheckpointError(f"{path} is not a stata-deploy training checkpoint")
    if _state_digest(tensors, md["state"]) != md["sha256"]:
        raise CheckpointError(f"{path} fails its sha256 check (corrupted)")
    try:
        state = json.loads(md["state"])
    except ValueError:
        raise CheckpointError(f"{path} has an unreadable state record") from None
    return tensors, state


def load_latest_train_checkpoint(run_dir: str | Path, warn=None) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """The newest training checkpoint that verifies; broken newer ones are skipped with a warning via ``warn``."""
    found = list_train_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"nothing to resume: no training checkpoint in {checkpoint_dir(run_dir)}")
    problems = []
    for _, p in found:
        try:
            tensors, state = read_train_checkpoint(p)
        except CheckpointError as e:
            problems.append(str(e))
            if warn is not None:
                warn(f"warning: skipping checkpoint {p.name}: {e}")
            continue
        return tensors, state, p
    raise CheckpointError(f"no usable training checkpoint in {checkpoint_dir(run_dir)} ({problems[0]})")
