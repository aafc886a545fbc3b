"""Nothing lost when something fails: a real full disk for every writer, runs never overwritten, derived files tied
to their weights, strict JSON from every command.

The full-disk tests mount a real tmpfs (the tests run as root) and fill it to the last byte, then run each writer as
a separate process (a crash inside a C library, e.g. HDF5, would show as a signal exit code instead of killing the
test runner). Skipped, with the reason, where mounting is not permitted.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from stata_deploy.cli.main import main


def cli(*args, env=None, timeout=300):
    """The real command line in its own process: (returncode, stdout, stderr)."""
    r = subprocess.run([sys.executable, "-m", "stata_deploy", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    return r.returncode, r.stdout, r.stderr


def error_lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.startswith("error:")]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def strict_loads(text: str):
    """A JSON parser as strict as JavaScript's JSON.parse: NaN / Infinity are errors."""
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=bad)


# ------------------------------------------------------------------------------------------------ full disk
@pytest.fixture
def full_disk(tmp_path):
    """A real tmpfs filled to the last byte: every write fails with ENOSPC."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the simulated ENOSPC cases of "
                    "tests/test_bad_inputs.py still run")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            for size in (65536, 4096, 1):  # big blocks, then the last bytes
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _only_filler(mnt: Path) -> list[str]:
    return sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*") if p.name != "filler")


def _writers(base: Path, stata: Path, mnt: Path) -> dict[str, list]:
    return {
        "export nir": ["export", base, "--to", "nir", "--out", mnt / "m.nir"],
        "export onnx": ["export", base, "--to", "onnx", "--out", mnt / "m.onnx"],
        "calibrate masks": ["calibrate", stata, "--samples", "8", "--out", mnt / "masks.json"],
        "energy plot": ["energy", base, "--limit", "2", "--plot", mnt / "e.png"],
        "prune checkpoint + metrics": ["prune", base, "--keep", "0.5", "--limit", "4", "--out", mnt / "pruned"],
        "train checkpoint + metrics": ["train", "--quiet", "--dataset", "digits", "--epochs", "1", "--train-limit",
                                       "16", "--batch-size", "16", "--out", mnt / "run"],
    }


@pytest.mark.parametrize("writer", ["export nir", "export onnx", "calibrate masks", "energy plot",
                                    "prune checkpoint + metrics", "train checkpoint + metrics"])
def test_full_disk_is_one_line_exit_2_and_no_partial_file(writer, full_disk, base_run, trained_run):
    argv = _writers(base_run, trained_run, full_disk)[writer]
    rc, out, err = cli(*argv)
    assert rc == 2, f"{writer}: rc {rc}\n{err[-3000:]}"
    errs = error_lines(err)
    assert len(errs) == 1 and "No space left on device" in errs[0], err[-3000:]
    other = [l for l in err.splitlines() if l.strip() and "it/s" not in l and not l.startswith("error:")]
    assert "Traceback" not in err and not other, err[-3000:]  # nothing but the error (and a progress bar's rest)
    assert _only_filler(full_disk) == [], f"{writer} left {_only_filler(full_disk)}"


def test_netx_writer_on_a_full_disk(full_disk):
    import torch

    from stata_deploy.config import make_config
    from stata_deploy.errors import StataError
    from stata_deploy.nn.model import build_model

    from exporters.netx_exporter import NetxExporter

    from stata_deploy.testing import liven_batchnorm

    torch.manual_seed(0)  # a stem that fires (netx refuses a layer whose tiny weights would need a weight exponent)
    model = liven_batchnorm(build_model(make_config("spikformer-tiny", pool_stages=0)).eval(), 0)
    with pytest.raises(StataError, match="No space left on device"):
        NetxExporter().export(model, None, full_disk / "stem.net", part="stem")
    assert _only_filler(full_disk) == []


def test_checkpoint_json_writers_on_a_full_disk(full_disk):
    from stata_deploy.errors import StataError
    from stata_deploy.fileio import atomic_write_json

    with pytest.raises(StataError, match="No space left on device"):
        atomic_write_json(full_disk / "metrics.json", {"x": list(range(10000))})
    assert _only_filler(full_disk) == []


# ------------------------------------------------------------------------------------------ never overwrite
@pytest.fixture
def run_copy(tmp_path, trained_run):
    """A private copy of the STATA run with calibrated masks."""
    r = tmp_path / "run"
    shutil.copytree(trained_run, r)
    res = CliRunner().invoke(main, ["calibrate", str(r), "--samples", "16"])
    assert res.exit_code == 0, res.output
    return r


@pytest.mark.parametrize("argv,words", [
    (["export", "{run}", "--to", "onnx", "--out", "{run}/model.safetensors"], "must end in .onnx"),
    (["export", "{run}", "--to", "nir", "--out", "{run}/config.json"], "must end in .nir"),
    (["calibrate", "{run}", "--samples", "8", "--out", "{run}/config.json"], "own files"),
    (["calibrate", "{run}", "--samples", "8", "--out", "{run}/metrics.json"], "own files"),
    (["train", "--quiet", "--epochs", "1", "--train-limit", "16", "--out", "{run}"], "already exists"),
    (["prune", "{run}", "--keep", "0.5", "--out", "{run}"], "source run itself"),
    (["export", "{run}", "--to", "onnx", "--out", "{link}"], "symbolic link"),
    (["calibrate", "{run}", "--samples", "8", "--out", "{device}"], "not a regular file"),
])
def test_a_good_run_is_never_overwritten(argv, words, run_copy, tmp_path):
    victim = tmp_path / "victim.onnx"
    victim.write_text("a file the symlink points at")
    (tmp_path / "link.onnx").symlink_to(victim)
    dev = tmp_path / "full.json"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 7))  # a /dev/full twin with a .json name
    before = tree_digest(run_copy)
    argv = [a.format(run=run_copy, link=tmp_path / "link.onnx", device=dev) for a in argv]
    rc, out, err = cli(*argv)
    assert rc == 2, (argv, rc, err[-2000:])
    errs = error_lines(err)
    assert len(errs) == 1 and words in errs[0], err
    assert tree_digest(run_copy) == before  # not one byte of the run changed
    assert (tmp_path / "link.onnx").is_symlink() and victim.read_text() == "a file the symlink points at"
    assert stat.S_ISCHR(os.stat(dev).st_mode)


def test_force_replaces_a_run_and_resume_is_still_allowed(tmp_path):
    out = tmp_path / "r"
    base = ["train", "--quiet", "--epochs", "1", "--train-limit", "16", "--batch-size", "16", "--out", str(out)]
    assert CliRunner().invoke(main, base).exit_code == 0
    first = sha(out / "model.safetensors")
    r = CliRunner().invoke(main, base + ["--seed", "1"])
    assert r.exit_code == 2 and "--force" in r.output
    assert sha(out / "model.safetensors") == first
    r = CliRunner().invoke(main, base + ["--seed", "1", "--force"])
    assert r.exit_code == 0, r.output
    assert sha(out / "model.safetensors") != first


def test_masks_of_other_weights_are_refused(run_copy, base_run, tmp_path):
    """Masks carry the sha256 of the weights they were calibrated on; other weights refuse them."""
    import torch

    from stata_deploy.train import checkpoint as ckpt

    masks = json.loads((run_copy / "masks.json").read_text())
    assert masks["meta"]["weights_sha256"] == json.loads((run_copy / "config.json").read_text())["weights_sha256"]
    # retrain-like change: new weights, config.json updated consistently (a new valid run in the same folder)
    model, meta = ckpt.load_model(run_copy)
    with torch.no_grad():
        model.head.bias.add_(0.25)
    ckpt.save_model(run_copy, model, {k: v for k, v in meta.items() if k not in ("format", "model", "weights_sha256")})
    for argv in (["export", run_copy, "--to", "onnx", "--out", tmp_path / "x.onnx"],
                 ["eval", run_copy, "--masks", run_copy / "masks.json"],
                 ["energy", run_copy, "--masks", "static", "--limit", "2"]):
        r = CliRunner().invoke(main, [str(a) for a in argv])
        assert r.exit_code == 2, (argv, r.output)
        assert "calibrated for other weights" in r.output and f"stata-deploy calibrate {run_copy}" in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_an_export_of_other_weights_is_refused_by_compare(run_copy, tmp_path):
    import torch

    from stata_deploy.train import checkpoint as ckpt

    onnx_path = tmp_path / "m.onnx"
    assert CliRunner().invoke(main, ["export", str(run_copy), "--to", "onnx", "--out", str(onnx_path)]).exit_code == 0
    model, meta = ckpt.load_model(run_copy)
    with torch.no_grad():
        model.head.bias.add_(0.25)
    ckpt.save_model(run_copy, model, {k: v for k, v in meta.items() if k not in ("format", "model", "weights_sha256")})
    r = CliRunner().invoke(main, ["run", str(onnx_path), "--limit", "4", "--compare", "torch"])
    assert r.exit_code == 2 and "pass --run RUN" in r.output, r.output  # the file is not in a run folder
    r = CliRunner().invoke(main, ["run", str(onnx_path), "--limit", "4", "--compare", "torch", "--run", str(run_copy)])
    assert r.exit_code == 2 and "exported from other weights" in r.output and "re-export" in r.output, r.output


# --------------------------------------------------------------------------------------------- strict JSON
def test_every_command_prints_strict_json(base_run, run_copy, tmp_path):
    """Every command's --json output parses with a strict parser; non-finite values are null with a reason."""
    from stata_deploy.energy.profiles import OP_KINDS

    zero = tmp_path / "zero.json"
    zero.write_text(json.dumps({"name": "zero", "ops": {k: 0.0 for k in OP_KINDS}}))
    onnx_path, nir_path = tmp_path / "m.onnx", tmp_path / "m.nir"
    commands = {
        "presets": ["presets", "--json"],
        "train": ["train", "--quiet", "--json", "--epochs", "1", "--train-limit", "16", "--out", tmp_path / "t"],
        "eval": ["eval", base_run, "--limit", "8", "--json"],
        "prune": ["prune", base_run, "--keep", "0.5", "--limit", "8", "--out", tmp_path / "p", "--json"],
        "calibrate": ["calibrate", run_copy, "--samples", "8", "--out", tmp_path / "m.json", "--json"],
        "export onnx": ["export", run_copy, "--to", "onnx", "--out", onnx_path, "--json"],
        "export nir": ["export", run_copy, "--to", "nir", "--out", nir_path, "--json"],
        "run onnxruntime": ["run", onnx_path, "--limit", "8", "--compare", "torch", "--run", run_copy, "--json"],
        "run nir": ["run", nir_path, "--runtime", "nir", "--limit", "8", "--json"],
        "run torch": ["run", run_copy, "--runtime", "torch", "--limit", "8", "--json"],
        "inspect": ["inspect", nir_path, "--json"],
        "energy": ["energy", run_copy, "--limit", "4", "--baseline", base_run, "--json"],
        "energy, all-zero profile": ["energy", run_copy, "--limit", "4", "--hardware", zero, "--baseline", base_run,
                                     "--json"],
    }
    for name, argv in commands.items():
        if argv[0] not in main.commands:
            continue
        r = CliRunner().invoke(main, [str(a) for a in argv])
        assert r.exit_code == 0, (name, r.output[-2000:])
        obj = strict_loads(r.stdout.strip().splitlines()[-1])
        assert isinstance(obj, dict), name
        if name == "energy, all-zero profile":
            assert obj["energy_ratio"] is None and "0 mJ" in obj["null_reasons"]["energy_ratio"]
            assert obj["ops_ratio"] is not None and obj["ops_ratio"] > 0  # ops do not depend on the profile


def test_huge_cost_profile_is_refused(base_run, tmp_path):
    from stata_deploy.energy.profiles import OP_KINDS

    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"name": "huge", "ops": {k: 1e300 for k in OP_KINDS}}))
    r = CliRunner().invoke(main, ["energy", str(base_run), "--limit", "2", "--hardware", str(huge), "--json"])
    assert r.exit_code == 2 and "at most 1e+09" in r.output, r.output


def test_strict_json_helper_reports_where_and_why():
    from stata_deploy.fileio import dumps, strict

    reasons: dict = {}
    clean = strict({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": np.float32(2)},
                   reasons)
    assert clean == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": np.float32(2)}
    assert reasons == {"a": "NaN", "b[1]": "Infinity", "c.d": "-Infinity"}
    assert strict_loads(dumps({"x": float("nan"), "y": np.arange(2)})) == {"x": None, "y": [0, 1]}


def test_usage_errors_are_one_error_line_exit_2():
    for argv, words in ((["train", "--keep", "2", "--out", f"/tmp/{uuid.uuid4().hex}"], "Invalid value for '--keep'"),
                        (["nope"], "No such command"), (["train", "--frob"], "No such option"),
                        (["run"], "Missing argument")):
        rc, out, err = cli(*argv, timeout=120)
        assert rc == 2, (argv, rc, err)
        errs = error_lines(err)
        assert len(errs) == 1 and words in errs[0] and "Usage:" not in err, (argv, err)


def test_kept_plot_draws_every_timestep(run_copy, tmp_path):
    """`stata-deploy kept`: a PNG, and per-timestep kept sets that match the model's own kept positions."""
    import torch
    from PIL import Image

    from stata_deploy.train.checkpoint import load_model
    from stata_deploy.cli.kept import ink_in_kept, kept_positions, patch_ink
    from stata_deploy.train.data import load_dataset

    out = tmp_path / "kept.png"
    r = CliRunner().invoke(main, ["kept", str(run_copy), "--images", "2", "--plot", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = strict_loads(r.stdout.strip().splitlines()[-1])
    assert res["rows"] == [f"{run_copy.name} stata (dynamic)", f"{run_copy.name} stata (static)"]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 200
    model, _ = load_model(run_copy)
    x = load_dataset("digits").x_test[:2]
    kept = kept_positions(model, x)
    k = res["runs"][f"{run_copy.name}:dynamic"]
    assert k["kept_per_timestep"] == kept[k["site"]].shape[-1]
    same = all(set(kept[k["site"]][t, 0]) == set(kept[k["site"]][0, 0]) for t in range(model.cfg.T))
    assert k["same_tokens_every_timestep"] == same
    assert torch.as_tensor(kept[k["site"]]).min() >= 0  # anchor excluded: image-token indices
    # the ink share over --measure images (256 default, digits has 360 test images): recomputed here from the
    # model's own kept positions, and the patch share is k / P
    assert k["measured_images"] == 256 and k["kept_patch_share"] == k["kept_per_timestep"] / model.cfg.grid ** 2
    xm = load_dataset("digits").x_test[:256]
    share = ink_in_kept(patch_ink(xm, model.cfg.grid), kept_positions(model, xm)[k["site"]])
    assert k["ink_share_in_kept_per_timestep"] == pytest.approx(share.tolist(), abs=1e-12)
    assert all(0 < v < 1 for v in share) and len(share) == model.cfg.T


def test_ink_share_by_hand():
    """patch_ink / ink_in_kept on a 4x4 image of 2x2 patches: the ink above the darkest pixel, per patch."""
    from stata_deploy.cli.kept import ink_in_kept, patch_ink

    img = np.zeros((1, 1, 4, 4))
    img[0, 0, :2, :2] = 3.0  # patch 0: 12 units of ink
    img[0, 0, 2:, 2:] = 1.0  # patch 3: 4 units
    img -= 5.0  # an offset (a normalised dataset) does not change the ink
    ink = patch_ink(img, 2)
    assert ink.tolist() == [[0.75, 0.0, 0.0, 0.25]]
    kept = np.array([[[0]], [[1]], [[3]]])  # (T=3, B=1, k=1)
    assert ink_in_kept(ink, kept).tolist() == [0.75, 0.0, 0.25]
    assert patch_ink(np.ones((1, 3, 4, 4)), 2).tolist() == [[0.25] * 4]  # a blank image: every patch the same
