import gzip
import struct

import numpy as np
import pytest

from stata_deploy.train.data import load_dataset, load_image, read_idx, saccade_events
from stata_deploy.errors import DataError


def _write_idx(path, arr):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_digits_offline_split(digits):
    assert digits.x_train.shape[1:] == (1, 8, 8) and len(digits.y_train) + len(digits.y_test) == 1797
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    assert set(np.unique(digits.y_test)) == set(range(10))


def test_idx_folder_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (20, 6, 6)), rng.integers(0, 3, 20)
    xte, yte = rng.integers(0, 256, (5, 6, 6)), rng.integers(0, 3, 5)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", xtr)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", ytr)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", xte)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", yte)
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.x_train.shape == (20, 1, 6, 6)
    np.testing.assert_allclose(ds.x_test[:, 0] * 255, xte, atol=1e-4)
    assert (ds.y_train == ytr).all()


def test_idx_truncated_is_clear_error(tmp_path):
    p = tmp_path / "x.gz"
    header = struct.pack(">HBB", 0, 8, 2) + struct.pack(">II", 10, 10)
    with gzip.open(p, "wb") as f:
        f.write(header + b"\0" * 50)
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


def test_npz_and_image_loaders(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "d.npz", x_train=rng.random((8, 10, 10)), y_train=np.arange(8) % 2,
             x_test=rng.random((4, 10, 10)), y_test=np.arange(4) % 2)
    ds = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    assert ds.x_train.shape == (8, 1, 10, 10) and ds.num_classes == 2
    np.save(tmp_path / "img.npy", rng.random((10, 10)))
    assert load_image(tmp_path / "img.npy").shape == (1, 10, 10)
    np.savez(tmp_path / "bad.npz", x_train=rng.random((8, 10, 10)))
    with pytest.raises(DataError, match="must hold arrays"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_image_folder(tmp_path):
    from PIL import Image

    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.x_train.shape == (6, 1, 8, 8) and ds.num_classes == 2 and len(ds.y_test) == 4


def test_derived_events_are_binary_on_off(digits):
    ev = saccade_events(digits.x_test[:10], T=4)
    assert ev.shape == (10, 4, 2, 8, 8)
    assert set(np.unique(ev)) <= {0.0, 1.0} and ev.sum() > 0
    ds = load_dataset("digits-events", T=4)
    assert ds.derived and ds.is_sequence and ds.in_channels == 2


def test_unknown_and_missing_datasets():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(DataError, match="not found"):
        load_dataset("idx:/no/such/dir")
