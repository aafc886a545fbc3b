"""Static-mask inference (issue 16): precomputed plans and neuron schedules give exactly the spikes of the generic
indexed path, in eager torch and in the traceable (ONNX) twin; the ONNX graph has only constant indices."""
import numpy as np
import pytest
import torch

from stata_deploy.config import PruneConfig, make_config
from stata_deploy.inference import run_torch
from stata_deploy.nn.model import build_model
from stata_deploy.nn.neurons import (LIFSchedule, TokenIndex, multistep_neuron, multistep_neuron_static_traceable,
    multistep_neuron_traceable)
from stata_deploy.pruning.masks import TokenMasks, local_from_mask, static_plan
from stata_deploy.pruning.scorers import compose, gather_slots, num_keep
from stata_deploy.testing import liven_batchnorm


def tw_masks(cfg, sites, keep, seed=0, mode="drop", fixed_sites=()) -> TokenMasks:
    """Random per-timestep masks (later drop sites inside earlier ones); sites in ``fixed_sites`` keep the same
    tokens at every timestep. Every site keeps a random core of the next site's size at all timesteps, so a fixed
    site can follow a per-timestep one."""
    rng = np.random.default_rng(seed)
    T, n = cfg.T, cfg.num_tokens
    fixed = 1 if cfg.anchor else 0
    ks, n_present = [], cfg.num_image_tokens
    for _ in sites:
        ks.append(num_keep(n_present, keep))
        if mode == "drop":
            n_present = ks[-1]
    allowed = np.ones((T, n), bool)
    out = {}
    for i, s in enumerate(sites):
        k, k_next = ks[i], (ks[i + 1] if i + 1 < len(ks) and mode == "drop" else 0)
        common = np.flatnonzero(allowed.all(0)[fixed:]) + fixed
        core = rng.choice(common, k if s in fixed_sites else k_next, replace=False)
        m = np.zeros((T, n), bool)
        for t in range(T):
            m[t, core] = True
            m[t, :fixed] = True
            rest = np.setdiff1d(np.flatnonzero(allowed[t, fixed:]) + fixed, core)
            m[t, rng.choice(rest, k - len(core), replace=False)] = True
        out[s] = m
        if mode == "drop":
            allowed = m
    return TokenMasks(out, n, T, mode)


def reference_forward(model, x, masks):
    """The generic path: slot indices from the masks per call, neurons on the full-N indexed path (no schedule)."""
    cfg = model.cfg
    x = model.tokens(x)
    T, B, N, D = x.shape
    n_fixed = 1 if cfg.anchor else 0
    index = None
    for i, blk in enumerate(model.blocks):
        if i in masks.sites and masks.mode == "skip":
            local = local_from_mask(None, masks.sites[i], B, x.device)
            y, _ = blk(gather_slots(x, local), TokenIndex(local, N, False))
            x = x.scatter(2, local.unsqueeze(-1).expand(*local.shape, D), y)
            continue
        if i in masks.sites:
            local = local_from_mask(index, masks.sites[i], B, x.device)
            tw = bool((masks.sites[i] != masks.sites[i][:1]).any()) or (index is not None and index.timestep_wise)
            x = gather_slots(x, local)
            index = compose(index, local, N, tw)
        x, _ = blk(x, index)
    img = x[:, :, n_fixed:] if n_fixed else x
    return model.head(img.mean(2))


def record(model, fn):
    from stata_deploy.nn.neurons import NEURON_TYPES

    spikes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, NEURON_TYPES):
            hooks.append(m.register_forward_hook(lambda mod, i, o, name=name: spikes.__setitem__(name, o.clone())))
    try:
        with torch.no_grad():
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    return out, spikes


CASES = [
    ("spikformer-tiny", [1], 0.5, "drop", ()),
    ("spikformer-tiny", [1, 2], 0.3, "drop", ()),
    ("spikformer-tiny", [1, 2], 0.5, "drop", (2,)),  # a time-invariant subset after a per-timestep site
    ("spikformer-tiny", [1, 2], 0.5, "drop", (1,)),  # time-invariant, then per-timestep
    ("sdt-tiny", [1, 2], 0.5, "drop", ()),
    ("a2os2a-tiny", [1, 2], 0.5, "drop", ()),  # ternary V and ReLU K neurons
    ("spikformer-tiny", [1, 2], 0.5, "skip", ()),
    ("spikformer-tiny", [1], 0.5, "skip", (1,)),
]


@pytest.mark.parametrize("preset,sites,keep,mode,fixed", CASES)
@pytest.mark.parametrize("B", [1, 5])
def test_static_plan_forward_matches_generic_indexed_path(preset, sites, keep, mode, fixed, B):
    torch.manual_seed(0)
    method = "tp" if mode == "skip" else "stata"
    cfg = make_config(preset, depth=3, prune=PruneConfig(method=method, keep=keep, sites=sites))
    model = liven_batchnorm(build_model(cfg)).eval()
    masks = tw_masks(cfg, sites, keep, seed=B, mode=mode, fixed_sites=fixed)
    x = torch.rand(B, 1, 8, 8)
    ref_logits, ref = record(model, lambda: reference_forward(model, x, masks))
    out, got = record(model, lambda: model(x, masks=masks))
    assert set(got) == set(ref)
    bad = {n: int((got[n] != ref[n]).sum()) for n in ref if got[n].shape != ref[n].shape or (got[n] != ref[n]).any()}
    assert not bad, bad
    assert sum(int(s.abs().sum()) for s in ref.values()) > 1000  # the comparison is not between silent nets
    assert torch.equal(out.logits_t, ref_logits)
    for s, m in masks.sites.items():
        assert out.kept[s].shape == (cfg.T, B, int(m[0].sum()))
        assert all(out.kept[s][t, b].tolist() == np.flatnonzero(m[t]).tolist() for t in range(cfg.T) for b in range(B))
    # the traceable graph (what the ONNX exporter traces) computes the same, eagerly
    from exporters.onnx_exporter import _StaticGraph

    g = _StaticGraph(model, masks).eval()
    with torch.no_grad():
        outs = g(model.encode(x))
    assert torch.equal(outs[0], ref_logits)
    for name, s in zip(g.names, outs[1:]):
        assert torch.equal(s, ref[name]), name


@pytest.mark.parametrize("ternary", [False, True])
@pytest.mark.parametrize("v_reset", [0.0, -0.25])
def test_lif_schedule_matches_indexed_neuron(ternary, v_reset):
    rng = np.random.default_rng(0)
    T, B, N, k, D = 6, 3, 9, 4, 5
    pos = np.stack([np.sort(rng.choice(N, k, replace=False)) for _ in range(T)])
    pos[3] = pos[2]  # a step that continues the previous one (no gather)
    sched = LIFSchedule(pos)
    assert sched.continues[3] and not sched.continues[0]
    idx = torch.as_tensor(pos).unsqueeze(1).expand(T, B, k)
    x = torch.randn(T, B, k, D) * 2
    ref = multistep_neuron(x, v_reset=v_reset, ternary=ternary, index=TokenIndex(idx, N, True))
    with torch.no_grad():
        fast = multistep_neuron(x, v_reset=v_reset, ternary=ternary, index=TokenIndex(idx, N, True, sched))
    traced = multistep_neuron_static_traceable(x, 2.0, 1.0, v_reset, ternary, sched)
    assert torch.equal(fast, ref) and torch.equal(traced, ref)
    assert ref.abs().sum() > 10
    # with autograd the schedule is ignored (the hand-written BPTT path), same values
    xg = x.clone().requires_grad_()
    assert torch.equal(multistep_neuron(xg, v_reset=v_reset, ternary=ternary, index=TokenIndex(idx, N, True, sched)), ref)


def test_dense_traceable_matches_eager():
    x = torch.randn(5, 2, 7, 3) * 2
    for ternary in (False, True):
        for v_reset in (0.0, 0.3):
            assert torch.equal(multistep_neuron_traceable(x, 2.0, 1.0, v_reset, ternary),
                               multistep_neuron(x, v_reset=v_reset, ternary=ternary))


def test_plan_is_computed_once_per_masks_object_and_follows_edits():
    cfg = make_config("spikformer-tiny", prune=PruneConfig(method="stata", keep=0.5))
    masks = tw_masks(cfg, [1], 0.5)
    p1 = static_plan(masks, cfg)
    assert static_plan(masks, cfg) is p1
    masks.sites[1] = masks.sites[1].copy()
    assert static_plan(masks) is p1  # same content
    m = masks.sites[1]
    j = np.flatnonzero(m[0])[-1]
    new = np.flatnonzero(~m[0])[0]
    m[0, j], m[0, new] = False, True  # the same count, another token
    p2 = static_plan(masks, cfg)
    assert p2 is not p1 and p2.sites[1].positions[0].tolist() == np.flatnonzero(m[0]).tolist()


def test_run_torch_static_masks_uses_schedules_without_full_buffers(monkeypatch):
    """Inference with per-timestep masks never takes the full-N indexed neuron path."""
    import stata_deploy.nn.neurons as neurons

    torch.manual_seed(0)
    cfg = make_config("spikformer-tiny", prune=PruneConfig(method="stata", keep=0.5))
    model = liven_batchnorm(build_model(cfg)).eval()
    masks = tw_masks(cfg, [1], 0.5)
    calls = []
    orig = neurons._MultiStepNeuron.apply
    monkeypatch.setattr(neurons._MultiStepNeuron, "apply", lambda *a: calls.append(a[6] is not None) or orig(*a))
    res = run_torch(model, torch.rand(3, 1, 8, 8), masks)
    assert calls and not any(calls)  # only dense (slot) neurons went through the autograd function
    assert res.kept[1].shape == (cfg.T, 3, int(masks.sites[1][0].sum()))


def test_onnx_static_graph_has_constant_indices_only(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from exporters.onnx_exporter import GATHER_PREFIX, MASK_PREFIX, OnnxExporter

    torch.manual_seed(0)
    cfg = make_config("spikformer-tiny", depth=3, prune=PruneConfig(method="stata", keep=0.5, sites=[1, 2]))
    model = liven_batchnorm(build_model(cfg)).eval()
    masks = tw_masks(cfg, [1, 2], 0.5)
    out = tmp_path / "m.onnx"
    OnnxExporter().export(model, masks, out)
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"TopK", "CumSum", "GatherElements", "ScatterElements", "ScatterND", "Pow", "NonZero"}, ops
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for s, m in masks.sites.items():
        assert np.array_equal(inits[f"{MASK_PREFIX}{s}"], m)
    plan = static_plan(masks)
    for t in range(cfg.T):
        assert np.array_equal(inits[f"{GATHER_PREFIX}2_t{t}"], plan.sites[2].local[t])


def test_runtime_refuses_masks_edited_after_export(tmp_path):
    """No node reads the mask initializers: a file whose masks (and description) were edited consistently would run
    the exported indices, so the runtime refuses it."""
    import json

    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from exporters.onnx_exporter import MASK_PREFIX, META_KEY, OnnxExporter
    from runtimes.onnxruntime_runtime import OnnxRuntime
    from stata_deploy.errors import StataError

    torch.manual_seed(0)
    cfg = make_config("spikformer-tiny", prune=PruneConfig(method="stata", keep=0.5))
    model = build_model(cfg).eval()
    masks = tw_masks(cfg, [1], 0.5)
    out = tmp_path / "m.onnx"
    OnnxExporter().export(model, masks, out)
    OnnxRuntime(out)  # loads
    proto = onnx.load(str(out))
    m = masks.sites[1].copy()
    j, new = np.flatnonzero(m[0])[-1], np.flatnonzero(~m[0])[0]
    m[0, j], m[0, new] = False, True
    edited = TokenMasks({1: m}, masks.n_full, masks.T, masks.mode)
    for t in proto.graph.initializer:
        if t.name == f"{MASK_PREFIX}1":
            t.CopyFrom(onnx.numpy_helper.from_array(m, t.name))
    entry = next(e for e in proto.metadata_props if e.key == META_KEY)
    desc = json.loads(entry.value)
    desc["masks"] = edited.to_json()
    entry.value = json.dumps(desc)
    bad = tmp_path / "edited.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(StataError, match="not derived from its masks"):
        OnnxRuntime(bad)
