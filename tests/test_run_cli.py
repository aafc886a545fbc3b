"""`stata-deploy export` / `stata-deploy run`: the machine-readable contract, edge inference on one image, errors."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")

from stata_deploy.train.checkpoint import load_model, save_model  # noqa: E402
from stata_deploy.cli.main import main  # noqa: E402
from stata_deploy.pruning.calibration import calibrate_masks  # noqa: E402
from test_onnx import excite  # noqa: E402


def cli(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r


def last_json(r) -> dict:
    return json.loads(r.output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run_dir(trained_run, digits, tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "stata"
    shutil.copytree(trained_run, run)
    model, meta = load_model(run)
    save_model(run, excite(model, seed=2), {k: v for k, v in meta.items() if k not in ("format", "model", "weights_sha256")})
    calibrate_masks(model, [torch.from_numpy(digits.x_train[:64])]).save(run / "masks.json")
    return run


@pytest.fixture(scope="module")
def onnx_file(run_dir):
    r = cli("export", run_dir, "--to", "onnx", "--json")
    assert r.exit_code == 0, r.output
    res = last_json(r)
    assert res["path"] == str(run_dir / "model.onnx") and res["masks"] == "static"
    return run_dir / "model.onnx"


def test_run_dataset_compare_torch_contract(onnx_file, run_dir):
    r = cli("run", onnx_file, "--runtime", "onnxruntime", "--dataset", "digits", "--limit", 64, "--batch-size", 16,
            "--compare", "torch", "--json")
    assert r.exit_code == 0, r.output
    res = last_json(r)
    for key in ("accuracy", "sops", "samples", "seconds", "spike_mismatches", "spikes_compared", "prediction_agreement",
                "latency_ms_p50", "latency_ms_p99", "throughput"):
        assert key in res, key
    assert res["samples"] == 64 and 0 <= res["accuracy"] <= 1 and res["sops"] > 0
    assert res["spike_mismatches"] == 0 and res["spikes_compared"] > 100_000 and res["prediction_agreement"] == 1.0
    assert res["layers_missing"] == []
    # SOPs from ONNX Runtime's spikes equal the torch runtime's on the same inputs (same static masks)
    t = cli("run", run_dir, "--runtime", "torch", "--dataset", "digits", "--limit", 64, "--batch-size", 16, "--json")
    assert t.exit_code == 0, t.output
    tres = last_json(t)
    assert tres["sops"] == res["sops"] and tres["accuracy"] == res["accuracy"] and tres["masks"] == "static"


def test_run_single_image_png_and_npy(onnx_file, digits, tmp_path):
    from PIL import Image

    img = (digits.x_test[0, 0] * 255).astype(np.uint8)
    png = tmp_path / "x.png"
    Image.fromarray(img, mode="L").save(png)
    npy = tmp_path / "x.npy"
    np.save(npy, digits.x_test[0])
    preds = []
    for f in (png, npy):
        r = cli("run", onnx_file, "--image", f, "--repeat", 3, "--compare", "torch", "--json")
        assert r.exit_code == 0, r.output
        res = last_json(r)
        assert len(res["top5"]) == 5 and res["prediction"] == res["top5"][0]["class"]
        assert abs(sum(t["prob"] for t in res["top5"]) - 1) < 0.5 and res["latency_ms_p50"] > 0
        assert res["samples"] == 1 and res["spike_mismatches"] == 0 and res["prediction_agreement"] == 1.0
        preds.append(res["prediction"])
    assert preds[0] == preds[1]  # png stores the same 8-bit values as digits' x16 grey levels
    r = cli("run", onnx_file, "--image", f, "--repeat", 1)
    assert r.exit_code == 0 and "prediction" in r.output


def test_bad_inputs_one_line_exit_2(onnx_file, run_dir, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(big)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), mode="RGB").save(rgb)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf" * 5)
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(foreign), dynamo=False)
    bad_masks = tmp_path / "masks.json"
    bad_masks.write_text(json.dumps({"n_full": 17, "T": 4, "mode": "drop", "sites": {"1": [[1] * 9 + [0] * 8] * 4}}))
    out = tmp_path / "never.onnx"
    cases = [
        (["run", onnx_file, "--image", big], "expects (1, 8, 8)"),
        (["run", onnx_file, "--image", rgb], "expects (1, 8, 8)"),
        (["run", junk, "--runtime", "onnxruntime"], "not an ONNX file"),
        (["run", foreign, "--runtime", "onnxruntime"], "not made by stata-deploy"),
        (["run", tmp_path / "missing.onnx"], "not found"),
        (["export", run_dir, "--to", "onnx", "--masks", bad_masks, "--out", out], "does not match the model"),
        (["export", run_dir, "--to", "nosuch", "--out", out], "unknown exporter"),
        (["run", onnx_file, "--runtime", "nosuch"], "unknown runtime"),
    ]
    for args, msg in cases:
        r = cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output, (args, r.output)
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]


@pytest.mark.parametrize("runtime", ["nir", "lava"])
def test_run_nir_file_compare_torch(run_dir, runtime):
    """The demo's path: export --to nir, then run the .nir file on our reader and on Lava, --compare torch."""
    if runtime == "lava":
        pytest.importorskip("lava", reason="Lava is not installed (bash scripts/install_lava.sh .venv)")
    nir_file = run_dir / "model.nir"
    if not nir_file.exists():
        r = cli("export", run_dir, "--to", "nir", "--json")
        assert r.exit_code == 0, r.output
    r = cli("run", nir_file, "--runtime", runtime, "--dataset", "digits", "--limit", 32, "--batch-size", 16,
            "--compare", "torch", "--json")
    assert r.exit_code == 0, r.output
    res = last_json(r)
    assert res["samples"] == 32 and res["sops"] > 0
    assert res["spike_mismatches"] == 0 and res["spikes_compared"] > 100_000 and res["prediction_agreement"] == 1.0
    t = last_json(cli("run", run_dir, "--runtime", "torch", "--dataset", "digits", "--limit", 32, "--json"))
    assert res["sops"] == pytest.approx(t["sops"], rel=1e-9) and res["accuracy"] == t["accuracy"]


def test_run_hardware_prices_what_the_runtime_computed(onnx_file, run_dir, base_run):
    """`run --hardware` prices the runtime's own counts; on the same inputs and static masks they equal
    `stata-deploy energy --masks static` (one table, both paths), and --baseline gives the same ratios."""
    common = ["--dataset", "digits", "--limit", 48, "--hardware", "loihi", "--baseline", base_run, "--json"]
    r = cli("run", onnx_file, "--batch-size", 16, *common)
    assert r.exit_code == 0, r.output
    got = last_json(r)
    e = cli("energy", run_dir, "--masks", "static", "--batch-size", 16, *common)
    assert e.exit_code == 0, e.output
    want = last_json(e)
    assert got["hardware"] == want["hardware"] == "loihi" and got["energy_mj"] > 0
    for key in ("energy_mj", "macs", "acs", "attention_ops", "neuron_updates", "spikes", "ops_ratio", "energy_ratio"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    assert [l["name"] for l in got["layers"]] == [l["name"] for l in want["layers"]]
    assert [l["energy_mj"] for l in got["layers"]] == pytest.approx([l["energy_mj"] for l in want["layers"]], rel=1e-12)
    # refused combinations
    r = cli("run", onnx_file, "--limit", 4, "--baseline", base_run)
    assert r.exit_code == 2 and "needs --hardware" in r.output
    r = cli("run", onnx_file, "--limit", 4, "--hardware", "no-such-chip")
    assert r.exit_code == 2 and "unknown hardware" in r.output
