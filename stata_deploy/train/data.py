"""Datasets that work offline.

Names: ``digits`` (scikit-learn, 8x8, always available), ``fashion-mnist`` (Debian's dataset-fashion-mnist, IDX),
``idx:DIR`` / ``npz:FILE`` / ``folder:DIR`` (bring your own), and derived event streams ``<name>-events``
(N-MNIST-style saccades of the static images, ON/OFF polarity, binned to T frames: DERIVED, not recorded by an
event camera).

What user data must be (checked when it is loaded, before any training or model building starts):

- labels: integer class indices in [0, MAX_CLASSES) (10000): a 1-D array (or (n, 1)); float labels are accepted only
  when every value is integral (3.0), anything else (1.5, NaN, strings, one-hot rows, negative values, 1e7) is
  refused with one line naming the split and the offending label.
- images are intensities in [0, 1], scaled by their real bit depth:
  files (Pillow modes): "1" (1-bit) -> {0, 1}; "L", "P", "RGB" (8-bit; alpha channels of "LA"/"RGBA"/"PA" are
  dropped) -> /255; "I;16*" (16-bit) -> /65535; "I" (how Pillow may open a 16-bit PNG) -> /65535, refused when a
  value lies outside 0..65535; "F" (float) as arrays below; other modes (CMYK, LAB, HSV, ...) are refused.
  arrays (.npy, .npz): bool -> {0, 1}; uint8 -> /255; uint16 -> /65535; any other real dtype: values in [0, 1] are
  used as they are, values with a maximum in (1, 255] are read as 8-bit values and divided by 255, larger values
  are refused (save 16-bit data as uint16). Negative, NaN/infinite, complex and non-numeric values are refused.
- sizes are checked from the file header before the pixels are read: at most MAX_IMAGE_PIXELS (4096 x 4096) pixels
  per image (a 400-megapixel PNG is one clear error, not Pillow's DecompressionBombError), at most
  MAX_IMAGE_VALUES values in one .npy input, at most MAX_DATASET_VALUES values in one .npz array.
- a .npy input to ``load_image(..., frames=True)`` may be (T, C, H, W): T frames fed one per timestep.
"""
from __future__ import annotations

import gzip
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import MAX_CLASSES, MAX_T
from ..errors import DataError

MAX_IMAGE_PIXELS = 4096 * 4096  # pixels (H * W) of one image file or array
MAX_IMAGE_VALUES = 1 << 26  # values in one .npy input, all frames and channels (256 MB as float32)
MAX_DATASET_VALUES = 1 << 31  # values in one .npz array (8 GB as float32)
MAX_CHANNELS = 64  # channels of one image (ModelConfig.in_channels has the same bound)

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


def labels(y, where: str) -> np.ndarray:
    """Class-index labels -> (n,) int64, or a DataError naming ``where`` (e.g. "dataset 'npz:f': train").

    Accepted: integer or bool arrays, and float arrays whose values are all integral; shape (n,) or (n, 1). Every
    label must be in [0, MAX_CLASSES)."""
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        hint = " (one-hot rows? pass class indices)" if y.ndim == 2 else ""
        raise DataError(f"{where} labels must be a 1-D array of class indices, got shape {y.shape}{hint}")
    kind = y.dtype.kind
    if kind not in "biuf":
        raise DataError(f"{where} labels must be integer class indices, got {y.dtype} values"
                        + (f" such as {y.flat[0]!r}" if y.size else ""))
    if y.size == 0:
        return y.astype(np.int64)
    if kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            v = y[np.flatnonzero(bad)[0]]
            raise DataError(f"{where} label {v!r} is not an integer: labels must be integer class indices")
    lo, hi = y.min(), y.max()
    if lo < 0:
        raise DataError(f"{where} label {lo:.10g} is negative: labels must be class indices 0..{MAX_CLASSES - 1}")
    if hi >= MAX_CLASSES:
        raise DataError(f"{where} label {hi:.10g} is too large: labels must be class indices 0..{MAX_CLASSES - 1} "
                        f"(at most {MAX_CLASSES} classes)")
    return y.astype(np.int64)


def intensities(x, where: str) -> np.ndarray:
    """An image array of any numeric dtype -> float32 intensities in [0, 1] (rules in the module doc), or a
    DataError naming ``where``."""
    x = np.asarray(x)
    kind = x.dtype.kind
    if kind == "c":
        raise DataError(f"{where} holds complex values; images must be real intensities in [0, 1]")
    if kind not in "biuf":
        raise DataError(f"{where} holds {x.dtype} values, not numbers; images must be intensities in [0, 1]")
    if kind == "b":
        return x.astype(np.float32)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255)
    if x.dtype == np.uint16:
        return x.astype(np.float32) / np.float32(65535)
    if kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{where} contains NaN or infinite values")
    if x.size == 0:
        return x.astype(np.float32)
    lo, hi = x.min(), x.max()
    if lo < 0:
        raise DataError(f"{where} has negative values (min {lo:.6g}); images must be intensities in [0, 1] "
                        f"(or 8-bit values 0..255)")
    if hi <= 1:
        return x.astype(np.float32)
    if hi <= 255:
        return x.astype(np.float32) / np.float32(255)  # 8-bit values in a wider dtype
    raise DataError(f"{where} has values up to {hi:.6g}; images must be intensities in [0, 1] or 8-bit values "
                    f"0..255 (save 16-bit images as uint16)")


def _check(ds: Dataset) -> Dataset:
    if not isinstance(ds.num_classes, int) or not 1 <= ds.num_classes <= MAX_CLASSES:
        raise DataError(f"dataset {ds.name!r} has {ds.num_classes} classes; at most {MAX_CLASSES} are supported")
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        if len(y) == 0:
            raise DataError(f"dataset {ds.name!r}: the {split} split is empty")
        if len(x) != len(y):
            raise DataError(f"dataset {ds.name!r}: {len(x)} {split} images but {len(y)} labels")
        y = labels(y, f"dataset {ds.name!r}: {split}")  # integer class indices in [0, MAX_CLASSES), as int64
        if y.max() >= ds.num_classes:
            raise DataError(f"dataset {ds.name!r}: {split} label {int(y.max())} is not one of its "
                            f"{ds.num_classes} classes (0..{ds.num_classes - 1})")
        setattr(ds, f"y_{split}", y)
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


def npy_header(f, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of an open .npy stream, reading nothing else; DataError if unreadable."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            shape, _, dtype = fmt._read_array_header(f, version)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as e:
        raise DataError(f"cannot read {where}: not a .npy array ({e})") from None
    return tuple(int(d) for d in shape), dtype


def _channels_last(shape: tuple) -> bool:
    """(n, H, W, C) rather than (n, C, H, W): the rule ``_npz`` uses to transpose."""
    return len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3)


def _npz_headers(z, path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of each array of an open NpzFile from the member headers (no array is read)."""
    import zipfile

    out = {}
    for k in ("x_train", "y_train", "x_test", "y_test"):
        if k not in z.files:
            raise DataError(f"{path} must hold arrays x_train, y_train, x_test, y_test (missing {k!r})")
        try:
            with z.zip.open(f"{k}.npy") as f:
                out[k] = npy_header(f, f"{path} ({k})")
        except (OSError, KeyError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read {path} as .npz: {e}") from None
    for split in ("train", "test"):
        (xs, xd), (ys, yd) = out[f"x_{split}"], out[f"y_{split}"]
        if not 3 <= len(xs) <= 4:
            raise DataError(f"{path}: images must be (n, H, W), (n, C, H, W) or (n, H, W, C), got x_{split} of "
                            f"shape {xs}")
        if int(np.prod(xs, dtype=np.float64)) > MAX_DATASET_VALUES:
            raise DataError(f"{path}: x_{split} of shape {xs} is too large (at most {MAX_DATASET_VALUES} values "
                            "per array)")
        h, w = xs[1:3] if _channels_last(xs) else xs[-2:]
        if h * w > MAX_IMAGE_PIXELS:
            raise DataError(f"{path}: x_{split} images of {h}x{w} pixels are too large (at most "
                            f"{MAX_IMAGE_PIXELS} pixels each)")
        if xd.hasobject or yd.hasobject:
            raise DataError(f"{path}: x_{split}/y_{split} hold Python objects; save numeric arrays")
        if len(ys) > 2 or int(np.prod(ys, dtype=np.float64)) > MAX_DATASET_VALUES:
            raise DataError(f"{path}: y_{split} labels must be a 1-D array of class indices, got shape {ys}")
    return out


def _npz(path: Path) -> Dataset:
    import zipfile

    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path} as .npz: {e}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise DataError(f"cannot read {path} as .npz: it is a single .npy array, not an archive of x_train, "
                        "y_train, x_test, y_test")
    with z:
        _npz_headers(z, path)  # shapes and dtypes checked before any array is read
        try:
            arrs = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read {path} as .npz: {e}") from None
    name = f"npz:{path}"

    def prep(x, split):
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[:, None]
        elif _channels_last(x.shape):
            x = x.transpose(0, 3, 1, 2)
        if x.ndim != 4:
            raise DataError(f"{path}: images must be (n, H, W), (n, C, H, W) or (n, H, W, C), got {x.shape}")
        if x.shape[1] > MAX_CHANNELS:
            raise DataError(f"{path}: x_{split} images have {x.shape[1]} channels (at most {MAX_CHANNELS})")
        return intensities(x, f"dataset {name!r}: x_{split}")

    ytr = labels(arrs["y_train"], f"dataset {name!r}: train")
    yte = labels(arrs["y_test"], f"dataset {name!r}: test")
    ncls = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
    return Dataset(name, prep(arrs["x_train"], "train"), ytr, prep(arrs["x_test"], "test"), yte, ncls)


def _load_npy(path: Path, frames: bool) -> np.ndarray:
    shapes = "(H, W), (C, H, W) or (T, C, H, W)" if frames else "(H, W) or (C, H, W)"
    try:
        with open(path, "rb") as f:
            shape, dtype = npy_header(f, str(path))
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not 2 <= len(shape) <= (4 if frames else 3):
        raise DataError(f"{path}: expected an array {shapes}, got shape {shape}")
    n = int(np.prod(shape, dtype=np.float64))
    if shape[-1] * shape[-2] > MAX_IMAGE_PIXELS or n > MAX_IMAGE_VALUES:
        raise DataError(f"{path}: an array of shape {shape} is too large for one input (at most "
                        f"{MAX_IMAGE_PIXELS} pixels per image and {MAX_IMAGE_VALUES} values); it was not loaded")
    if len(shape) >= 3 and shape[-3] > MAX_CHANNELS:
        raise DataError(f"{path}: shape {shape} has {shape[-3]} channels (at most {MAX_CHANNELS}); expected {shapes}")
    if len(shape) == 4 and not 1 <= shape[0] <= MAX_T:
        raise DataError(f"{path}: shape {shape} has {shape[0]} frames (at most {MAX_T} timesteps)")
    if dtype.hasobject:
        raise DataError(f"{path} holds Python objects; save a numeric array")
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    x = intensities(x, str(path))
    return x[None] if x.ndim == 2 else x


# Pillow mode -> divisor to [0, 1] (None: the 'I' / 'F' rules of the module doc). Alpha bands are dropped.
_MODE_SCALE = {"1": 1, "L": 255, "LA": 255, "La": 255, "P": 255, "PA": 255, "RGB": 255, "RGBA": 255, "RGBa": 255,
               "RGBX": 255, "YCbCr": 255, "I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535,
               "I": None, "F": None}


def _decode(img, path: Path) -> np.ndarray:
    """An opened PIL image -> (C, H, W) float32 in [0, 1], by its real bit depth (see the module doc)."""
    mode = img.mode
    if mode not in _MODE_SCALE:
        raise DataError(f"image {path} has Pillow mode {mode!r}, which this reader cannot interpret as intensities "
                        f"(supported: {', '.join(_MODE_SCALE)}); convert it to greyscale or RGB")
    if mode in ("P", "PA"):
        pal = img.convert("RGBA")
        rgb = np.asarray(pal)[..., :3]
        grey = bool((rgb == rgb[..., :1]).all())  # a grey palette stays one channel
        return (rgb[..., :1] if grey else rgb).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    if mode == "YCbCr":
        img = img.convert("RGB")
    a = np.asarray(img)
    if a.ndim == 2:
        a = a[..., None]
    if mode in ("LA", "La", "RGBA", "RGBa", "RGBX"):
        a = a[..., :-1]  # alpha (or padding) dropped
    a = a.transpose(2, 0, 1)
    if mode == "1":
        return a.astype(np.float32)  # bool -> {0, 1}
    if mode == "I":  # 32-bit signed container; Pillow opens 16-bit PNGs this way
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"image {path} (Pillow mode 'I') has values {a.min()}..{a.max()} outside 16-bit "
                            "0..65535: cannot tell its bit depth")
        return a.astype(np.float32) / np.float32(65535)
    if mode == "F":
        return intensities(a, f"image {path}")
    return a.astype(np.float32) / np.float32(_MODE_SCALE[mode])


def _open_image(path: Path):
    """PIL.Image.open (header only) with every failure, the decompression-bomb guard included, as a DataError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(m.group(1)) / 1e6:.1f} megapixels" if m else "too many pixels"
        raise DataError(f"image {path} is too large ({size}; at most {MAX_IMAGE_PIXELS / 1e6:.1f} megapixels are "
                        "read); it was not decoded") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"cannot read image {path}: {e}") from None
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        img.close()
        raise DataError(f"image {path} is too large ({w}x{h}, {w * h / 1e6:.1f} megapixels; at most "
                        f"{MAX_IMAGE_PIXELS / 1e6:.1f} megapixels are read); it was not decoded")
    return img


def load_image(path: Path, channels: int | None = None, frames: bool = False) -> np.ndarray:
    """One image file (.png/.jpg/...) or .npy -> (C, H, W) float32 in [0, 1] (scaling rules in the module doc).

    ``channels`` (1 or 3): convert grey <-> RGB (ITU-R 601 luma for RGB -> grey). ``frames``: a 4-D .npy
    (T, C, H, W) is returned as it is (T frames, one per timestep) instead of being refused. Sizes are checked
    from the file header before anything is decoded."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    if path.suffix.lower() == ".npy":
        x = _load_npy(path, frames)
    else:
        img = _open_image(path)
        try:
            with img:
                img.load()
                x = _decode(img, path)
        except DataError:
            raise
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise DataError(f"cannot read image {path}: {e}") from None
    if channels == 1 and x.shape[-3] == 3:
        w = np.asarray([0.299, 0.587, 0.114], np.float32).reshape(3, 1, 1)
        x = (x * w).sum(-3, keepdims=True)
    elif channels == 3 and x.shape[-3] == 1:
        x = np.repeat(x, 3, axis=-3)
    return np.ascontiguousarray(x, dtype=np.float32)


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
