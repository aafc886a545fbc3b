"""ONNX export + ONNX Runtime adapter: parity with the torch reference spike for spike, file format, bad inputs."""
import json
import shutil

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from exporters.onnx_exporter import MASK_PREFIX, META_KEY, OnnxExporter  # noqa: E402
from runtimes.onnxruntime_runtime import OnnxRuntime  # noqa: E402
from stata_deploy.train.checkpoint import load_model, save_model  # noqa: E402
from stata_deploy.config import PruneConfig, make_config  # noqa: E402
from stata_deploy.errors import StataError  # noqa: E402
from stata_deploy.inference import run_torch  # noqa: E402
from stata_deploy.nn.model import build_model, with_prune  # noqa: E402
from stata_deploy.pruning.masks import TokenMasks
from stata_deploy.pruning.calibration import calibrate_masks
from stata_deploy.pruning.scorers import num_keep


def spike_mismatches(a, b) -> tuple[int, int, dict]:
    """(mismatching elements, compared elements, per-layer mismatches) between two RunResults' spikes."""
    assert set(a.spikes) == set(b.spikes)
    bad, total, per = 0, 0, {}
    for name, s in a.spikes.items():
        r = b.spikes[name]
        assert s.shape == r.shape, name
        if np.isin(r, (-1.0, 0.0, 1.0)).all():  # spikes: exactly equal
            n = int((s != r).sum())
        else:  # a real-valued 'neuron' (A2OS2A's ReLU K): float rounding of Linear+BN differs, zeros must agree
            n = int((~np.isclose(s, r, rtol=1e-5, atol=1e-6) | ((s == 0) != (r == 0))).sum())
        bad, total, per[name] = bad + n, total + s.size, n
    return bad, total, per


def spiking_layers(res) -> int:
    return sum(int(v.any()) for v in res.spikes.values())


def excite(model, seed=0):
    """Random BN statistics and gains large enough that every layer of an untrained model spikes."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.weight.numel()
            m.weight.data = 1.5 + 1.5 * torch.rand(n, generator=g)
            m.bias.data = torch.rand(n, generator=g) - 0.3
            m.running_mean = 0.1 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)
    return model.eval()


def random_tw_masks(cfg, sites, keep, seed=0) -> TokenMasks:
    """Timestep-wise drop masks (different kept tokens at every timestep), later sites inside earlier ones."""
    rng = np.random.default_rng(seed)
    T, n = cfg.T, cfg.num_tokens
    fixed = 1 if cfg.anchor else 0
    allowed = np.ones((T, n), bool)
    n_present = cfg.num_image_tokens
    out = {}
    for s in sites:
        k = num_keep(n_present, keep)
        m = np.zeros((T, n), bool)
        for t in range(T):
            cand = np.flatnonzero(allowed[t, fixed:]) + fixed
            m[t, rng.choice(cand, k, replace=False)] = True
            m[t, :fixed] = True
        out[s], allowed, n_present = m, m, k
    return TokenMasks(out, n, T, "drop")


def export_and_compare(model, masks, x, tmp_path, name="m"):
    out = tmp_path / f"{name}.onnx"
    OnnxExporter().export(model, masks, out)
    rt = OnnxRuntime(out)
    got = rt.run(x.numpy())
    ref = run_torch(model, x, masks)
    bad, total, per = spike_mismatches(got, ref)
    return rt, got, ref, bad, total, per


@pytest.fixture(scope="module")
def stata_run(trained_run, digits, tmp_path_factory):
    """The trained STATA run (a copy), its BN gains raised so that every layer spikes (the briefly trained tiny
    model is nearly silent after the stem, which would make parity trivial), with calibrated static masks."""
    run = tmp_path_factory.mktemp("onnx") / "stata"
    shutil.copytree(trained_run, run)
    model, meta = load_model(run)
    save_model(run, excite(model), {k: v for k, v in meta.items() if k not in ("format", "model", "weights_sha256")})
    masks = calibrate_masks(model, [torch.from_numpy(digits.x_train[:128])])
    masks.save(run / "masks.json")
    return run


def test_parity_trained_stata_static_masks_256_inputs(stata_run, digits, tmp_path):
    model, _ = load_model(stata_run)
    masks = TokenMasks.load(stata_run / "masks.json")
    print("\ncalibrated masks differ between timesteps:", any((m != m[:1]).any() for m in masks.sites.values()))
    x = torch.from_numpy(digits.x_test[:256])
    rt, got, ref, bad, total, per = export_and_compare(model, masks, x, tmp_path)
    print(f"\nparity stata/ssa static masks: {bad} mismatches of {total} spikes on {len(x)} inputs")
    assert bad == 0, {k: v for k, v in per.items() if v}
    assert total > 1_000_000 and sum(s.sum() for s in ref.spikes.values()) > 10_000
    assert (got.predictions == ref.predictions).all()
    np.testing.assert_allclose(got.logits_t, ref.logits_t, rtol=1e-5, atol=1e-5)
    assert set(got.kept) == set(ref.kept) and all(np.array_equal(got.kept[s], ref.kept[s]) for s in ref.kept)
    # SOPs counted from ONNX Runtime's spikes equal the torch counts for the same inputs
    from stata_deploy.energy.counter import count_ops

    ops_rt, ops_ref = count_ops(rt.cfg, got, rt.masks), count_ops(model.cfg, ref, masks)
    assert ops_rt.sops == ops_ref.sops > 0
    assert ops_rt.to_dict()["layers"] == ops_ref.to_dict()["layers"]
    # the same trained network with masks that keep different tokens at every timestep (membranes of dropped
    # tokens decay in both)
    tw = random_tw_masks(model.cfg, sorted(masks.sites), model.cfg.prune.keep, seed=3)
    _, got, ref, bad, total, per = export_and_compare(model, tw, x, tmp_path, "tw")
    print(f"parity stata/ssa timestep-wise masks: {bad} mismatches of {total} spikes on {len(x)} inputs")
    assert bad == 0, {k: v for k, v in per.items() if v}
    assert (got.predictions == ref.predictions).all()


def test_parity_unpruned_and_tp(base_run, digits, tmp_path):
    model, _ = load_model(base_run)
    excite(model, seed=1)
    x = torch.from_numpy(digits.x_test[:200])
    _, got, ref, bad, total, _ = export_and_compare(model, None, x, tmp_path, "base")
    print(f"\nparity unpruned: {bad} mismatches of {total} spikes on {len(x)} inputs")
    assert bad == 0 and (got.predictions == ref.predictions).all()
    assert spiking_layers(ref) >= 5 and sum(float(np.abs(v).sum()) for v in ref.spikes.values()) > 100_000
    # training-free TP on the same weights, its static (skip-mode) masks calibrated on training images
    tp = with_prune(model, method="tp", keep=0.5, sites=[1])
    masks = calibrate_masks(tp, [torch.from_numpy(digits.x_train[:64])])
    assert masks.mode == "skip"
    _, got, ref, bad, total, _ = export_and_compare(tp, masks, x, tmp_path, "tp")
    print(f"parity tp (skip masks): {bad} mismatches of {total} spikes on {len(x)} inputs")
    assert bad == 0 and (got.predictions == ref.predictions).all()


@pytest.mark.parametrize("preset", ["sdt-tiny", "a2os2a-tiny"])
def test_parity_attention_kinds_timestep_wise_masks(preset, tmp_path):
    torch.manual_seed(0)
    cfg = make_config(preset, depth=3, prune=PruneConfig(method="stata", keep=0.5, sites=[1, 2]))
    model = excite(build_model(cfg))
    masks = random_tw_masks(cfg, [1, 2], 0.5)
    x = torch.rand(64, 1, 8, 8)
    _, got, ref, bad, total, per = export_and_compare(model, masks, x, tmp_path)
    print(f"\nparity {preset} random timestep-wise masks: {bad} mismatches of {total} on {len(x)} inputs")
    assert bad == 0, {k: v for k, v in per.items() if v}
    print(f"{spiking_layers(ref)} of {len(ref.spikes)} layers spike")
    assert spiking_layers(ref) >= 10, "most layers must spike for the test to mean something"
    assert (got.predictions == ref.predictions).all()


@pytest.mark.parametrize("method", ["stata", "l1", "tp"])
def test_parity_dynamic_topk_with_ties(method, trained_run, digits, tmp_path, monkeypatch):
    """``--masks dynamic``: the scores, TopK and gathers run in ONNX Runtime; with scores that tie at the k-th place
    (spike counts, the anchor's binary attention row) ORT keeps the same tokens as torch and every spike agrees."""
    from stata_deploy.pruning import scorers

    model, _ = load_model(trained_run)
    if method != "stata":  # the same trained weights under another scorer (l1 and TP need no training)
        model = with_prune(model, method=method, keep=0.5, sites=[1])
    x = torch.from_numpy(digits.x_test[:128])
    boundary_ties, rows = 0, 0
    top = scorers.top_indices

    def counting(values, k):  # how many selections have a tie between the k-th and the (k+1)-th best score
        nonlocal boundary_ties, rows
        if values.shape[-1] > k:
            v = values.sort(-1, descending=True).values
            boundary_ties += int((v[..., k - 1] == v[..., k]).sum())
            rows += v[..., 0].numel()
        return top(values, k)

    monkeypatch.setattr(scorers, "top_indices", counting)
    ref = run_torch(model, x)
    monkeypatch.setattr(scorers, "top_indices", top)
    out = tmp_path / f"dyn-{method}.onnx"
    OnnxExporter().export(model, None, out, dynamic_masks=True)
    got = OnnxRuntime(out).run(x.numpy())
    bad, total, per = spike_mismatches(got, ref)
    print(f"\ndynamic top-k {method}: {boundary_ties} of {rows} selections tie at the k-th place; "
          f"{bad} mismatches of {total} spikes on {len(x)} inputs")
    assert boundary_ties > 0, "no tie at the k-th place: the test would not see a different tie rule"
    assert set(got.kept) == set(ref.kept) and all(np.array_equal(got.kept[s], ref.kept[s]) for s in ref.kept)
    assert bad == 0, {k: v for k, v in per.items() if v}
    assert (got.predictions == ref.predictions).all()
    np.testing.assert_allclose(got.logits_t, ref.logits_t, rtol=1e-5, atol=1e-5)


def test_top_indices_breaks_ties_by_the_lower_index():
    from stata_deploy.pruning.scorers import top_indices

    v = torch.tensor([[1.0, 3.0, 1.0, 1.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert top_indices(v, 3).tolist() == [[1, 5, 0], [0, 1, 2]]


def test_file_format_checker_opset_domains_metadata(stata_run, tmp_path):
    model, _ = load_model(stata_run)
    masks = TokenMasks.load(stata_run / "masks.json")
    out = tmp_path / "f.onnx"
    summary = OnnxExporter().export(model, masks, out, weights_sha256="ab" * 32)
    assert summary["path"] == str(out) and summary["opset"] >= 17
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and not len(proto.functions)
    desc = json.loads({m.key: m.value for m in proto.metadata_props}[META_KEY])
    assert "run_dir" not in desc and str(stata_run) not in json.dumps(desc)  # no path of this machine in the file
    assert desc["weights_sha256"] == "ab" * 32 and desc["T"] == model.cfg.T
    assert desc["config"]["prune"]["method"] == "stata" and desc["mask_source"] == "static"
    assert TokenMasks.from_json(desc["masks"]).sites.keys() == masks.sites.keys()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for s, m in masks.sites.items():
        assert np.array_equal(inits[f"{MASK_PREFIX}{s}"], m)
    # external data path: weights beside the model, loadable and identical in behaviour
    ext = tmp_path / "ext.onnx"
    OnnxExporter().export(model, masks, ext, external_data=True)
    assert (tmp_path / "ext.onnx.data").is_file() and ext.stat().st_size < out.stat().st_size
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    a, b = OnnxRuntime(out).run(x), OnnxRuntime(ext).run(x)
    assert np.array_equal(a.logits_t, b.logits_t)


def test_bad_inputs_clear_errors(stata_run, tmp_path):
    model, _ = load_model(stata_run)
    masks = TokenMasks.load(stata_run / "masks.json")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not onnx at all" * 10)
    with pytest.raises(StataError, match="not an ONNX file"):
        OnnxRuntime(junk)
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),), str(foreign), dynamo=False)
    with pytest.raises(StataError, match="not made by stata-deploy"):
        OnnxRuntime(foreign)
    # a pruned model without static masks: refuse instead of silently exporting something else
    with pytest.raises(StataError, match="calibrate"):
        OnnxExporter().export(model, None, tmp_path / "nomask.onnx")
    wrong = TokenMasks({1: np.ones((4, 17), bool)}, 17, 4)
    with pytest.raises(StataError, match="masks are for"):
        OnnxExporter().export(model, wrong, tmp_path / "wrong.onnx")
    assert not list(tmp_path.glob("nomask*")) and not list(tmp_path.glob("wrong*")) and not list(tmp_path.glob(".*"))
    out = tmp_path / "ok.onnx"
    OnnxExporter().export(model, masks, out)
    rt = OnnxRuntime(out)
    with pytest.raises(StataError, match="expects images"):
        rt.run(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(StataError, match="expects images"):
        rt.run(np.zeros((1, 1, 16, 16), np.float32))


def test_failed_export_leaves_no_file(stata_run, tmp_path, monkeypatch):
    import onnx.checker

    model, _ = load_model(stata_run)
    masks = TokenMasks.load(stata_run / "masks.json")

    def broken(*a, **k):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    out = tmp_path / "sub" / "m.onnx"
    with pytest.raises(StataError, match="simulated"):
        OnnxExporter().export(model, masks, out, external_data=True)
    assert not out.exists() and not list(out.parent.iterdir())
