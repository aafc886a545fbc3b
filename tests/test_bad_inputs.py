"""Bad-input catalogue: for every CLI command, the inputs users get wrong.

Each case asserts: a non-zero exit, ONE clear error message containing the expected words, no traceback, no
unexpected exception, and no partial output (the outputs the command would have written do not exist or hold no
files, and no temporary files are left anywhere).

To add a command: add its cases to CASES (argv with {placeholders}, see ``paths``) and, if it writes files, one
entry to WRITERS (a valid command line and what it writes): the disk-full, read-only and output-under-a-file cases
are generated from it.

Simulations (the tests run as root, and there is no small tmpfs here):
- disk full: ``open``/``io.open``/``os.fdopen`` return files whose ``write`` raises ENOSPC and ``os.write`` raises
  ENOSPC (the file is still created, so a writer that is not atomic leaves a partial file and fails the test);
- read-only folder: ``os.open``/``os.mkdir``/``open`` raise EROFS for paths under the folder (chmod does not stop
  root); a real, not simulated, variant puts the output path under a regular file (ENOTDIR).
"""
from __future__ import annotations

import builtins
import contextlib
import errno
import io
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stata_deploy.train import checkpoint as ckpt
from stata_deploy.cli.main import main


# ---------------------------------------------------------------------------------------------------------------
# simulations

class _FullFile:
    """A real file object whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    writelines = write

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)


def _writing(mode) -> bool:
    return isinstance(mode, str) and any(c in mode for c in "wax+")


@contextlib.contextmanager
def _patched_io(mp: pytest.MonkeyPatch, fake_open, **os_fakes):
    """Within the block: builtins.open and io.open are ``fake_open``, each ``os.<name>`` its fake."""
    with mp.context() as m:
        m.setattr(builtins, "open", fake_open)
        m.setattr(io, "open", fake_open)
        for name, fake in os_fakes.items():
            m.setattr(os, name, fake)
        yield


def disk_full(mp: pytest.MonkeyPatch):
    def full_when_writing(real):
        def fake(file, mode="r", *a, **k):
            f = real(file, mode, *a, **k)
            return _FullFile(f) if _writing(mode) else f
        return fake

    def fake_write(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    return _patched_io(mp, full_when_writing(builtins.open), fdopen=full_when_writing(os.fdopen), write=fake_write)


def read_only(mp: pytest.MonkeyPatch, root: Path):
    root = str(Path(root).resolve())
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def under(path) -> bool:
        try:
            p = os.path.abspath(os.fspath(path))
        except TypeError:
            return False
        return p == root or p.startswith(root + os.sep)

    def ro():
        return OSError(errno.EROFS, "Read-only file system")

    def fake_open(file, mode="r", *a, **k):
        if _writing(mode) and under(file):
            raise ro()
        return real_open(file, mode, *a, **k)

    def fake_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            raise ro()
        return real_os_open(path, flags, *a, **k)

    def fake_mkdir(path, *a, **k):
        if under(path):
            raise ro()
        return real_mkdir(path, *a, **k)

    return _patched_io(mp, fake_open, open=fake_os_open, mkdir=fake_mkdir)


# ---------------------------------------------------------------------------------------------------------------
# inputs

def _clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(run: Path, fn) -> None:
    sd = ckpt.load_tensors(run / "model.safetensors")
    fn(sd)
    ckpt.save_tensors(run / "model.safetensors", sd, {"format": ckpt.FORMAT})


def _edit_config(run: Path, fn) -> None:
    cfg = json.loads((run / "config.json").read_text())
    fn(cfg)
    (run / "config.json").write_text(json.dumps(cfg))


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, digits, base_run, trained_run):
    """Every broken input, made once. Values are strings for the command line."""
    d = tmp_path_factory.mktemp("bad")
    x, y, xt, yt = digits.x_train[:64], digits.y_train[:64], digits.x_test[:32], digits.y_test[:32]
    p: dict[str, str] = {"base": str(base_run), "stata": str(trained_run)}
    p["tiny"] = _npz(d / "tiny.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    p["empty_train"] = _npz(d / "empty_train.npz", x_train=x[:0], y_train=y[:0], x_test=xt, y_test=yt)
    p["empty_test"] = _npz(d / "empty_test.npz", x_train=x, y_train=y, x_test=xt[:0], y_test=yt[:0])
    xn = x.copy()
    xn[3, 0, 2, 2] = np.nan
    p["nan_data"] = _npz(d / "nan.npz", x_train=xn, y_train=y, x_test=xt, y_test=yt)
    p["len_mismatch"] = _npz(d / "len.npz", x_train=x, y_train=y[:10], x_test=xt, y_test=yt)
    p["not_square"] = _npz(d / "rect.npz", x_train=x[..., :6], y_train=y, x_test=xt[..., :6], y_test=yt)
    p["missing_key"] = _npz(d / "nokey.npz", x_train=x, y_train=y)
    p["big_images"] = _npz(d / "big.npz", x_train=np.zeros((8, 1, 16, 16), np.float32), y_train=y[:8],
                           x_test=np.zeros((8, 1, 16, 16), np.float32), y_test=yt[:8])
    p["many_classes"] = _npz(d / "classes.npz", x_train=x, y_train=y + 10, x_test=xt, y_test=yt + 10)
    (d / "not_npz.npz").write_text("this is text, not numpy")
    p["not_npz"] = f"npz:{d / 'not_npz.npz'}"
    (d / "pickled.npz").write_bytes(np.array([{"a": 1}], dtype=object).dumps())
    p["pickled_npz"] = f"npz:{d / 'pickled.npz'}"
    p["missing_npz"] = f"npz:{d / 'nope.npz'}"
    p["missing_idx"] = f"idx:{d / 'no_idx_dir'}"
    (d / "empty_folder_ds" / "train").mkdir(parents=True)
    p["empty_image_folder"] = f"folder:{d / 'empty_folder_ds'}"
    # runs
    (d / "notes.txt").write_text("not a run")
    p["a_file"] = str(d / "notes.txt")
    (d / "empty_dir").mkdir()
    p["empty_dir"] = str(d / "empty_dir")
    p["missing"] = str(d / "no_such_run")
    r = _clone(base_run, d / "bad_json")
    (r / "config.json").write_text("{not json")
    p["bad_json"] = str(r)
    r = _clone(base_run, d / "json_list")
    (r / "config.json").write_text("[1, 2]")
    p["json_list"] = str(r)
    r = _clone(base_run, d / "wrong_format")
    _edit_config(r, lambda c: c.update(format="someone-else/9"))
    p["wrong_format"] = str(r)
    r = _clone(base_run, d / "bad_field")
    _edit_config(r, lambda c: c["model"].update(heads=0))
    p["bad_field"] = str(r)
    r = _clone(base_run, d / "garbage")
    (r / "model.safetensors").write_bytes(b"\x00garbage" * 50)
    p["garbage"] = str(r)
    r = _clone(base_run, d / "truncated")
    data = (r / "model.safetensors").read_bytes()
    (r / "model.safetensors").write_bytes(data[: len(data) // 2])
    p["truncated"] = str(r)
    r = _clone(base_run, d / "no_weights")
    (r / "model.safetensors").unlink()
    p["no_weights"] = str(r)
    r = _clone(base_run, d / "nan_weights")
    _rewrite_weights(r, lambda sd: sd["head.weight"].__setitem__((0, 0), float("nan")))
    p["nan_weights"] = str(r)
    r = _clone(base_run, d / "shape")
    _edit_config(r, lambda c: c["model"].update(dim=64))
    p["shape_mismatch"] = str(r)
    r = _clone(base_run, d / "replaced")
    _rewrite_weights(r, lambda sd: sd["head.bias"].add_(0.5))
    p["replaced_weights"] = str(r)
    r = _clone(base_run, d / "pickle_weights")
    torch.save({"head.weight": torch.zeros(2)}, r / "model.safetensors")
    p["pickle_weights"] = str(r)
    # masks
    p["missing_masks"] = str(d / "masks_missing.json")
    (d / "masks_bad.json").write_text("{oops")
    p["bad_masks"] = str(d / "masks_bad.json")
    (d / "masks_wrong.json").write_text(json.dumps({"T": 9, "n_full": 3, "mode": "drop", "sites": {"7": [[True]]}}))
    p["wrong_masks"] = str(d / "masks_wrong.json")
    # deployment files (export / run / inspect)
    np.save(d / "img_big.npy", np.zeros((16, 16), np.float32))
    p["img_big"] = str(d / "img_big.npy")
    nan_img = np.zeros((8, 8), np.float32)
    nan_img[1, 1] = np.nan
    np.save(d / "img_nan.npy", nan_img)
    p["img_nan"] = str(d / "img_nan.npy")
    (d / "img_text.png").write_text("not a png")
    p["img_text"] = str(d / "img_text.png")
    p["img_missing"] = str(d / "img_missing.png")
    (d / "garbage.onnx").write_bytes(b"\x08garbage" * 20)
    p["garbage_onnx"] = str(d / "garbage.onnx")
    (d / "garbage.nir").write_bytes(b"not hdf5 at all" * 10)
    p["garbage_nir"] = str(d / "garbage.nir")
    (d / "empty.nir").write_bytes(b"")
    p["empty_nir"] = str(d / "empty.nir")
    (d / "model.txt").write_text("a model?")
    p["txt_model"] = str(d / "model.txt")
    (d / "folder.nir").mkdir()
    p["dir_nir"] = str(d / "folder.nir")
    if "export" in main.commands:
        r = CliRunner().invoke(main, ["export", str(base_run), "--to", "onnx", "--out", str(d / "m.onnx")])
        if r.exit_code == 0:
            p["onnx"] = str(d / "m.onnx")
            data = (d / "m.onnx").read_bytes()
            (d / "trunc.onnx").write_bytes(data[: len(data) // 3])
            p["trunc_onnx"] = str(d / "trunc.onnx")
    # --- issue 12 item 6/7: user data and config checks (labels, config bounds, bit depths, sizes, exported files)
    import struct
    import zipfile
    import zlib

    for key, bad in (("label_huge", 10_000_000), ("label_negative", -1)):
        yl = y.copy()
        yl[5] = bad
        p[key] = _npz(d / f"{key}.npz", x_train=x, y_train=yl, x_test=xt, y_test=yt)
    p["label_float"] = _npz(d / "label_float.npz", x_train=x, y_train=y + 0.5, x_test=xt, y_test=yt)
    p["label_text"] = _npz(d / "label_text.npz", x_train=x, y_train=np.array([str(v) for v in y]), x_test=xt, y_test=yt)
    p["label_onehot"] = _npz(d / "label_onehot.npz", x_train=x, y_train=np.eye(10, dtype=np.int64)[y], x_test=xt,
                             y_test=yt)
    with open(d / "giant_x.npy", "wb") as f:  # a header claiming 10^6 images of 4096x4096, no data
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (10**6, 1, 4096, 4096)})
    with zipfile.ZipFile(d / "giant.npz", "w") as z:
        z.write(d / "giant_x.npy", "x_train.npy")
        for k, v in (("y_train", y), ("x_test", xt), ("y_test", yt)):
            np.save(d / f"giant_{k}.npy", v)
            z.write(d / f"giant_{k}.npy", f"{k}.npy")
    p["giant_npz"] = f"npz:{d / 'giant.npz'}"
    for key, upd in (("cfg_T_true", {"T": True}), ("cfg_scale_text", {"attn_scale": "big"}),
                     ("cfg_depth_huge", {"depth": 1_000_000}), ("cfg_depth_40", {"depth": 40})):
        r = _clone(base_run, d / key)
        _edit_config(r, lambda c, upd=upd: c["model"].update(upd))
        p[key] = str(r)
    np.save(d / "img_negative.npy", -np.ones((8, 8), np.float32))
    p["img_negative"] = str(d / "img_negative.npy")
    np.save(d / "img_complex.npy", np.ones((8, 8), np.complex64))
    p["img_complex"] = str(d / "img_complex.npy")
    with open(d / "img_huge.npy", "wb") as f:  # header only: (100000, 100000) float32 = 40 GB claimed
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (100_000, 100_000)})
    p["img_huge_npy"] = str(d / "img_huge.npy")
    np.save(d / "img_frames3.npy", np.repeat(xt[:1], 3, 0))  # (3, 1, 8, 8): 3 frames for a T=4 model
    p["img_frames3"] = str(d / "img_frames3.npy")

    def _chunk(t, b):
        return struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b) & 0xFFFFFFFF)

    zc = zlib.compressobj(9)  # a 20000x20000 1-bit PNG (400 megapixels) in ~50 KB, written row by row
    idat = b"".join(zc.compress(b"\0" * 2501) for _ in range(20000)) + zc.flush()
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 1, 0, 0, 0, 0))
    (d / "img_400mp.png").write_bytes(b"\x89PNG\r\n\x1a\n" + ihdr + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    p["img_400mp"] = str(d / "img_400mp.png")
    if "onnx" in p:
        from test_input_checks import _onnx_variant  # one ONNX-variant maker for both catalogues

        def variant(key, desc_fn=None, nan=False):
            p[key] = str(_onnx_variant(Path(p["onnx"]), d / f"{key}.onnx", desc_fn,
                                       (lambda a: a.flat.__setitem__(0, np.nan)) if nan else None))

        variant("onnx_nan", nan=True)
        variant("onnx_T8", lambda dd: (dd.update(T=8), dd["config"].update(T=8)))
        variant("onnx_T_true", lambda dd: dd["config"].update(T=True))
    if "export" in main.commands:
        r = CliRunner().invoke(main, ["export", str(base_run), "--to", "nir", "--out", str(d / "m.nir")])
        if r.exit_code == 0:
            import nir

            def _nir_variant(key, desc=None, nan=False):
                g = nir.read(str(d / "m.nir"))
                if desc:
                    dd = json.loads(g.metadata["stata_deploy"])
                    dd.update(desc)
                    g.metadata["stata_deploy"] = json.dumps(dd)
                if nan:
                    node = next(n for n in g.nodes.values() if hasattr(n, "weight"))
                    w = np.array(node.weight, dtype=np.float64)
                    w.flat[0] = np.nan
                    node.weight = w
                nir.write(str(d / f"{key}.nir"), g)
                p[key] = str(d / f"{key}.nir")

            _nir_variant("nir_nan", nan=True)
            _nir_variant("nir_dt0", {"dt": 0})
            _nir_variant("nir_T_huge", {"T": 1_000_000})
    return p


def _mask_files(d: Path, stata_run: str) -> dict[str, str]:
    """Masks that fit the STATA run's shapes but break a rule: anchor dropped, no image token, nothing pruned."""
    cfg = json.loads((Path(stata_run) / "config.json").read_text())["model"]
    T, n = cfg["T"], (cfg["img_size"] // 2 ** cfg.get("pool_stages", 0)) ** 2 + 1
    good = np.zeros((T, n), dtype=bool)
    good[:, : n // 2] = True
    variants = {"anchor": good.copy(), "empty": np.zeros((T, n), dtype=bool), "all": np.ones((T, n), dtype=bool)}
    variants["anchor"][:, 0] = False
    variants["anchor"][:, n // 2] = True
    variants["empty"][:, 0] = True
    out = {}
    for k, m in variants.items():
        f = d / f"masks_{k}.json"
        f.write_text(json.dumps({"T": T, "n_full": n, "mode": "drop", "sites": {"1": m.astype(int).tolist()}}))
        out[f"masks_{k}"] = str(f)
    return out


@pytest.fixture
def paths(inputs, tmp_path):
    (tmp_path / "a_file.txt").write_text("I am a regular file")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "a_file.txt")
    return {**inputs, "out": str(tmp_path / "out"), "out_json": str(tmp_path / "out" / "m.json"),
            "under_file": str(tmp_path / "a_file.txt" / "out"), "existing_file": str(tmp_path / "a_file.txt"),
            "ro": str(tmp_path / "ro"), "tmp": str(tmp_path), "symlink_onnx": str(tmp_path / "link.onnx"),
            **_mask_files(tmp_path, inputs["stata"])}


# ---------------------------------------------------------------------------------------------------------------
# the catalogue

@dataclass
class Case:
    argv: list[str]
    msg: str  # expected in the one error message (case-insensitive)
    outputs: tuple[str, ...] = ()  # must not exist / hold no files afterwards
    sim: str | None = None  # "disk_full" or "read_only"
    setup: str | None = None  # "mkdir_ro": create the {ro} folder first


T = ["train", "--quiet"]
TINY = ["--dataset", "{tiny}", "--epochs", "1", "--batch-size", "16", "--threads", "1"]


def _writes(argv: list[str], msg: str, out: str = "{out}", file: str = "") -> Case:
    """``argv --out out[/file]``: a command that would write to ``out``, failing with ``msg`` before it does."""
    return Case([*argv, "--out", f"{out}/{file}" if file else out], msg, (out,))


def _train(args: list[str], msg: str) -> Case:
    return _writes(T + args, msg)


def _train_data(key: str, msg: str) -> Case:
    """``train --dataset {key}`` (a bad data file of ``inputs``) fails with msg before writing."""
    return _train(["--dataset", "{" + key + "}"], msg)

CASES: dict[str, dict[str, Case]] = {
    "train": {
        "unknown dataset": _train(["--dataset", "mnist9"], "unknown dataset"),
        "missing npz": _train_data("missing_npz", "not found"),
        "text file as npz": _train_data("not_npz", "cannot read"),
        "pickled npz refused": _train_data("pickled_npz", "cannot read"),
        "npz missing arrays": _train_data("missing_key", "must hold arrays"),
        "missing idx folder": _train_data("missing_idx", "not found"),
        "empty image folder": _train_data("empty_image_folder", "must contain"),
        "empty train split": _train_data("empty_train", "train split is empty"),
        "empty test split": _train_data("empty_test", "test split is empty"),
        "NaN in images": _train_data("nan_data", "NaN"),
        "images/labels count": _train_data("len_mismatch", "labels"),
        "non-square images": _train_data("not_square", "square"),
        "unknown preset": _train(["--model", "spikformer-huge"], "spikformer-huge"),
        "unknown attention": _train(["--attention", "softmax"], "softmax"),
        "unknown prune method": _train(["--prune", "magic"], "magic"),
        "keep 0": _train(["--keep", "0"], "(0, 1]"),
        "keep > 1": _train(["--keep", "1.5"], "(0, 1]"),
        "keep NaN": _train(["--keep", "nan"], "(0, 1]"),
        "keep not a number": _train(["--keep", "half"], "not a valid float"),
        "epochs 0": _train(["--epochs", "0"], "--epochs"),
        "batch size 0": _train(["--batch-size", "0"], "--batch-size"),
        "negative lr": _train(["--lr", "-0.1"], "learning rate"),
        "NaN lr": _train(["--lr", "nan"], "learning rate"),
        "huge lr": _train(["--lr", "1e38"], "learning rate"),
        "T 0": _train(["--T", "0"], "--T"),
        "T too large": _train(["--T", "500"], "--T"),
        "site past last block": _train(TINY + ["--prune", "stata", "--keep", "0.5", "--sites", "9"], "pruning site 9"),
        "sites not integers": _train(["--sites", "a,b"], "block indices"),
        "unknown alignment": _train(TINY + ["--prune", "stata", "--keep", "0.5", "--align", "extra"],
                                    "unknown alignment"),
        "train limit 0": _train(["--train-limit", "0"], "--train-limit"),
        "negative checkpoint interval": _train(["--checkpoint-every", "-1"], "--checkpoint-every"),
        "nproc 0": _train(["--nproc", "0"], "--nproc"),
        "cuda without a GPU": _train(["--device", "cuda"], "no CUDA device"),
        "threads 0": _train(["--threads", "0"], "--threads"),
        "missing --out": Case(T, "--out", ()),
        "out is a file": Case(T + TINY + ["--out", "{existing_file}"], "is a file", ()),
        "resume without a run": _train(TINY + ["--resume"], "run folder not found"),
        "resume without checkpoints": Case(T + TINY + ["--resume", "--out", "{empty_dir}"], "no training checkpoint",
                                           ()),
    },
    "eval": {
        "missing run": Case(["eval", "{missing}"], "not found"),
        "a file, not a run": Case(["eval", "{a_file}"], "not a stata-deploy run folder"),
        "empty folder": Case(["eval", "{empty_dir}"], "config.json is missing"),
        "config not JSON": Case(["eval", "{bad_json}"], "not valid JSON"),
        "config not an object": Case(["eval", "{json_list}"], "JSON object"),
        "foreign config format": Case(["eval", "{wrong_format}"], "not a stata-deploy config"),
        "config field out of range": Case(["eval", "{bad_field}"], "heads must be a positive integer"),
        "weights missing": Case(["eval", "{no_weights}"], "not found"),
        "weights garbage": Case(["eval", "{garbage}"], "not a valid safetensors"),
        "weights truncated": Case(["eval", "{truncated}"], "not a valid safetensors"),
        "weights are a pickle": Case(["eval", "{pickle_weights}"], "refusing"),
        "NaN in weights": Case(["eval", "{nan_weights}"], "NaN"),
        "weights/config shapes": Case(["eval", "{shape_mismatch}"], "do not match"),
        "weights replaced (sha256)": Case(["eval", "{replaced_weights}"], "sha256"),
        "unknown dataset": Case(["eval", "{base}", "--dataset", "cifar99"], "unknown dataset"),
        "image shape mismatch": Case(["eval", "{base}", "--dataset", "{big_images}"], "the model expects"),
        "more classes than the model": Case(["eval", "{base}", "--dataset", "{many_classes}"], "classes"),
        "NaN in test images": Case(["eval", "{base}", "--dataset", "{nan_data}"], "NaN"),
        "empty test split": Case(["eval", "{base}", "--dataset", "{empty_test}"], "empty"),
        "limit 0": Case(["eval", "{base}", "--limit", "0"], "--limit"),
        "masks missing": Case(["eval", "{stata}", "--masks", "{missing_masks}"], "mask file not found"),
        "masks not JSON": Case(["eval", "{stata}", "--masks", "{bad_masks}"], "not valid JSON"),
        "masks for another model": Case(["eval", "{stata}", "--masks", "{wrong_masks}"], "mask"),
    },
    "prune": {
        "missing run": _writes(["prune", "{missing}", "--keep", "0.5"], "not found"),
        "corrupted weights": _writes(["prune", "{garbage}", "--keep", "0.5"], "not a valid safetensors"),
        "NaN in weights": _writes(["prune", "{nan_weights}", "--keep", "0.5"], "NaN"),
        "keep missing": _writes(["prune", "{base}"], "--keep"),
        "keep 0": _writes(["prune", "{base}", "--keep", "0"], "(0, 1]"),
        "keep > 1": _writes(["prune", "{base}", "--keep", "3"], "(0, 1]"),
        "start 0": _writes(["prune", "{base}", "--keep", "0.5", "--start", "0"], "--start"),
        "start past last block": _writes(["prune", "{base}", "--keep", "0.5", "--start", "5"], "past the last block"),
        "unknown method": _writes(["prune", "{base}", "--method", "magic", "--keep", "0.5"], "magic"),
        "already pruned": _writes(["prune", "{stata}", "--keep", "0.5"], "already pruned"),
        "image shape mismatch": _writes(["prune", "{base}", "--keep", "0.5", "--dataset", "{big_images}"],
                                        "the model expects"),
        "limit 0": _writes(["prune", "{base}", "--keep", "0.5", "--limit", "0"], "--limit"),
    },
    "calibrate": {
        "missing run": _writes(["calibrate", "{missing}"], "not found", "{out_json}"),
        "weights truncated": _writes(["calibrate", "{truncated}"], "not a valid safetensors", "{out_json}"),
        "NaN in weights": _writes(["calibrate", "{nan_weights}"], "NaN", "{out_json}"),
        "unpruned model": _writes(["calibrate", "{base}", "--samples", "8"], "nothing to calibrate", "{out_json}"),
        "samples 0": _writes(["calibrate", "{stata}", "--samples", "0"], "--samples", "{out_json}"),
        "image shape mismatch": _writes(["calibrate", "{stata}", "--dataset", "{big_images}"],
                                        "the model expects", "{out_json}"),
        "NaN in calibration data": _writes(["calibrate", "{stata}", "--dataset", "{nan_data}"], "NaN", "{out_json}"),
        "out is a folder": Case(["calibrate", "{stata}", "--samples", "8", "--out", "{tmp}"], "directory", ()),
    },
    "presets": {
        "unknown option": Case(["presets", "--fast"], "no such option"),
        "unexpected argument": Case(["presets", "spikformer-tiny"], "unexpected extra argument"),
    },
}

CASES.update({
    "export": {
        "missing run": _writes(["export", "{missing}", "--to", "onnx"], "not found", file="m.onnx"),
        "unknown exporter": _writes(["export", "{base}", "--to", "tflite"], "tflite", file="m.x"),
        "weights garbage": _writes(["export", "{garbage}", "--to", "onnx"], "not a valid safetensors", file="m.onnx"),
        "weights are a pickle": _writes(["export", "{pickle_weights}", "--to", "onnx"], "refusing", file="m.onnx"),
        "NaN in weights": _writes(["export", "{nan_weights}", "--to", "onnx"], "NaN", file="m.onnx"),
        "weights/config shapes": _writes(["export", "{shape_mismatch}", "--to", "nir"], "do not match", file="m.nir"),
        "masks missing": _writes(["export", "{stata}", "--to", "onnx", "--masks", "{missing_masks}"],
                                 "not found", file="m.onnx"),
        "masks not JSON": _writes(["export", "{stata}", "--to", "onnx", "--masks", "{bad_masks}"],
                                  "not valid JSON", file="m.onnx"),
        "masks for another model": _writes(["export", "{stata}", "--to", "onnx", "--masks", "{wrong_masks}"],
                                           "mask", file="m.onnx"),
        "dynamic masks, unpruned": _writes(["export", "{base}", "--to", "onnx", "--masks", "dynamic"],
                                           "nothing dynamic", file="m.onnx"),
        "out is a folder": Case(["export", "{base}", "--to", "onnx", "--out", "{tmp}"], "directory", ()),
    },
    "run": {
        "missing file": Case(["run", "{tmp}/nope.onnx"], "not found"),
        "unknown runtime": Case(["run", "{onnx}", "--runtime", "tensorrt"], "tensorrt"),
        "unknown suffix": Case(["run", "{txt_model}"], "runtime"),
        "garbage onnx": Case(["run", "{garbage_onnx}", "--limit", "4"], "onnx"),
        "truncated onnx": Case(["run", "{trunc_onnx}", "--limit", "4"], "onnx"),
        "limit 0": Case(["run", "{onnx}", "--limit", "0"], "--limit"),
        "batch size 0": Case(["run", "{onnx}", "--batch-size", "0"], "--batch-size"),
        "timeout 0": Case(["run", "{onnx}", "--timeout", "0"], "--timeout"),
        "unknown dataset": Case(["run", "{onnx}", "--dataset", "cifar99", "--limit", "4"], "unknown dataset"),
        "dataset image shape": Case(["run", "{onnx}", "--dataset", "{big_images}", "--limit", "4"], "expects"),
        "image missing": Case(["run", "{onnx}", "--image", "{img_missing}"], "not found"),
        "image not an image": Case(["run", "{onnx}", "--image", "{img_text}"], "cannot read image"),
        "image wrong shape": Case(["run", "{onnx}", "--image", "{img_big}"], "the model expects"),
        "NaN in image": Case(["run", "{onnx}", "--image", "{img_nan}", "--repeat", "1"], "NaN"),
    },
    "energy": {
        "missing run": Case(["energy", "{missing}"], "not found"),
        "unknown hardware": Case(["energy", "{base}", "--hardware", "loihi9", "--limit", "4"], "loihi9"),
        "missing baseline": Case(["energy", "{stata}", "--baseline", "{missing}", "--limit", "4"], "not found"),
        "corrupted baseline": Case(["energy", "{stata}", "--baseline", "{truncated}", "--limit", "4"],
                                   "not a valid safetensors"),
        "NaN in weights": Case(["energy", "{nan_weights}", "--limit", "4"], "NaN"),
        "limit 0": Case(["energy", "{base}", "--limit", "0"], "--limit"),
        "static masks missing": Case(["energy", "{stata}", "--masks", "static", "--limit", "4"], "calibrate"),
        "dataset image shape": Case(["energy", "{base}", "--dataset", "{big_images}", "--limit", "4"], "expects"),
        "NaN in data": Case(["energy", "{base}", "--dataset", "{nan_data}", "--limit", "4"], "NaN"),
    },
    "inspect": {
        "missing file": Case(["inspect", "{tmp}/nope.nir"], "not found"),
        "not a .nir file": Case(["inspect", "{txt_model}"], ".nir"),
        "garbage .nir": Case(["inspect", "{garbage_nir}"], "nir"),
        "empty .nir": Case(["inspect", "{empty_nir}"], "nir"),
        "a folder": Case(["inspect", "{dir_nir}"], "directory"),
    },
})
# --- issue 12 item 6/7: user data and config checks
CASES["train"].update({
    "label 1e7": _train_data("label_huge", "label 10000000 is too large"),
    "label -1": _train_data("label_negative", "label -1 is negative"),
    "float labels": _train_data("label_float", "is not an integer"),
    "text labels": _train_data("label_text", "integer class indices"),
    "one-hot labels": _train_data("label_onehot", "one-hot"),
    "npz header claims a giant array": _train_data("giant_npz", "too large"),
})
CASES["eval"].update({
    "config T true": Case(["eval", "{cfg_T_true}"], "T must be a positive integer"),
    "config attn_scale text": Case(["eval", "{cfg_scale_text}"], "attn_scale must be a number"),
    "config depth 1000000 (before building)": Case(["eval", "{cfg_depth_huge}"], "depth must be a positive integer"),
    "config depth vs weights header": Case(["eval", "{cfg_depth_40}"], "holds 2 blocks"),
    "label -1 in test data": Case(["eval", "{base}", "--dataset", "{label_negative}"], "negative"),
})
CASES["export"].update({
    "config depth 1000000": _writes(["export", "{cfg_depth_huge}", "--to", "onnx"],
                                    "depth must be a positive integer", file="m.onnx"),
})
CASES["energy"].update({
    "config T true": Case(["energy", "{cfg_T_true}", "--limit", "4"], "T must be a positive integer"),
})
CASES["run"].update({
    "negative .npy image": Case(["run", "{onnx}", "--image", "{img_negative}"], "negative values"),
    "complex .npy image": Case(["run", "{onnx}", "--image", "{img_complex}"], "complex"),
    "huge .npy (header only)": Case(["run", "{onnx}", "--image", "{img_huge_npy}"], "too large"),
    "400-megapixel PNG": Case(["run", "{onnx}", "--image", "{img_400mp}"], "400.0 megapixels"),
    "(T, C, H, W) with the wrong T": Case(["run", "{onnx}", "--image", "{img_frames3}"], "3 frames"),
    "onnx NaN weights": Case(["run", "{onnx_nan}", "--limit", "4"], "NaN"),
    "onnx description says T=8": Case(["run", "{onnx_T8}", "--limit", "4"], "says T=8"),
    "onnx config T true": Case(["run", "{onnx_T_true}", "--limit", "4"], "T must be a positive integer"),
    "nir NaN weights": Case(["run", "{nir_nan}", "--limit", "4"], "NaN"),
    "nir dt 0": Case(["run", "{nir_dt0}", "--limit", "4"], "dt must be a positive"),
    "nir T 1000000": Case(["run", "{nir_T_huge}", "--limit", "4"], "T must be an integer"),
    "config depth 1000000 (torch runtime)": Case(["run", "{cfg_depth_huge}", "--limit", "4"], "depth must be"),
})
CASES["inspect"].update({
    "nir NaN weights": Case(["inspect", "{nir_nan}"], "NaN"),
    "nir dt 0": Case(["inspect", "{nir_dt0}"], "dt must be a positive"),
})

for _cmd in [c for c in list(CASES) if c not in ("train", "eval", "prune", "calibrate", "presets")]:
    if _cmd not in main.commands:  # a command not (yet) in this checkout
        del CASES[_cmd]

# Commands that write files: a valid command line ({target} = where it writes) -> simulated failures.
WRITERS: dict[str, tuple[list[str], str]] = {
    "train": (T + TINY + ["--train-limit", "16", "--out", "{target}"], "{target}"),
    "prune": (["prune", "{base}", "--keep", "0.5", "--limit", "8", "--out", "{target}"], "{target}"),
    "calibrate": (["calibrate", "{stata}", "--samples", "8", "--out", "{target}/masks.json"], "{target}"),
    "export": (["export", "{base}", "--to", "onnx", "--out", "{target}/m.onnx"], "{target}"),
    "energy": (["energy", "{base}", "--limit", "4", "--plot", "{target}/e.png"], "{target}"),
}
WRITERS = {k: v for k, v in WRITERS.items() if k in CASES}
for _cmd, (_argv, _target) in WRITERS.items():
    CASES[_cmd]["disk full (simulated)"] = Case(_argv, "No space left on device", (_target,), sim="disk_full")
    CASES[_cmd]["read-only output folder (simulated)"] = Case(_argv, "Read-only file system", (_target,),
                                                               sim="read_only")
    CASES[_cmd]["read-only existing folder (simulated)"] = Case(_argv, "Read-only file system", (_target,),
                                                                sim="read_only", setup="mkdir_ro")
    CASES[_cmd]["output under a regular file"] = Case([a.replace("{target}", "{under_file}") for a in _argv],
                                                      "Not a directory", ())

# --- issue 12 items 4, 5, 7, 8: output locations, refused options, masks that break the rules
CASES["train"].update({
    "--out an existing run": Case(T + TINY + ["--out", "{base}"], "already exists"),
    "--out an existing folder with files": Case(T + TINY + ["--out", "{tmp}"], "already exists"),
})
CASES["prune"].update({
    "--out is the source run": Case(["prune", "{base}", "--keep", "0.5", "--out", "{base}"], "source run itself"),
    "--out another run": Case(["prune", "{base}", "--keep", "0.5", "--out", "{stata}"], "already exists"),
})
CASES["calibrate"].update({
    "--out the run's config.json": Case(["calibrate", "{stata}", "--samples", "8", "--out", "{stata}/config.json"],
                                        "run folder's own files"),
    "--out not .json": _writes(["calibrate", "{stata}", "--samples", "8"], "must end in .json", file="m.txt"),
    "--out a device node": Case(["calibrate", "{stata}", "--samples", "8", "--out", "/dev/null"], "must end in"),
})
CASES["eval"].update({
    "masks drop the anchor": Case(["eval", "{stata}", "--masks", "{masks_anchor}"], "anchor"),
    "masks keep no image token": Case(["eval", "{stata}", "--masks", "{masks_empty}"], "no image token"),
    "masks keep everything": Case(["eval", "{stata}", "--masks", "{masks_all}"], "nothing is pruned"),
})
if "export" in CASES:
    CASES["export"].update({
        "--out the run's weights": Case(["export", "{base}", "--to", "onnx", "--out", "{base}/model.safetensors"],
                                        "must end in .onnx"),
        "--out a symlink": Case(["export", "{base}", "--to", "onnx", "--out", "{symlink_onnx}"], "symbolic link"),
        "--split for onnx": _writes(["export", "{base}", "--to", "onnx", "--split"],
                                    "--split does not apply", file="m.onnx"),
        "--part for onnx": _writes(["export", "{base}", "--to", "onnx", "--part", "stem"],
                                   "--part does not apply", file="m.onnx"),
        "netx of a whole transformer": _writes(["export", "{base}", "--to", "netx"],
                                               "netx (lava-dl) holds sequential", file="m.net"),
    })
if "run" in CASES:
    CASES["run"].update({
        "--precision for torch": Case(["run", "{base}", "--runtime", "torch", "--precision", "fixed"],
                                      "does not apply"),
        "--precision for nir": Case(["run", "{onnx}", "--runtime", "nir", "--precision", "float"], "does not apply"),
        "--timeout for onnxruntime": Case(["run", "{onnx}", "--timeout", "5"], "does not apply"),
        "--timeout nan": Case(["run", "{onnx}", "--runtime", "lava", "--timeout", "nan"], "not a finite number"),
        "--timeout inf": Case(["run", "{onnx}", "--runtime", "lava", "--timeout", "inf"], "not a finite number"),
        "unknown option": Case(["run", "{onnx}", "--frobnicate"], "no such option"),
        "--baseline without --hardware": Case(["run", "{onnx}", "--baseline", "{base}"], "needs --hardware"),
        "unknown --hardware": Case(["run", "{onnx}", "--hardware", "z80"], "unknown hardware"),
        "--compare outside a run folder": Case(["run", "{onnx}", "--compare", "torch", "--limit", "2"], "--run RUN"),
    })
if "energy" in CASES:
    CASES["energy"].update({
        "--plot e.xyz": Case(["energy", "{base}", "--limit", "4", "--plot", "{out}/e.xyz"], "must end in .png",
                             ("{out}",)),
    })

CASES["kept"] = {
    "unpruned run": Case(["kept", "{base}", "--plot", "{out}/k.png"], "nothing to draw", ("{out}",)),
    "missing run": Case(["kept", "{missing}", "--plot", "{out}/k.png"], "not found", ("{out}",)),
    "--plot not an image": Case(["kept", "{stata}", "--plot", "{out}/k.txt"], "must end in .png", ("{out}",)),
    "no run": Case(["kept", "--plot", "{out}/k.png"], "Missing argument", ("{out}",)),
    "site not pruned": Case(["kept", "{stata}", "--site", "0", "--plot", "{out}/k.png"], "not a pruning site",
                            ("{out}",)),
}

PARAMS = [pytest.param(cmd, name, case, id=f"{cmd}: {name}") for cmd, cases in CASES.items()
          for name, case in cases.items()]


def _fill(s: str, p: dict) -> str:
    return s.replace("{target}", "{ro}").format(**p)


def _error_lines(output: str) -> list[str]:
    lines = [l.strip() for l in re.split(r"[\r\n]", output)]
    return [l for l in lines if l.lower().startswith("error:") or l.startswith("rank ")]


@pytest.mark.parametrize("cmd,name,case", PARAMS)
def test_bad_input(cmd, name, case, paths, tmp_path, monkeypatch):
    if any("{onnx}" in a or "{trunc_onnx}" in a for a in case.argv) and "onnx" not in paths:
        pytest.skip("no ONNX export available in this checkout to feed `run`")
    argv = [_fill(a, paths) for a in case.argv]
    outputs = [Path(_fill(o, paths)) for o in case.outputs]
    if case.setup == "mkdir_ro":
        Path(paths["ro"]).mkdir()
    sim = contextlib.nullcontext()
    if case.sim == "disk_full":
        sim = disk_full(monkeypatch)
    elif case.sim == "read_only":
        sim = read_only(monkeypatch, Path(paths["ro"]))
    with sim:
        r = CliRunner().invoke(main, argv)
    out = r.output
    assert r.exit_code == 2, f"exit {r.exit_code} (expected 2: bad input) for {argv}:\n{out}"
    assert isinstance(r.exception, SystemExit), f"unexpected {r.exception!r}:\n{out}"
    assert "Traceback" not in out and "internal error" not in out, out
    errors = _error_lines(out)
    assert len(errors) == 1, f"expected one error line, got:\n{out}"
    assert case.msg.lower() in errors[0].lower(), f"{case.msg!r} not in {errors[0]!r}"
    for o in outputs:  # no partial output
        files = [p for p in o.rglob("*") if p.is_file()] if o.is_dir() else ([o] if o.exists() else [])
        assert not files, f"partial output left: {files}"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".write-test")]
    assert not leftovers, leftovers
    for src in ("base", "stata"):  # inputs are never modified
        assert not list(Path(paths[src]).glob(".*.tmp"))


def test_catalogue_covers_every_command():
    """Every registered command has cases here (a new command fails this until someone adds its bad inputs)."""
    missing = sorted(set(main.commands) - set(CASES))
    assert not missing, f"no bad-input cases for: {', '.join(missing)}"
    counts = {c: len(v) for c, v in CASES.items()}
    print("bad inputs per command:", json.dumps(counts))
    assert all(n >= 2 for n in counts.values())
