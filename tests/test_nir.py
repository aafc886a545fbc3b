"""NIR export + our reader: standard files, lossless rewrite, round-trip spike parity, masks, split, errors."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

nir = pytest.importorskip("nir")

from exporters.nir_exporter import NIR_DT, NirExporter, build_graph  # noqa: E402
from runtimes.nir_graph import execute, read_graph, simulate, verify_lossless  # noqa: E402
from runtimes.nir_runtime import NirRuntime, inspect  # noqa: E402
from stata_deploy.errors import StataError, UnsupportedOpError  # noqa: E402
from stata_deploy.inference import run_torch  # noqa: E402
from stata_deploy.nn.neurons import TAU  # noqa: E402
from stata_deploy.pruning.masks import TokenMasks
from stata_deploy.pruning.calibration import calibrate_masks
from stata_deploy.pruning.scorers import num_keep

STANDARD = {"Input", "Output", "Affine", "Linear", "Conv1d", "Conv2d", "SumPool2d", "AvgPool2d", "Flatten", "Delay",
            "Threshold", "LIF", "CubaLIF", "LI", "IF", "I", "Integrator", "Scale", "NIRGraph"}
N_IN = 6


def lively(preset, prune="none", keep=1.0, x_cal=None, seed=0, calibrate=True):
    """Random weights, BN statistics from one real batch, BN gain 1.5 / bias 0.2: every layer fires 15-80%
    (briefly trained tiny runs barely spike, which would make parity trivially true)."""
    from stata_deploy.config import make_config
    from stata_deploy.nn.model import build_model

    torch.manual_seed(seed)
    m = build_model(make_config(preset, prune=dict(method=prune, keep=keep)))
    bns = [b for b in m.modules() if isinstance(b, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
    for b in bns:
        b.momentum = None
        b.reset_running_stats()
    m.train()
    with torch.no_grad():
        m(torch.as_tensor(x_cal))
    m.eval()
    for b in bns:
        b.weight.data.fill_(1.5)
        b.bias.data.fill_(0.2)
    masks = calibrate_masks(m, [torch.as_tensor(x_cal)]) if (calibrate and m.cfg.prune.active) else None
    return m, masks


_CACHE: dict = {}


def model_for(preset, method, x_cal):
    """Cached lively models (building one runs torch on the calibration batch: slow on a busy machine)."""
    key = (preset, method)
    if key not in _CACHE:
        prune = "stata" if method == "tv" else method
        m, masks = lively(preset, prune, 0.5 if method != "none" else 1.0, x_cal, calibrate=method != "tv")
        if method == "tv":
            masks = time_varying(m.cfg)
        _CACHE[key] = (m, masks)
    m, masks = _CACHE[key]
    import copy

    return copy.deepcopy(m), masks


def time_varying(cfg, keep=0.5, extra=6, seed=1):
    rng = np.random.default_rng(seed)
    T, n, a = cfg.T, cfg.num_tokens, 1 if cfg.anchor else 0
    k = num_keep(cfg.num_image_tokens, keep)
    pool = rng.choice(np.arange(a, n), size=k + extra, replace=False)
    m = np.zeros((T, n), bool)
    for t in range(T):
        m[t, rng.choice(pool, size=k, replace=False)] = True
        m[t, :a] = True
    assert (m != m[:1]).any()
    return TokenMasks({1: m}, n, T, "drop")


@pytest.fixture(scope="module")
def xcal(digits):
    return digits.x_train[:12]


@pytest.fixture(scope="module")
def xin(digits):
    return digits.x_test[:N_IN]


CASES = [
    ("spikformer-tiny", "none"), ("spikformer-tiny", "stata"), ("spikformer-tiny", "tv"), ("spikformer-tiny", "tp"),
    ("sdt-tiny", "none"), ("sdt-tiny", "tv"), ("a2os2a-tiny", "none"), ("a2os2a-tiny", "tv"),
]


@pytest.mark.parametrize("preset,method", CASES)
def test_round_trip_same_spikes(tmp_path, xcal, xin, preset, method):
    model, masks = model_for(preset, method, xcal)
    out = tmp_path / "m.nir"
    summary = NirExporter().export(model, masks, out, weights_sha256="cd" * 32)
    assert summary["path"] == str(out) and out.is_file()
    g = nir.read(str(out))  # passes nir.read (type-checked)
    assert {type(n).__name__ for n in g.nodes.values()} <= STANDARD
    assert verify_lossless(out) == []
    desc = json.loads(g.metadata["stata_deploy"])
    assert "run_dir" not in desc and str(tmp_path) not in g.metadata["stata_deploy"]  # no path of this machine
    assert desc["weights_sha256"] == "cd" * 32 and desc["config"]["name"] == preset and desc["format_version"] >= 1
    assert (desc["masks"] is None) == (masks is None)

    rt = NirRuntime(out)
    got = rt.run(xin)
    ref = run_torch(model, torch.as_tensor(xin), masks)
    assert set(got.spikes) == set(ref.spikes)
    rates = []
    for k, v in ref.spikes.items():
        a = got.spikes[k]
        assert a.shape == v.shape, k
        if k.endswith("attn.k_lif") and preset.startswith("a2os2a"):  # ReLU K: real-valued
            np.testing.assert_allclose(a, v, rtol=1e-4, atol=1e-5, err_msg=k)
        else:
            assert int((a != v).sum()) == 0, f"{k}: {int((a != v).sum())} spikes differ"
            rates.append(np.abs(v).mean())
    assert min(rates) > 0.02  # a real parity test: every layer spikes
    np.testing.assert_allclose(got.logits_t, ref.logits_t, atol=1e-4)
    assert (got.predictions == ref.predictions).all()
    for s, kept in ref.kept.items():
        np.testing.assert_array_equal(got.kept[s], kept)


def test_lif_mapping_and_bn_folding(tmp_path, xcal):
    model, _ = model_for("sdt-tiny", "none", xcal)
    g, _ = build_graph(model, None)
    lif = g.nodes["blocks.0.mlp.fc1_lif"]
    assert lif.tau.dtype == np.float64 and np.all(lif.tau == TAU * NIR_DT)
    # NIR fires at v > v_threshold: the file holds the float32 just below V_th, so that v > it <=> v >= V_th
    below1 = np.float64(np.nextafter(np.float32(1.0), np.float32(-np.inf)))
    assert np.all(lif.v_threshold == below1) and np.all(lif.v_reset == 0.0) and np.all(lif.r == 1.0)
    assert np.all(g.nodes["blocks.0.attn.attn_lif"].v_threshold == np.nextafter(np.float32(0.5), np.float32(0)))
    v = np.arange(-4096, 4097, dtype=np.float32) * np.float32(2 ** -24) + np.float32(1.0)  # every float32 near 1
    assert np.array_equal(v > np.float32(below1), v >= np.float32(1.0))
    assert np.all(g.nodes["blocks.0.attn.kv_and"].tau == NIR_DT)  # memoryless AND gate
    # BN folded: conv output equals BN(Linear(x)) of torch for a random token
    fc1 = model.blocks[0].mlp.fc1
    x = torch.randn(5, 32)
    want = fc1.bn(fc1.linear(x)).detach().double().numpy()
    w = g.nodes["blocks.0.mlp.fc1"].weight[:, :, 0, 0]
    got = x.double().numpy() @ w.T + g.nodes["blocks.0.mlp.fc1"].bias
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sdsa_is_complete_standard_graph_ssa_uses_ports(tmp_path, xcal):
    m_sdsa, _ = model_for("sdt-tiny", "none", xcal)
    g, desc = build_graph(m_sdsa, None)
    assert desc["host_ops"] == [] and desc["exact_without_metadata"] is True
    assert {type(n).__name__ for n in g.nodes.values()} == {"Input", "Output", "Conv2d", "LIF"}
    assert sum(isinstance(n, nir.Input) for n in g.nodes.values()) == 1
    m_ssa, _ = model_for("spikformer-tiny", "none", xcal)
    g, desc = build_graph(m_ssa, None)
    # one host operation per IR node NIR cannot express, named after it, with the node's own fields
    assert [(h["name"], h["kind"]) for h in desc["host_ops"]] == [
        (f"blocks.{i}.attn.{k}", k) for i in range(2) for k in ("qk", "av")]
    assert desc["host_ops"][1]["attrs"] == {"heads": m_ssa.cfg.heads, "scale": 0.125}
    assert desc["host_ops"][1]["inputs"] == ["blocks.0.attn.qk", "blocks.0.attn.host.v"]
    assert desc["host_ops"][1]["output"] == "blocks.0.attn.host.result" and desc["host_ops"][0]["output"] is None
    # the product's result enters through an Input port: a reader ignoring metadata has no value for it
    ins = [k for k, n in g.nodes.items() if isinstance(n, nir.Input)]
    assert sorted(ins) == ["blocks.0.attn.host.result", "blocks.1.attn.host.result", "input"]
    assert desc["exact_without_metadata"] is False and "NOT runnable" in desc["standard_reader_computes"]
    G = read_graph_from(g, tmp_path)
    with pytest.raises(StataError, match="no value fed"):
        # a reader that ignores host ops must fail loudly, not compute something else
        simulate(dataclasses.replace(G, host_ops=()), {"input": np.zeros((4, 2, 1, 8, 8))})


def read_graph_from(g, tmp_path):
    p = tmp_path / "g.nir"
    nir.write(str(p), g)
    return read_graph(p)


def test_masks_remove_tokens_structurally(tmp_path, xcal):
    model, masks = model_for("spikformer-tiny", "stata", xcal)
    full = inspect(_export(tmp_path / "full.nir", model, TokenMasks({}, masks.n_full, masks.T)))
    pruned = inspect(_export(tmp_path / "pruned.nir", model, masks))
    tvm = time_varying(model.cfg)
    tv = inspect(_export(tmp_path / "tv.nir", model, tvm))
    same = TokenMasks({1: np.broadcast_to(tvm.sites[1][:1], tvm.sites[1].shape).copy()}, tvm.n_full, tvm.T)
    structural = inspect(_export(tmp_path / "structural.nir", model, same))  # tv's t=0 set at every timestep
    assert pruned["neurons"] < full["neurons"] and pruned["synapses"] < full["synapses"]
    # the graph holds the union over timesteps: 33 tokens at every step < a 39-token union < all 65
    assert structural["neurons"] < tv["neurons"] < full["neurons"]
    assert structural["masks"]["segments"]["site1"]["tokens_in_graph"] == 33
    seg = tv["masks"]["segments"]["site1"]
    assert seg["time_varying"] and seg["kept_per_timestep"] == [33] * 4 and seg["tokens_in_graph"] == 39
    assert pruned["lossless_rewrite"] and tv["lossless_rewrite"]
    desc = json.loads(nir.read(str(tmp_path / "tv.nir")).metadata["stata_deploy"])
    assert "ignores metadata computes every remaining token" in desc["standard_reader_computes"]
    assert np.array(desc["masks"]["sites"]["1"]).shape == (4, 65)  # full (T, N) schedule in metadata


def _export(path, model, masks):
    NirExporter().export(model, masks, path)
    return path


def test_split_writes_runnable_standard_segments(tmp_path, xcal, xin):
    model, _ = model_for("spikformer-tiny", "none", xcal)
    res = NirExporter().export(model, None, tmp_path / "m.nir", split=True)
    assert len(res["files"]) == 1 + 3  # two host ops -> three segments
    for f in res["files"][1:]:
        g = nir.read(f)
        assert {type(n).__name__ for n in g.nodes.values()} <= STANDARD
        assert verify_lossless(f) == []
    G0 = read_graph(res["files"][1])
    assert G0.host_ops == ()
    outs, recs = simulate(G0, {"input": np.broadcast_to(xin, (4, *xin.shape))})
    ref = run_torch(model, torch.as_tensor(xin))
    q = outs["blocks.0.attn.host.q"]  # (T, B, D, 8, 8) -> (T, B, N, D)
    q = q.reshape(*q.shape[:3], -1).transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(q, ref.spikes["blocks.0.attn.q_lif"])
    np.testing.assert_array_equal(np.stack(recs["stem.rpe_lif"]), ref.spikes["stem.rpe_lif"])


def test_bad_inputs_clear_errors_no_partial_file(tmp_path, xcal):
    out = tmp_path / "bad.nir"
    with pytest.raises(StataError, match="not a stata-deploy model"):
        NirExporter().export(torch.nn.Linear(2, 2), None, out)
    model, masks = model_for("spikformer-tiny", "stata", xcal)
    other = TokenMasks({1: masks.sites[1][:2]}, masks.n_full, 2)  # masks for a T=2 model
    with pytest.raises(StataError, match="masks are for T=2"):
        NirExporter().export(model, other, out)
    with pytest.raises(UnsupportedOpError, match="dynamic top-k"):
        NirExporter().export(model, None, out)
    model.blocks[0].mlp.fc1_lif = torch.nn.GELU()
    with pytest.raises(UnsupportedOpError, match=r"GELU \(module 'blocks.0.mlp.fc1_lif'\)"):
        NirExporter().export(model, masks, out)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left
    (tmp_path / "junk.nir").write_bytes(b"not hdf5")
    with pytest.raises(StataError, match="not a readable NIR"):
        NirRuntime(tmp_path / "junk.nir")


def test_inspect_cli(tmp_path, xcal):
    from click.testing import CliRunner

    from stata_deploy.cli.main import main

    model, masks = model_for("spikformer-tiny", "stata", xcal)
    p = _export(tmp_path / "m.nir", model, masks)
    r = CliRunner().invoke(main, ["inspect", str(p), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["neurons"] > 0 and d["synapses"] > 0 and d["lossless_rewrite"] is True
    assert d["nodes"]["lif"] == 19 and len(d["host_ops"]) == 4 and d["masks"]["mode"] == "drop"
    r = CliRunner().invoke(main, ["inspect", str(p)])
    assert r.exit_code == 0 and "a reader that ignores metadata" in r.output and "site 1" in r.output
    r = CliRunner().invoke(main, ["inspect", str(tmp_path / "missing.nir")])
    assert r.exit_code != 0 and "not found" in r.output


def _snntorch_replay(path, x, T):
    """Import ``path`` with snntorch 1.0.0, run T steps (direct encoding); every LIF node's spikes by node name
    (T, B, *shape) and the output port per step."""
    import contextlib
    import io

    from snntorch import utils as su
    from snntorch.import_nir import import_from_nir

    g = nir.read(str(path))
    with contextlib.redirect_stdout(io.StringIO()):  # snntorch prints weight-scaling warnings per LIF
        net = import_from_nir(g)
    rec, outs = {}, []
    names = {k.replace(".", "_"): k for k, n in g.nodes.items() if isinstance(n, nir.LIF)}
    for n, mod in net.named_modules():
        if n in names:
            mod.register_forward_hook(lambda m, i, o, n=n: rec.setdefault(names[n], []).append(
                (o[0] if isinstance(o, tuple) else o).detach().numpy()))
    su.reset(net)
    with torch.no_grad():
        state = None
        for _ in range(T):
            o = net(torch.as_tensor(x), state)
            if isinstance(o, tuple):
                o, state = o
            outs.append(o.numpy())
    return {k: np.stack(v) for k, v in rec.items()}, np.stack(outs)


def test_snntorch_peer_reads_sdsa(tmp_path, xcal, xin):
    pytest.importorskip("snntorch")
    pytest.importorskip("nirtorch")
    model, _ = model_for("sdt-tiny", "none", xcal)
    p = _export(tmp_path / "sdt.nir", model, None)
    x = xin[:4]
    ours = execute(read_graph(p), x, strict_ties=True)  # snntorch fires at v > th
    rec, _ = _snntorch_replay(p, x, model.cfg.T)
    rec = {k: v for k, v in rec.items() if k in ours.spikes}
    for k, v in rec.items():
        a = v
        b = ours.spikes[k]
        if b.ndim == 4:
            a = a.reshape(*a.shape[:3], -1).transpose(0, 1, 3, 2)
        assert a.shape == b.shape and int((a != b).sum()) == 0, k
    assert len(rec) == 19


def test_snntorch_peer_replays_pruned_fixed_schedule_exactly(tmp_path, xcal, xin):
    """Issue 13: a STATA-pruned model whose masks keep the same tokens at every timestep is a complete standard
    graph (no Affine: token rows of Conv1d, anchor as a bias, the site's selection a crop), exact without metadata;
    snntorch 1.0.0 imports it and reproduces torch's spikes at every LIF layer."""
    pytest.importorskip("snntorch")
    pytest.importorskip("nirtorch")
    from runtimes.nir_graph import _to_torch_layout

    model, _ = lively("sdt-tiny", "stata", 0.5, xcal, calibrate=False)
    masks = calibrate_masks(model, [torch.as_tensor(xcal)], schedule="fixed")
    assert all((m == m[:1]).all() for m in masks.sites.values()) and masks.kept(1) == 33
    p = tmp_path / "pruned.nir"
    summary = NirExporter().export(model, masks, p)
    assert summary["exact_without_metadata"] is True
    g = nir.read(str(p))
    assert {type(n).__name__ for n in g.nodes.values()} == {"Input", "Output", "Conv1d", "Conv2d", "Flatten", "LIF"}
    G = read_graph(p)
    ref = run_torch(model, torch.as_tensor(xin), masks)
    rec, outs = _snntorch_replay(p, xin, model.cfg.T)
    lay = {o.layer: (o.layout, o.tokens) for o in G.ops.values() if o.layer}
    assert set(ref.spikes) <= set(lay) and len(ref.spikes) == 19
    fired = 0
    for k, v in ref.spikes.items():
        got = _to_torch_layout(G, *lay[k], rec[k])  # graph token order -> torch's slots
        assert got.shape == v.shape, k
        assert int((got != v).sum()) == 0, f"{k}: {int((got != v).sum())} spikes differ"
        fired += int(v.sum())
    assert fired > 10000  # a real test: the model is alive
    assert ref.spikes["blocks.1.attn.q_lif"].shape[2] == 33  # block 1 runs on the kept tokens only
    pred = outs.mean(0).reshape(len(xin), -1).argmax(-1)
    assert (pred == ref.predictions).all()
    np.testing.assert_allclose(outs.reshape(ref.logits_t.shape), ref.logits_t, atol=1e-4)


def test_a2os2a_host_ops_are_ir_nodes_and_old_files_are_refused(tmp_path, xcal):
    """A²OS²A: ReLU K and ternary V are host operations of their own (recorded under their module names), then the
    two products; a format-1 file (one 'a2os2a_product' per attention) is refused with the re-export command."""
    from stata_deploy.description import META_KEY, NIR_FORMAT_VERSION

    model, _ = model_for("a2os2a-tiny", "none", xcal)
    g, desc = build_graph(model, None)
    h = {o["name"]: o for o in desc["host_ops"]}
    assert [o["kind"] for o in desc["host_ops"]] == ["relu", "ternary", "ktv", "qktv"] * 2
    v = model.blocks[0].attn.v_lif
    assert h["blocks.0.attn.v_lif"]["attrs"] == {"tau": float(v.tau), "v_th": float(v.v_th),
                                                 "v_reset": float(v.v_reset)}
    assert h["blocks.0.attn.v_lif"]["layer"] == "blocks.0.attn.v_lif" and h["blocks.0.attn.k_lif"]["inputs"] == [
        "blocks.0.attn.host.k"]
    assert h["blocks.0.attn.ktv"]["inputs"] == ["blocks.0.attn.k_lif", "blocks.0.attn.v_lif"]
    assert h["blocks.0.attn.qktv"]["output"] == "blocks.0.attn.host.result"
    assert desc["format_version"] == NIR_FORMAT_VERSION == 2
    old = dict(desc, format_version=1, host_ops=[dict(name="blocks.0.attn.product", kind="a2os2a_product",
                                                       inputs=["blocks.0.attn.host.q", "blocks.0.attn.host.k",
                                                               "blocks.0.attn.host.v"],
                                                       output="blocks.0.attn.host.result", attrs={"heads": 2})])
    g.metadata = {META_KEY: json.dumps(old)}
    p = tmp_path / "old.nir"
    nir.write(str(p), g)
    with pytest.raises(StataError, match=r"older stata-deploy .*re-export it: stata-deploy export RUN --to nir") as e:
        read_graph(p)
    assert "\n" not in str(e.value)
    bad = dict(desc, host_ops=[dict(o, inputs=["blocks.0.attn.nothing"]) if o["kind"] == "relu" else o
                               for o in desc["host_ops"]])
    g.metadata = {META_KEY: json.dumps(bad)}
    nir.write(str(p), g)
    with pytest.raises(StataError, match="reads 'blocks.0.attn.nothing', which is neither an output port"):
        read_graph(p)


def test_new_product_kind_is_a_host_op_the_reader_names(tmp_path, xcal, monkeypatch):
    """A Product kind the exporter has no standard lowering for becomes a host operation of that kind (no exporter
    change); a reader without that kind in its table refuses the file naming it."""
    import dataclasses

    from exporters.nir_exporter import _describe, lower_ir
    from stata_deploy import description
    from stata_deploy.ir import build_ir, nodes
    from stata_deploy.ir.passes import FoldBatchNorm

    monkeypatch.setitem(nodes.PRODUCT_SHAPES, "qktv2", nodes.PRODUCT_SHAPES["qktv"])
    model, _ = model_for("a2os2a-tiny", "none", xcal)
    g = build_ir(model).transform(FoldBatchNorm())
    g = nodes.Graph(tuple(dataclasses.replace(n, kind="qktv2") if getattr(n, "kind", None) == "qktv" else n
                          for n in g.nodes), g.inputs, g.blocks)
    b, _ = lower_ir(g, grid=True)
    assert [h["kind"] for h in b.host_ops].count("qktv2") == 2
    desc = _describe(b, model.cfg, None, None, False, False)
    p = tmp_path / "new.nir"
    from stata_deploy.ir.lowered import to_nir_graph

    nir.write(str(p), to_nir_graph(b.nodes, b.edges, {description.META_KEY: description.encode(desc)}))
    with pytest.raises(UnsupportedOpError, match="host operation 'blocks.0.attn.qktv' of kind 'qktv2' is unknown"):
        read_graph(p)


@pytest.mark.parametrize("preset", ["spikformer-tiny", "a2os2a-tiny"])
def test_reader_host_operations_are_the_models_ir_nodes(tmp_path, xcal, preset):
    """Read back, every host operation's node is the core IR node the exporter lowered (same type, kind and
    fields), and every NIR node is a typed node of the lowered dialect: one description of the network."""
    from stata_deploy.ir import build_ir, lowered
    from stata_deploy.ir.passes import FoldBatchNorm

    model, _ = model_for(preset, "none", xcal)
    ir = build_ir(model).transform(FoldBatchNorm())
    G = read_graph(_export(tmp_path / "m.nir", model, None))
    assert G.host_ops and all(h.node == ir.node(h.name) for h in G.host_ops)
    assert {type(o) for o in G.ops.values()} <= set(lowered.Lowered.__subclasses__())
    assert all(set(G.inputs[n]) <= set(G.ops) for n in G.ops)


def test_lowered_nodes_check_their_fields():
    """Lowered nodes refuse what would poison a run, are read-only, and host nodes take only their IR fields."""
    from stata_deploy.ir import lowered
    from stata_deploy.ir.nodes import IRError, Product

    one = np.ones(3)
    lif = dict(name="n", shape=(3,), tau=one, tau_steps=one, r=one, v_leak=0 * one, v_reset=0 * one, v_threshold=one)
    node = lowered.LIF(**lif)
    with pytest.raises(ValueError):
        node.tau[0] = 2.0  # a read-only copy
    with pytest.raises(IRError, match="'v_threshold' contains NaN"):
        lowered.LIF(**dict(lif, v_threshold=np.array([1.0, np.nan, 1.0])))
    with pytest.raises(IRError, match="tau must be positive"):
        lowered.LIF(**dict(lif, tau=-one))
    with pytest.raises(IRError, match="weight must be"):
        lowered.Affine(name="a", shape=(3,), weight=one, bias=one)
    assert lowered.host_node("p", "qk", {"heads": 2, "scale": 0.5}) == Product(name="p", kind="qk", heads=2, scale=0.5)
    with pytest.raises(IRError, match="heads must be a positive integer"):
        lowered.host_node("p", "qk", {"heads": 0})
    with pytest.raises(TypeError, match="unknown attrs"):
        lowered.host_node("p", "qk", {"heads": 2, "tau": 2.0})
    with pytest.raises(KeyError):
        lowered.host_node("n", "lif", {})  # a LIF is a NIR node, never a host operation


@pytest.mark.parametrize("change,words", [
    ({"heads": 0}, "host operation 'blocks.0.attn.qk': heads must be a positive integer"),
    ({"scale": float("inf")}, "scale must be a finite non-zero number"),
    ({"tau": 2.0}, "unknown attrs ['tau']"),
    (None, "lacks attrs ['heads']"),
])
def test_reader_refuses_host_operations_with_bad_fields(tmp_path, xcal, change, words):
    """A damaged host operation is refused by its IR node's own checks, naming the operation and the field."""
    from stata_deploy.description import META_KEY

    model, _ = model_for("spikformer-tiny", "none", xcal)
    g, desc = build_graph(model, None)
    ops = [dict(o) for o in desc["host_ops"]]
    ops[0]["attrs"] = {} if change is None else dict(ops[0]["attrs"], **change)
    g.metadata = {META_KEY: json.dumps(dict(desc, host_ops=ops))}
    with pytest.raises(StataError) as e:
        read_graph_from(g, tmp_path)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("preset,method", [("spikformer-tiny", "stata"), ("sdt-tiny", "none"),
                                           ("a2os2a-tiny", "none")])
def test_the_lowered_graph_is_the_file(tmp_path, xcal, preset, method):
    """Read, written back from the lowered IR alone (runtimes.nir_graph.write_graph) and read again: the same nir
    graph field by field (types, arrays with dtypes, node metadata, edges, description), and an equal lowered graph:
    the lowered dialect loses nothing of the file."""
    from runtimes.nir_graph import nir_differences, write_graph

    model, masks = model_for(preset, method, xcal)
    f = _export(tmp_path / "m.nir", model, masks)
    G = read_graph(f)
    assert bool(G.segments) == (method != "none") and bool(G.host_ops) == (preset != "sdt-tiny")
    write_graph(G, tmp_path / "again.nir")
    assert nir_differences(nir.read(str(f)), nir.read(str(tmp_path / "again.nir"))) == []
    G2 = read_graph(tmp_path / "again.nir")
    assert G2.ops == G.ops and G2.inputs == G.inputs and G2.host_ops == G.host_ops and G2.meta == G.meta
    assert G2.segments.keys() == G.segments.keys() and all(
        np.array_equal(G2.segments[k].schedule, s.schedule) and np.array_equal(G2.segments[k].positions, s.positions)
        for k, s in G.segments.items())
