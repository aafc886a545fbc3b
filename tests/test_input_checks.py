"""Library-level input checks (issue 12, items 6/7): labels, config bounds and strict types, the safetensors header
checked before a model is built, image bit depths and header-first size checks, (T, C, H, W) inputs, and exported
ONNX / NIR files with broken weights or descriptions. CLI-level cases are in tests/test_bad_inputs.py."""
from __future__ import annotations

import json
import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from stata_deploy.train import checkpoint as ckpt
from stata_deploy.train import data as data_mod
from stata_deploy.config import (INT_LIMITS, MAX_CLASSES, PRESETS, ModelConfig, PruneConfig, estimate_params,
                                 make_config)
from stata_deploy.train.data import MAX_IMAGE_PIXELS, intensities, labels, load_dataset, load_image
from stata_deploy.errors import CheckpointError, ConfigError, DataError, StataError


# ------------------------------------------------------------------------------------------------- helpers
def png_1bit(path: Path, w: int, h: int) -> Path:
    """A black 1-bit greyscale PNG written row by row (a 20000x20000 one is ~50 KB and takes no big buffer)."""
    def chunk(t, b):
        return struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b) & 0xFFFFFFFF)

    row = b"\0" * (1 + (w + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def npy_header_only(path: Path, shape, dtype="<f4") -> Path:
    """A .npy file holding only a header that claims ``shape`` (no data)."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": tuple(shape)})
    return path


def edit_run(src: Path, dst: Path, **model) -> Path:
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c["model"].update(model)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


# ------------------------------------------------------------------------------------------------- labels
def test_labels_accept_integers_and_integral_floats():
    assert labels(np.array([0, 3, 9]), "x").dtype == np.int64
    np.testing.assert_array_equal(labels(np.array([0.0, 2.0, 7.0]), "x"), [0, 2, 7])
    np.testing.assert_array_equal(labels(np.array([[1], [2]]), "x"), [1, 2])  # (n, 1)
    np.testing.assert_array_equal(labels(np.array([True, False]), "x"), [1, 0])
    assert labels(np.array([MAX_CLASSES - 1]), "x")[0] == MAX_CLASSES - 1


@pytest.mark.parametrize("y,words", [
    (np.array([0, 10_000_000]), "label 10000000 is too large"),
    (np.array([0, MAX_CLASSES]), "too large"),
    (np.array([0, -1]), "label -1 is negative"),
    (np.array([0.0, 1.5]), "label 1.5 is not an integer"),
    (np.array([0.0, np.nan]), "is not an integer"),
    (np.array([0.0, np.inf]), "is not an integer"),
    (np.array([1e30]), "too large"),
    (np.array(["a", "b"]), "integer class indices"),
    (np.array([1 + 2j]), "integer class indices"),
    (np.eye(3, dtype=np.int64), "one-hot"),
])
def test_labels_refused(y, words):
    with pytest.raises(DataError, match="train") as e:
        labels(y, "dataset 'npz:f': train")
    assert words in str(e.value)


def _npz(path: Path, digits, **arrays) -> str:
    a = dict(x_train=digits.x_train[:32], y_train=digits.y_train[:32], x_test=digits.x_test[:16],
             y_test=digits.y_test[:16])
    a.update(arrays)
    np.savez(path, **a)
    return f"npz:{path}"


def test_dataset_labels_checked_on_load(tmp_path, digits):
    y = digits.y_train[:32].copy()
    y[3] = 10_000_000
    with pytest.raises(DataError, match="too large"):
        load_dataset(_npz(tmp_path / "a.npz", digits, y_train=y))
    y[3] = -1
    with pytest.raises(DataError, match="negative"):
        load_dataset(_npz(tmp_path / "b.npz", digits, y_test=y[:16]))
    with pytest.raises(DataError, match="not an integer"):
        load_dataset(_npz(tmp_path / "c.npz", digits, y_train=digits.y_train[:32] + 0.25))
    ds = load_dataset(_npz(tmp_path / "d.npz", digits, y_train=digits.y_train[:32].astype(np.float32)))
    assert ds.y_train.dtype == np.int64 and ds.num_classes == 10


def test_npz_shapes_checked_from_member_headers(tmp_path, digits):
    """An .npz whose x_train member claims a giant array is refused from the member's header (no data in it)."""
    p = tmp_path / "giant.npz"
    hdr = npy_header_only(tmp_path / "x.npy", (10**6, 1, 4096, 4096)).read_bytes()
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x_train.npy", hdr)
        for k, v in (("y_train", digits.y_train[:8]), ("x_test", digits.x_test[:8]), ("y_test", digits.y_test[:8])):
            f = tmp_path / f"{k}.npy"
            np.save(f, v)
            z.write(f, f"{k}.npy")
    with pytest.raises(DataError, match="too large"):
        load_dataset(f"npz:{p}")
    np.save(tmp_path / "single.npy", digits.x_train[:4])
    (tmp_path / "single.npz").write_bytes((tmp_path / "single.npy").read_bytes())
    with pytest.raises(DataError, match="single .npy array"):
        load_dataset(f"npz:{tmp_path / 'single.npz'}")


# ------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("field,value,words", [
    ("T", True, "T must be a positive integer"),
    ("T", 65, "T must be a positive integer (at most 64)"),
    ("T", 4.0, "T must be"),
    ("T", "4", "T must be"),
    ("depth", 1_000_000, "depth must be a positive integer (at most 64), got 1000000"),
    ("depth", False, "depth must be"),
    ("dim", 8192, "dim must be"),
    ("heads", 0, "heads must be a positive integer"),
    ("heads", 100, "heads must be"),
    ("mlp_ratio", 1.5, "mlp_ratio must be"),
    ("pool_stages", -1, "pool_stages must be an integer in [0, 4]"),
    ("pool_stages", 5, "pool_stages must be"),
    ("pool_stages", True, "pool_stages must be"),
    ("img_size", 4096, "img_size must be"),
    ("in_channels", 65, "in_channels must be"),
    ("num_classes", 10_000_000, "num_classes must be"),
    ("attn_scale", "big", 'attn_scale must be a number in (0, 100], got "big"'),
    ("attn_scale", True, "attn_scale must be"),
    ("attn_scale", float("nan"), "attn_scale must be"),
    ("attn_scale", float("inf"), "attn_scale must be"),
    ("attn_scale", 0, "attn_scale must be"),
    ("attn_scale", 1e6, "attn_scale must be"),
    ("anchor", 1, "anchor must be true or false"),
    ("attention", 3, "unknown attention"),
    ("name", 5, "name must be a string"),
])
def test_model_config_fields_strict_and_bounded(field, value, words):
    d = make_config("spikformer-tiny").to_dict()
    d[field] = value
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    assert words in str(e.value)


@pytest.mark.parametrize("prune,words", [
    ({"method": "stata", "keep": True}, "keep ratio"),
    ({"method": "stata", "keep": "0.5"}, "keep ratio"),
    ({"method": "stata", "keep": 0.5, "sites": [True]}, "prune sites must be a list of block indices"),
    ({"method": "stata", "keep": 0.5, "sites": "1"}, "prune sites must be"),
    ({"method": "stata", "keep": 0.5, "sites": [1.0]}, "prune sites must be"),
    ({"method": "stata", "keep": 0.5, "align_sites": [7]}, "alignment site 7"),
    ({"method": "stata", "keep": 0.5, "intra_weight": -1}, "prune intra_weight must be a number"),
    ({"method": "stata", "keep": 0.5, "inter_weight": "x"}, "prune inter_weight must be"),
    ({"method": "stata", "keep": 0.5, "align": "intra"}, "prune align must be a list"),
    ({"method": 1}, "unknown pruning method"),
])
def test_prune_config_strict(prune, words):
    d = make_config("spikformer-tiny").to_dict()
    d["prune"] = prune
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(d)
    assert words in str(e.value)


def test_prune_not_an_object_refused():
    d = make_config("spikformer-tiny").to_dict()
    d["prune"] = [1, 2]
    with pytest.raises(ConfigError, match="prune must be a JSON object"):
        ModelConfig.from_dict(d)


def test_size_bounds_name_the_fields():
    with pytest.raises(ConfigError, match="tokens"):
        make_config("spikformer-tiny", img_size=1024, pool_stages=0)
    with pytest.raises(ConfigError, match="model too large: dim 4096, depth 64"):
        make_config("spikformer-tiny", dim=4096, depth=64, heads=64, mlp_ratio=16)


def test_every_preset_is_inside_the_bounds_and_numpy_ints_normalised():
    for name in PRESETS.names():
        make_config(name)
    cfg = ModelConfig(T=np.int64(4), dim=np.int32(32), heads=2, attn_scale=np.float32(0.125)).validate()
    assert type(cfg.T) is int and type(cfg.dim) is int and type(cfg.attn_scale) is float
    json.dumps(cfg.to_dict())
    assert set(INT_LIMITS) >= {"img_size", "in_channels", "num_classes", "T", "dim", "depth", "heads", "mlp_ratio",
                               "pool_stages"}


def test_param_estimate_matches_the_model():
    from stata_deploy.nn.model import build_model, count_params

    for preset, kw in (("spikformer-tiny", {}), ("sdt-tiny", {}), ("a2os2a-tiny", {}), ("spikformer-4-384", {}),
                       ("spikformer-tiny", {"prune": PruneConfig("stata", 0.5)})):
        cfg = make_config(preset, **kw)
        n, est = count_params(build_model(cfg)), estimate_params(cfg)
        assert est == n  # exact: the estimate bounds model size before anything is built


# ------------------------------------------------------------------------------------------------- checkpoint
def test_safetensors_header_reads_names_and_shapes(base_run):
    h = ckpt.safetensors_header(base_run / "model.safetensors")
    sd = ckpt.load_tensors(base_run / "model.safetensors")
    assert {k: v[1] for k, v in h.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_safetensors_header_refuses_forged_or_truncated(tmp_path, base_run):
    data = (base_run / "model.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.safetensors_header(tmp_path / "trunc.safetensors")
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}).encode()
    (tmp_path / "forged.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        ckpt.safetensors_header(tmp_path / "forged.safetensors")
    (tmp_path / "big_n.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(CheckpointError, match="bad header"):
        ckpt.safetensors_header(tmp_path / "big_n.safetensors")
    torch.save({"a": torch.zeros(1)}, tmp_path / "pickle.safetensors")
    with pytest.raises(CheckpointError, match="refusing"):
        ckpt.safetensors_header(tmp_path / "pickle.safetensors")


def test_config_checked_before_any_model_is_built(tmp_path, base_run, monkeypatch):
    """depth 1e6 (past the bound) and depth 40 (inside it, but not what the weights hold) fail before build_model."""
    import stata_deploy.nn.model as model_mod

    def no_build(cfg):
        raise AssertionError(f"build_model called for depth {cfg.depth}")

    huge = edit_run(base_run, tmp_path / "huge", depth=1_000_000)
    forty = edit_run(base_run, tmp_path / "forty", depth=40)
    classes = edit_run(base_run, tmp_path / "classes", num_classes=11)
    booly = edit_run(base_run, tmp_path / "booly", T=True)
    monkeypatch.setattr(model_mod, "build_model", no_build)  # refused before a model is built (no timing needed)
    with pytest.raises(CheckpointError, match="depth must be a positive integer"):
        ckpt.load_model(huge)
    with pytest.raises(CheckpointError, match="it says depth 40, model.safetensors holds 2 blocks"):
        ckpt.load_model(forty)
    with pytest.raises(CheckpointError, match="head.weight has shape"):
        ckpt.load_model(classes)
    with pytest.raises(CheckpointError, match="T must be a positive integer"):
        ckpt.load_model(booly)


def test_header_mismatch_names_the_tensor(tmp_path, base_run):
    r = shutil.copytree(base_run, tmp_path / "r")
    sd = ckpt.load_tensors(r / "model.safetensors")
    sd["blocks.0.mlp.fc1.linear.weight"] = torch.zeros(3, 3)
    ckpt.save_tensors(r / "model.safetensors", sd)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.linear\.weight has shape \(3, 3\)"):
        ckpt.load_model(r)
    sd = ckpt.load_tensors(base_run / "model.safetensors")
    sd["head.bias"] = sd["head.bias"].to(torch.int32)
    ckpt.save_tensors(r / "model.safetensors", sd)
    with pytest.raises(CheckpointError, match="head.bias is stored as I32"):
        ckpt.load_model(r)


def test_config_json_side_fields_checked(tmp_path, base_run):
    r = shutil.copytree(base_run, tmp_path / "r")
    c = json.loads((r / "config.json").read_text())
    c["train"] = None
    (r / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="'train' must be a JSON object"):
        ckpt.load_config(r)


# ------------------------------------------------------------------------------------------------- images
def test_array_intensities_by_dtype_and_range():
    np.testing.assert_allclose(intensities(np.array([0, 255], np.uint8), "x"), [0, 1])
    np.testing.assert_allclose(intensities(np.array([0, 65535, 32768], np.uint16), "x"), [0, 1, 32768 / 65535])
    np.testing.assert_array_equal(intensities(np.array([True, False]), "x"), [1, 0])
    np.testing.assert_array_equal(intensities(np.array([0.0, 0.5, 1.0]), "x"), [0, 0.5, 1])
    np.testing.assert_allclose(intensities(np.array([0.0, 51.0, 255.0]), "x"), [0, 0.2, 1])  # 8-bit values
    assert intensities(np.array([0, 1], np.int64), "x").tolist() == [0, 1]
    for bad, words in ((np.array([-0.1, 0.5]), "negative"), (np.array([0.0, 300.0]), "values up to 300"),
                       (np.array([1 + 1j]), "complex"), (np.array([np.nan]), "NaN"),
                       (np.array(["a"]), "not numbers")):
        with pytest.raises(DataError, match=words):
            intensities(bad, "x")


def test_png_bit_depths(tmp_path):
    from PIL import Image

    v16 = np.array([[0, 1000, 32768, 65535]], np.uint16)
    Image.fromarray(v16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    np.testing.assert_allclose(load_image(tmp_path / "g16.png")[0], v16 / 65535, rtol=1e-6)
    b = np.array([[True, False, True, True]] * 4)
    Image.fromarray(b).save(tmp_path / "b1.png")
    assert Image.open(tmp_path / "b1.png").mode == "1"
    np.testing.assert_array_equal(load_image(tmp_path / "b1.png")[0], b.astype(np.float32))  # {0, 1}, not 1/255
    v8 = np.array([[0, 51, 255]], np.uint8)
    Image.fromarray(v8, mode="L").save(tmp_path / "g8.png")
    np.testing.assert_allclose(load_image(tmp_path / "g8.png")[0], v8 / 255)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 10
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    x = load_image(tmp_path / "rgba.png")
    assert x.shape == (3, 2, 2) and x[0].min() == 1 and x[1:].max() == 0  # alpha dropped
    Image.fromarray(v8, mode="L").convert("P").save(tmp_path / "pal.png")
    np.testing.assert_allclose(load_image(tmp_path / "pal.png"), (v8 / 255)[None])  # grey palette: 1 channel
    Image.new("CMYK", (4, 4)).save(tmp_path / "cmyk.jpg")
    with pytest.raises(DataError, match="cannot interpret"):
        load_image(tmp_path / "cmyk.jpg")
    i32 = Image.fromarray(np.array([[0, 70000]], np.int32), mode="I")
    with pytest.raises(DataError, match="outside 16-bit"):
        data_mod._decode(i32, tmp_path / "i.png")
    ok = Image.fromarray(np.array([[0, 65535]], np.int32), mode="I")
    np.testing.assert_allclose(data_mod._decode(ok, tmp_path / "i.png"), [[[0, 1]]])


def test_bit_depth_scaling_keeps_predictions(tmp_path, base_run, digits):
    """The same digit as 8-bit, 16-bit and (binarised) 1-bit / 8-bit PNGs: the loaded values agree, so do the
    predictions of the trained model (16-bit used to reach 240.9, 1-bit 0.0039)."""
    from PIL import Image

    from runtimes.torch_runtime import TorchRuntime

    img = digits.x_test[0, 0]
    Image.fromarray(np.round(img * 255).astype(np.uint8), mode="L").save(tmp_path / "d8.png")
    Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(tmp_path / "d16.png")
    Image.fromarray(img > 0.5).save(tmp_path / "d1.png")
    Image.fromarray(np.where(img > 0.5, 255, 0).astype(np.uint8), mode="L").save(tmp_path / "d1as8.png")
    x8, x16 = load_image(tmp_path / "d8.png"), load_image(tmp_path / "d16.png")
    x1, x1as8 = load_image(tmp_path / "d1.png"), load_image(tmp_path / "d1as8.png")
    assert x16.max() <= 1 and np.abs(x16 - x8).max() <= 1 / 255
    np.testing.assert_array_equal(x1, x1as8)
    rt = TorchRuntime(base_run)
    pred = lambda x: int(rt.run(x[None], record=False).predictions[0])  # noqa: E731
    assert pred(x16) == pred(x8) == pred(digits.x_test[0])
    assert pred(x1) == pred(x1as8)


def test_huge_png_refused_from_its_header(tmp_path, monkeypatch):
    from PIL import Image

    p = png_1bit(tmp_path / "huge.png", 20000, 20000)
    mid = png_1bit(tmp_path / "mid.png", 5000, 5000)  # above our limit, below Pillow's bomb warning

    def no_decode(self, *a, **k):
        raise AssertionError("the pixels were decoded: the size must be refused from the header")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    assert p.stat().st_size < 200_000
    with pytest.raises(DataError, match=r"too large \(400\.0 megapixels"):
        load_image(p)
    with pytest.raises(DataError, match="5000x5000"):
        load_image(mid)
    assert 5000 * 5000 > MAX_IMAGE_PIXELS


def test_npy_images_checked_from_the_header(tmp_path, monkeypatch):
    p = npy_header_only(tmp_path / "huge.npy", (100_000, 100_000))
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load called on a too-large array"))
    with pytest.raises(DataError, match="too large for one input"):
        load_image(p)
    with pytest.raises(DataError, match="Python objects"):
        load_image(npy_header_only(tmp_path / "obj.npy", (2, 2), "|O"))
    monkeypatch.setattr(np, "load", real_load)
    np.save(tmp_path / "neg.npy", -np.ones((8, 8), np.float32))
    with pytest.raises(DataError, match="negative"):
        load_image(tmp_path / "neg.npy")
    np.save(tmp_path / "c.npy", np.ones((8, 8), np.complex64))
    with pytest.raises(DataError, match="complex"):
        load_image(tmp_path / "c.npy")
    np.save(tmp_path / "big.npy", np.full((8, 8), 1000.0))
    with pytest.raises(DataError, match="values up to 1000"):
        load_image(tmp_path / "big.npy")
    np.save(tmp_path / "u16.npy", np.full((8, 8), 65535, np.uint16))
    assert load_image(tmp_path / "u16.npy").max() == 1.0
    np.save(tmp_path / "f4.npy", np.zeros((4, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"\(H, W\) or \(C, H, W\)"):
        load_image(tmp_path / "f4.npy")
    assert load_image(tmp_path / "f4.npy", frames=True).shape == (4, 1, 8, 8)
    np.save(tmp_path / "f100.npy", np.zeros((100, 1, 8, 8), np.float32))
    with pytest.raises(DataError, match="100 frames"):
        load_image(tmp_path / "f100.npy", frames=True)


def test_tchw_input_used_as_frames(tmp_path, base_run, digits):
    """A (T, C, H, W) .npy given to `run --image` is fed as T frames (not repeated); another T is refused."""
    from runtimes.torch_runtime import TorchRuntime
    from stata_deploy.cli.run import _run_image

    rt = TorchRuntime(base_run)
    frames = digits.x_test[:4]  # 4 different digits as the 4 timesteps, (4, 1, 8, 8)
    np.save(tmp_path / "f.npy", frames)
    seen = []
    real = rt.run
    rt.run = lambda x, record=True: (seen.append(np.asarray(x).shape), real(x, record))[1]
    out = _run_image(rt, tmp_path / "f.npy", 1, None, None)
    assert seen[0] == (4, 1, 1, 8, 8)
    ref = real(frames[:, None])
    assert out["prediction"] == int(ref.predictions[0])
    np.save(tmp_path / "f3.npy", frames[:3])
    with pytest.raises(StataError, match="3 frames"):
        _run_image(rt, tmp_path / "f3.npy", 1, None, None)


# ------------------------------------------------------------------------------------------------- exported files
@pytest.fixture(scope="module")
def exported(base_run, tmp_path_factory):
    from stata_deploy.cli.main import main

    d = tmp_path_factory.mktemp("exp")
    out = {}
    for to in ("onnx", "nir"):
        r = CliRunner().invoke(main, ["export", str(base_run), "--to", to, "--out", str(d / f"m.{to}")])
        if r.exit_code == 0:
            out[to] = d / f"m.{to}"
    return out


def _onnx_variant(src: Path, dst: Path, desc_fn=None, init_fn=None) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    p = onnx.load(str(src))
    if desc_fn:
        d = json.loads(p.metadata_props[0].value)
        desc_fn(d)
        p.metadata_props[0].value = json.dumps(d)
    if init_fn:
        t = p.graph.initializer[0]
        a = numpy_helper.to_array(t).copy()
        init_fn(a)
        t.CopyFrom(numpy_helper.from_array(a, t.name))
    onnx.save(p, str(dst))
    return dst


def test_onnx_nan_weights_and_inconsistent_description(exported, tmp_path):
    if "onnx" not in exported:
        pytest.skip("no ONNX export in this checkout")
    pytest.importorskip("onnxruntime")
    from runtimes.onnxruntime_runtime import OnnxRuntime

    OnnxRuntime(exported["onnx"]).close()
    nan = _onnx_variant(exported["onnx"], tmp_path / "nan.onnx", init_fn=lambda a: a.flat.__setitem__(0, np.nan))
    with pytest.raises(StataError, match="initializer '.*' contains NaN or infinite"):
        OnnxRuntime(nan)
    inf = _onnx_variant(exported["onnx"], tmp_path / "inf.onnx", init_fn=lambda a: a.flat.__setitem__(0, np.inf))
    with pytest.raises(StataError, match="NaN or infinite"):
        OnnxRuntime(inf)
    t8 = _onnx_variant(exported["onnx"], tmp_path / "t8.onnx",
                       desc_fn=lambda d: (d.update(T=8), d["config"].update(T=8)))
    with pytest.raises(StataError, match="says T=8.*input 'x' has shape \\(4, batch, 1, 8, 8\\)"):
        OnnxRuntime(t8)
    top = _onnx_variant(exported["onnx"], tmp_path / "top.onnx", desc_fn=lambda d: d.update(T=8))
    with pytest.raises(StataError, match="says T=8 but its model config says T=4"):
        OnnxRuntime(top)
    tb = _onnx_variant(exported["onnx"], tmp_path / "tb.onnx", desc_fn=lambda d: d["config"].update(T=True))
    with pytest.raises(StataError, match="invalid model config.*T must be a positive integer"):
        OnnxRuntime(tb)
    big = _onnx_variant(exported["onnx"], tmp_path / "big.onnx", desc_fn=lambda d: d["config"].update(depth=10**6))
    with pytest.raises(StataError, match="depth must be"):
        OnnxRuntime(big)


def _nir_variant(src: Path, dst: Path, desc=None, node_fn=None) -> Path:
    nir = pytest.importorskip("nir")
    g = nir.read(str(src))
    if desc:
        d = json.loads(g.metadata["stata_deploy"])
        d.update(desc)
        g.metadata["stata_deploy"] = json.dumps(d)
    if node_fn:
        node_fn(g)
    nir.write(str(dst), g)
    return dst


def _poison(attr, value):
    def fn(g):
        for name, n in g.nodes.items():
            if hasattr(n, attr):
                a = np.array(getattr(n, attr), dtype=np.float64)
                a.flat[0] = value
                setattr(n, attr, a)
                return
    return fn


@pytest.mark.parametrize("desc,node_fn,words", [
    (None, _poison("weight", np.nan), "parameter 'weight' contains NaN or infinite"),
    (None, _poison("bias", np.inf), "NaN or infinite"),
    (None, _poison("v_threshold", np.nan), "parameter 'v_threshold'"),
    (None, _poison("tau", -1.0), "tau must be positive"),
    ({"dt": 0}, None, "dt must be a positive finite number, got 0"),
    ({"dt": -1e-4}, None, "dt must be a positive"),
    ({"dt": float("inf")}, None, "dt must be a positive"),
    ({"dt": True}, None, "dt must be a positive"),
    ({"T": 1_000_000}, None, "T must be an integer in [1, 64]"),
    ({"T": True}, None, "T must be an integer"),
    ({"T": 8}, None, "says T=8 but its model config says T=4"),
    ({"config": {"T": True}}, None, "invalid model config"),
    ({"sites": {"1": "nope"}}, None, "token segment 'nope'"),
])
def test_nir_bad_parameters_and_description(exported, tmp_path, desc, node_fn, words):
    if "nir" not in exported:
        pytest.skip("no NIR export in this checkout")
    from runtimes.nir_graph import NirFormatError, read_graph

    read_graph(exported["nir"])
    bad = _nir_variant(exported["nir"], tmp_path / "bad.nir", desc, node_fn)
    with pytest.raises(NirFormatError) as e:
        read_graph(bad)
    assert words in str(e.value) and str(bad) in str(e.value)
