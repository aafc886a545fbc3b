"""Writing files safely: the one place every writer goes through (checkpoints, masks, metrics, exports, plots).

Rules
    * **Atomic**: data goes to a temporary file in the destination's folder, is fsynced and renamed over the
      destination. On any failure (full disk, read-only folder, a signal) the temporary file is removed and the
      destination is left as it was: a partial file never appears under its final name.
    * **In memory first** where a library writes through C (h5py for NIR/netx, onnx, matplotlib): the library writes
      into a ``BytesIO`` and only our own ``write`` touches the disk, so a full disk is one ``OSError`` here, never a
      crash inside HDF5 (``nir.write`` to a full tmpfs segfaulted, rc 139).
    * **Checked before work starts** (``check_output``): the destination must be a regular file or not exist; a
      symlink, a device node (``/dev/full``), a FIFO, a socket or a folder is refused (renaming would replace the link
      or node itself); a run folder's own files (``RUN_FILES``) are never a destination of another command; the
      suffix must fit what is written; the folder must be creatable.

Every failure is a ``StataError`` with one line naming the file: the CLI prints it and exits 2.
"""
from __future__ import annotations

import errno
import io
import json
import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import StataError

# The files that make a run folder: no command writes over them except the one that owns them (train / prune).
RUN_FILES = ("config.json", "model.safetensors", "metrics.json", "metrics.jsonl")
RUN_DIRS = ("checkpoints",)

_UMASK = os.umask(0o022)
os.umask(_UMASK)


class OutputError(StataError):
    """An output location that cannot or must not be written."""


def _is_run_folder(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").exists()


def check_output(path: str | Path, *, suffixes: Iterable[str] | None = None, what: str = "output",
                 owner: bool = False) -> Path:
    """Validate a file destination before any work is done; return it as a Path.

    suffixes: allowed suffixes (lower case, with the dot), or None for any. owner: the caller owns the run folder's
    files (train / prune writing their own run), so ``RUN_FILES`` may be written.
    """
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise OutputError(f"{what} {str(path)!r} is not a file name")
    if suffixes is not None:
        allowed = tuple(s.lower() for s in suffixes)
        if p.suffix.lower() not in allowed:
            raise OutputError(f"{what} {p}: the file name must end in {' or '.join(allowed)}")
    if p.is_symlink():
        raise OutputError(f"{what} {p} is a symbolic link; refusing to replace it (write to the real path)")
    if p.exists():
        mode = os.stat(p).st_mode
        if stat.S_ISDIR(mode):
            raise OutputError(f"{what} {p} is a directory")
        if not stat.S_ISREG(mode):
            raise OutputError(f"{what} {p} is not a regular file (a device, FIFO or socket); refusing to write it")
    parent = p.parent
    if not owner and (p.name in RUN_FILES or parent.name in RUN_DIRS) and (
            _is_run_folder(parent) or _is_run_folder(parent.parent)):
        raise OutputError(f"{what} {p} is one of the run folder's own files; choose another --out")
    ensure_folder(parent, what)
    return p


def ensure_folder(d: Path, what: str = "output") -> None:
    """Create folder ``d`` (and parents) or raise one clear line."""
    d = Path(d)
    if d.is_dir():
        return
    if d.exists() or d.is_symlink():
        raise OutputError(f"cannot create folder {d} for the {what}: {_strerror(errno.ENOTDIR)}")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create folder {d}: {e.strerror or e}") from None


def _strerror(code: int) -> str:
    return os.strerror(code)


def _open_temp(path: Path):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; a finished file gets the usual permissions
    return fd, tmp


def atomic_write(path: str | Path, write: Callable, *, owner: bool = True) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object; then fsync + rename.

    The destination is checked (``check_output``) first; ``owner`` as there (default True: callers that write a run
    folder's own files are the library's writers; commands check user-given paths themselves before work starts)."""
    path = Path(path)
    check_output(path, owner=owner)
    fd, tmp = None, None
    try:
        fd, tmp = _open_temp(path)
        with os.fdopen(fd, "wb") as f:
            fd = None
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, owner: bool = True) -> Path:
    return atomic_write(path, lambda f: f.write(data), owner=owner)


def atomic_write_text(path: str | Path, text: str, *, owner: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode(), owner=owner)


def atomic_write_json(path: str | Path, obj, *, owner: bool = True) -> Path:
    """Strict JSON (no NaN / Infinity: non-finite numbers are written as null, see ``strict``)."""
    return atomic_write_text(path, dumps(obj, indent=2, sort_keys=True) + "\n", owner=owner)


def write_via_buffer(path: str | Path, produce: Callable[[io.BytesIO], None], *, owner: bool = True) -> Path:
    """For libraries that write to a file object through C (h5py, onnx, matplotlib): ``produce(buf)`` writes
    into memory, then the bytes are written atomically."""
    buf = io.BytesIO()
    produce(buf)
    return atomic_write_bytes(path, buf.getvalue(), owner=owner)


def atomic_dir_files(files: dict[Path, Callable[[Path], None]]) -> None:
    """Several files that belong together (e.g. ONNX model + external data): each ``fill(tmp_path)`` writes a temp
    path in its destination's folder; only when all succeeded are they renamed into place."""
    tmps: dict[Path, str] = {}
    try:
        for dest, fill in files.items():
            check_output(dest)
            fd, tmp = _open_temp(dest)
            os.close(fd)
            tmps[dest] = tmp
            fill(Path(tmp))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for dest, tmp in tmps.items():
            os.replace(tmp, dest)
        tmps.clear()
    except OSError as e:
        raise OutputError(f"cannot write {next(iter(files))}: {e.strerror or e}") from None
    finally:
        for tmp in tmps.values():
            if os.path.lexists(tmp):
                os.unlink(tmp)


def read_json(path: str | Path, what: str = "file", error=StataError) -> dict:
    """A JSON object from ``path``; a missing file, invalid JSON or a non-object is one ``error`` naming ``what``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{what} {path} must hold a JSON object")
    return d


# ------------------------------------------------------------------------------------------------ strict JSON
def strict(obj, reasons: dict | None = None, where: str = ""):
    """A copy of ``obj`` that strict JSON parsers accept: NaN / +-Infinity become null, and (if ``reasons`` is a
    dict) ``reasons[path] = 'NaN' | 'Infinity' | '-Infinity'`` records where and why."""
    if isinstance(obj, float) or (hasattr(obj, "dtype") and getattr(obj, "shape", None) == ()):
        try:
            v = float(obj)
        except (TypeError, ValueError):
            return obj
        if math.isfinite(v):
            return obj
        if reasons is not None:
            reasons[where or "."] = "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        return None
    if isinstance(obj, dict):
        return {k: strict(v, reasons, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v, reasons, f"{where}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy arrays
        return strict(obj.tolist(), reasons, where)
    return obj


def json_default(o):
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj, **kw) -> str:
    """json.dumps that never writes NaN / Infinity (they become null)."""
    return json.dumps(strict(json.loads(json.dumps(obj, default=json_default))), allow_nan=False, **kw)


def check_run_out(out: str | Path, *, force: bool = False, resume: bool = False, source: str | Path | None = None,
                  option: str = "--out") -> Path:
    """A run folder a command is about to create (train, prune): refused when it is a file, when it is the source
    run, or when it already holds something, unless ``force`` (replace) or ``resume`` (continue) says so."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{option} {out} exists and is not a folder")
    if source is not None and out.exists() and out.resolve() == Path(source).resolve():
        raise OutputError(f"{option} {out} is the source run itself; write the result to a new folder")
    if out.is_dir() and not resume and any(out.iterdir()) and not force:
        what = "a run" if (out / "config.json").is_file() else "files"
        raise OutputError(f"{option} {out} already exists and holds {what}; pass --force to replace it"
                          + (" or --resume to continue it" if what == "a run" else "") + ", or choose a new folder")
    return out


def remove_if_empty(folder: str | Path) -> None:
    """Remove ``folder`` if it (and its subfolders) hold no file: a failed fresh run leaves no empty folder."""
    folder = Path(folder)
    try:
        if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
            for d in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                d.rmdir()
            folder.rmdir()
    except OSError:
        pass
