"""Datasets that work offline.

Names: ``digits`` (scikit-learn, 8x8, always available), ``fashion-mnist`` (Debian's dataset-fashion-mnist, IDX),
``idx:DIR`` / ``npz:FILE`` / ``folder:DIR`` (bring your own), and derived event streams ``<name>-events``
(N-MNIST-style saccades of the static images, ON/OFF polarity, binned to T frames: DERIVED, not recorded by an
event camera).
"""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_HINT = "install it with: apt-get install -y dataset-fashion-mnist (or pass --dataset idx:DIR)"


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # (n, C, H, W) float32 in [0, 1], or (n, T, C, H, W) for event streams
    y_train: np.ndarray  # (n,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    derived: bool = False

    @property
    def is_sequence(self) -> bool:
        return self.x_train.ndim == 5

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[-3]

    @property
    def img_size(self) -> int:
        return self.x_train.shape[-1]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train": len(self.y_train),
            "test": len(self.y_test),
            "shape": list(self.x_train.shape[1:]),
            "classes": self.num_classes,
            "derived": self.derived,
        }


def _check(ds: Dataset) -> Dataset:
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if len(y) == 0:
            raise DataError(f"dataset {ds.name!r}: the {split} split is empty")
        if len(x) != len(y):
            raise DataError(f"dataset {ds.name!r}: {len(x)} {split} images but {len(y)} labels")
        if not np.isfinite(x).all():
            raise DataError(f"dataset {ds.name!r}: the {split} split contains NaN or infinite values")
        if x.shape[-1] != x.shape[-2]:
            raise DataError(f"dataset {ds.name!r}: images must be square, got {x.shape[-2]}x{x.shape[-1]}")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise DataError(f"dataset {ds.name!r}: train and test shapes differ")
    return ds


def _digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return Dataset("digits", xtr, ytr, xte, yte, 10)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise DataError(f"{path} is not an unsigned-byte IDX file")
        dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != int(np.prod(dims)):
            raise DataError(f"{path} is truncated ({arr.size} of {int(np.prod(dims))} values)")
        return arr.reshape(dims)
    except (OSError, EOFError, struct.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None


def _find(root: Path, stem: str) -> Path:
    for cand in (root / f"{stem}.gz", root / stem):
        if cand.is_file():
            return cand
    alt = stem.replace("-idx", ".idx")
    for cand in (root / f"{alt}.gz", root / alt):
        if cand.is_file():
            return cand
    raise DataError(f"missing {stem}[.gz] in {root}")


def _idx_dir(root: Path, name: str, hint: str = "") -> Dataset:
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}" + (f"; {hint}" if hint else ""))
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        parts[f"x_{split}"] = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        parts[f"y_{split}"] = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    xtr = (parts["x_train"].astype(np.float32) / 255.0)[:, None]
    xte = (parts["x_test"].astype(np.float32) / 255.0)[:, None]
    ncls = int(max(parts["y_train"].max(), parts["y_test"].max())) + 1
    return Dataset(name, xtr, parts["y_train"], xte, parts["y_test"], ncls)


def _npz(path: Path) -> Dataset:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
        arrs = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as e:
        raise DataError(f"{path} must hold arrays x_train, y_train, x_test, y_test (missing {e})") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from None

    def prep(x):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        if x.ndim != 4:
            raise DataError(f"{path}: images must be (n, H, W), (n, C, H, W) or (n, H, W, C), got {x.shape}")
        return x / 255.0 if x.max(initial=0) > 1.0 else x

    ytr, yte = arrs["y_train"].astype(np.int64).ravel(), arrs["y_test"].astype(np.int64).ravel()
    ncls = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    return Dataset(f"npz:{path}", prep(arrs["x_train"]), ytr, prep(arrs["x_test"]), yte, ncls)


def load_image(path: Path, channels: int | None = None) -> np.ndarray:
    """One image file (.png/.jpg/...) or .npy -> (C, H, W) float32 in [0, 1]."""
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    if path.suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path}: {e}") from None
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise DataError(f"{path}: expected an array (H, W) or (C, H, W), got shape {x.shape}")
        if not np.isfinite(x).all():
            raise DataError(f"{path} contains NaN or infinite values")
        return x / 255.0 if x.max(initial=0) > 1.0 else x
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img = img.convert("L" if channels == 1 else "RGB") if channels in (1, 3) else img
        x = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)


def _folder(root: Path) -> Dataset:
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    splits = {}
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) if (root / "train").is_dir() else []
    if not classes:
        raise DataError(f"{root} must contain train/<class>/*.png and test/<class>/*.png")
    for split in ("train", "test"):
        xs, ys = [], []
        for ci, c in enumerate(classes):
            for f in sorted((root / split / c).glob("*")):
                if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".npy"):
                    xs.append(load_image(f))
                    ys.append(ci)
        if not xs:
            raise DataError(f"no images in {root / split}")
        shapes = {x.shape for x in xs}
        if len(shapes) > 1:
            raise DataError(f"images in {root / split} have different shapes: {sorted(shapes)[:3]}")
        splits[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    return Dataset(f"folder:{root}", *splits["train"], *splits["test"], len(classes))


def saccade_events(x: np.ndarray, T: int, threshold: float = 0.1) -> np.ndarray:
    """N-MNIST-style derived events: move the image along 3 saccades (a triangle of one-pixel shifts), emit ON/OFF
    events where the brightness changes by more than ``threshold``, bin into T frames. (n, 1, H, W) -> (n, T, 2, H, W)."""
    path = [(0, 0), (1, 1), (0, 2), (-1, 1), (0, 0)]  # dy, dx corners of the saccade triangle
    steps = []
    for (y0, x0), (y1, x1) in zip(path[:-1], path[1:]):
        for a in np.linspace(0, 1, 4, endpoint=False):
            steps.append((y0 + a * (y1 - y0), x0 + a * (x1 - x0)))
    img = x[:, 0]
    frames = []
    for dy, dx in steps:  # sub-pixel shift by bilinear interpolation along each axis
        fy, fx = dy - np.floor(dy), dx - np.floor(dx)
        s = np.roll(img, (int(np.floor(dy)), int(np.floor(dx))), axis=(1, 2))
        s = (1 - fy) * s + fy * np.roll(s, 1, axis=1)
        s = (1 - fx) * s + fx * np.roll(s, 1, axis=2)
        frames.append(s)
    frames = np.stack(frames, 1)  # (n, S, H, W)
    diff = np.diff(frames, axis=1, prepend=frames[:, -1:])
    on, off = (diff > threshold), (diff < -threshold)
    ev = np.stack([on, off], 2).astype(np.float32)  # (n, S, 2, H, W)
    bins = np.array_split(np.arange(ev.shape[1]), T)
    return np.stack([ev[:, b].max(1) for b in bins], 1)  # (n, T, 2, H, W), binary


def load_dataset(name: str, T: int = 4) -> Dataset:
    """Load a dataset by name (see module doc). Raises DataError with a clear message."""
    if name.endswith("-events"):
        base = load_dataset(name[: -len("-events")], T)
        if base.is_sequence or base.in_channels != 1:
            raise DataError("derived events need a single-channel static dataset")
        return _check(
            Dataset(name, saccade_events(base.x_train, T), base.y_train, saccade_events(base.x_test, T), base.y_test,
                    base.num_classes, derived=True)
        )
    if name == "digits":
        return _check(_digits())
    if name == "fashion-mnist":
        return _check(_idx_dir(FASHION_DIR, name, FASHION_HINT))
    kind, _, arg = name.partition(":")
    if arg:
        if kind == "idx":
            return _check(_idx_dir(Path(arg), name))
        if kind == "npz":
            return _check(_npz(Path(arg)))
        if kind == "folder":
            return _check(_folder(Path(arg)))
    raise DataError(
        f"unknown dataset {name!r}; choose digits, fashion-mnist, idx:DIR, npz:FILE, folder:DIR, or <name>-events"
    )


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
            seq_first: bool = True):
    """Yield (x, y) torch batches; sequence data (n, T, C, H, W) is returned as (T, B, C, H, W)."""
    n = len(y)
    order = torch.randperm(n, generator=generator).numpy() if shuffle else np.arange(n)
    for i in range(0, n, batch_size):
        sel = order[i : i + batch_size]
        xb = torch.from_numpy(np.ascontiguousarray(x[sel]))
        if xb.dim() == 5 and seq_first:
            xb = xb.transpose(0, 1)
        yield xb, torch.from_numpy(y[sel])
