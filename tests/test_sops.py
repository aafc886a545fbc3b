"""The op counter: exact integers on hand-built layers, and every reconstructed layer input checked against torch
forward hooks (an independent oracle that sees the real inputs) for each attention kind and pruning mode."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stata_deploy.nn.attention import ATTENTIONS, Hadamard, MatMul, TokenSum
from stata_deploy.config import PruneConfig, make_config
from stata_deploy.inference import run_torch
from stata_deploy.nn.model import build_model
from stata_deploy.pruning.scorers import SCORERS
from stata_deploy.pruning.calibration import calibrate_masks
from stata_deploy.results import RunResult
from stata_deploy.energy.counter import CountError, OpsReport, count_ops
from stata_deploy.testing import liven_batchnorm, random_timestep_masks


# ------------------------------------------------------------------------------------------- hand-built
def _tiny_cfg(**kw):
    # dim 8, 1 head, 1 block, 2x2 image -> 4 tokens, T=1: small enough to write every spike by hand
    return make_config("spikformer-tiny", dim=8, heads=1, depth=1, T=1, img_size=2, **kw)


def _hand_result(cfg, q, k, v, attn, proj, fc1, fc2, stem_last, rpe, pixels):
    """A RunResult with hand-chosen spikes for every neuron layer of _tiny_cfg (B=1, T=1)."""
    d = cfg.dim
    z = lambda *s: np.zeros((1, 1, *s), np.float32)
    sp = {
        "stem.stages.0.lif": z(1, 2, 2), "stem.stages.1.lif": z(2, 2, 2), "stem.stages.2.lif": z(4, 2, 2),
        "stem.stages.3.lif": stem_last[None, None], "stem.rpe_lif": rpe[None, None],
        "blocks.0.attn.q_lif": q[None, None], "blocks.0.attn.k_lif": k[None, None], "blocks.0.attn.v_lif": v[None, None],
        "blocks.0.attn.attn_lif": attn[None, None], "blocks.0.attn.proj_lif": proj[None, None],
        "blocks.0.mlp.fc1_lif": fc1[None, None], "blocks.0.mlp.fc2_lif": fc2[None, None],
    }
    return RunResult(np.zeros((1, 1, 10), np.float32), sp, pixels[None, None].astype(np.float32))


def test_exact_counts_linear_and_ssa_by_hand():
    cfg = _tiny_cfg()
    d, N = 8, 4
    # residual stream after the stem: stage-3 spikes + rpe spikes -> values 0/1/2 (tokens = pixels of the 2x2 grid)
    stem_last = np.zeros((d, 2, 2), np.float32)
    rpe = np.zeros((d, 2, 2), np.float32)
    stem_last[0, 0, 0] = stem_last[1, 0, 0] = 1  # token 0: channels 0, 1
    rpe[0, 0, 0] = 1  # token 0 channel 0 -> value 2
    stem_last[3, 1, 1] = 1  # token 3: channel 3
    # token values: sum |x| = 2 + 1 + 1 = 4 -> every Linear D->D on it: 4 * 8 = 32 ACs (q, k, v each)
    q = np.zeros((N, d), np.float32)
    k = np.zeros((N, d), np.float32)
    v = np.zeros((N, d), np.float32)
    q[0, [0, 1]] = 1
    q[2, [1, 5]] = 1
    k[1, [0, 1]] = 1
    k[3, [1]] = 1
    v[1, [2, 3, 4]] = 1
    v[3, [7]] = 1
    # Q K^T pairs: per dim d colsum(q)_d * colsum(k)_d: d0: 1*1, d1: 2*2, d5: 1*0 -> 5
    # attn = Q K^T: row0 = [0, 2, 0, 1], row2 = [0, 1, 0, 1] -> nonzero columns 1 (2 rows), 3 (2 rows)
    # (Q K^T) V pairs: col 1: 2 rows x nnz(v1)=3 -> 6; col 3: 2 x nnz(v3)=1 -> 2 => 8
    attn = np.zeros((N, d), np.float32)
    attn[0, [2, 3]] = 1  # 2 spikes -> proj: 2 * 8 = 16 ACs
    proj = np.zeros((N, d), np.float32)
    proj[3, 3] = 1  # residual token 3 channel 3 becomes 2: sum |x| = 2 + 1 + 2 = 5 -> fc1: 5 * 32 = 160 ACs
    fc1 = np.zeros((N, d * 4), np.float32)
    fc1[1, :5] = 1  # 5 spikes -> fc2: 5 * 8 = 40 ACs
    fc2 = np.zeros((N, d), np.float32)
    fc2[2, 0] = 1  # head pool: |x| sum over tokens = 5 + 1 = 6 ACs; head input nonzero channels: {0, 1, 3} -> 30 MACs
    pixels = np.zeros((1, 2, 2), np.float32)
    pixels[0, 0, 0] = 0.5  # one real pixel: reaches all 4 outputs of a 2x2 3x3 conv -> 4 positions x 1 channel = 4 MACs
    r = count_ops(cfg, _hand_result(cfg, q, k, v, attn, proj, fc1, fc2, stem_last, rpe, pixels))
    L = r.layer
    assert L("stem.stages.0.conv").macs == 4 and L("stem.stages.0.conv").acs == 0
    # rpe: stage-3 spikes (3 of them, each at a corner of the 2x2 grid -> 4 outputs) x 8 channels = 96 ACs
    assert L("stem.rpe").acs == 3 * 4 * 8
    for br in "qkv":
        assert L(f"blocks.0.attn.{br}").acs == 32 and L(f"blocks.0.attn.{br}").macs == 0
    assert L("blocks.0.attn.q").events == 3 * 8  # unweighted: 3 non-zero inputs x fan-out 8
    assert L("blocks.0.attn.qk").attention_ops == 5
    assert L("blocks.0.attn.av").attention_ops == 8
    assert L("blocks.0.attn.proj").acs == 16
    assert L("blocks.0.mlp.fc1").acs == 160
    assert L("blocks.0.mlp.fc2").acs == 40
    assert L("head.pool").acs == 6
    assert L("head").macs == 30
    assert L("blocks.0.attn.q").spikes == 4 and L("blocks.0.attn.q").neuron_updates == N * d
    assert L("blocks.0.attn.q").firing_rate == 4 / 32
    assert L("blocks.0.mlp.fc1").neuron_updates == N * d * 4
    assert r.attention_ops == 13
    assert r.acs == 96 + 3 * 32 + 16 + 160 + 40 + 6
    assert r.sops == r.acs + r.macs + r.attention_ops


def test_exact_counts_sdsa_and_a2os2a_by_hand():
    d, N = 8, 4
    z = lambda *s: np.zeros(s, np.float32)
    q, k, v = z(N, d), z(N, d), z(N, d)
    q[0, [0, 3]] = 1
    q[1, [3]] = 1
    k[0, [0, 1]] = 1
    k[2, [3]] = 1
    v[0, [0]] = 1
    v[2, [3]] = 1
    v[1, [1]] = 1
    cfg = _tiny_cfg(attention="sdsa")
    attn = z(1, d)
    attn[0, 3] = 1  # kv spike at channel 3
    res = _hand_result(cfg, q, k, v, attn, z(N, d), z(N, 4 * d), z(N, d), z(d, 2, 2), z(d, 2, 2), z(1, 2, 2))
    r = count_ops(cfg, res)
    # K ⊙ V: both non-zero at (0, 0) and (2, 3) -> 2; token sum: 2 terms; Q ⊙ kv: q[:, 3] has 2 spikes -> 2
    assert r.layer("blocks.0.attn.kv").attention_ops == 2
    assert r.layer("blocks.0.attn.kv_sum").attention_ops == 2
    assert r.layer("blocks.0.attn.qkv_gate").attention_ops == 2
    assert r.layer("blocks.0.attn.proj").acs == 2 * 8  # Q ⊙ kv has 2 spikes
    assert r.layer("blocks.0.attn.kv_sum").neuron_updates == d  # one token-independent LIF per channel
    cfg = _tiny_cfg(attention="a2os2a")
    kr = z(N, d)
    kr[0, [0, 1]] = [0.5, 2.0]  # ReLU K (real)
    kr[3, [1]] = 1.5
    vt = z(N, d)
    vt[0, [0, 5]] = [1, -1]  # ternary V
    vt[3, [2]] = -1
    res = _hand_result(cfg, q, kr, vt, z(N, d), z(N, d), z(N, 4 * d), z(N, d), z(d, 2, 2), z(d, 2, 2), z(1, 2, 2))
    r = count_ops(cfg, res)
    # K^T V pairs: sum_n nnz(k_n) nnz(v_n): token 0: 2 * 2 = 4, token 3: 1 * 1 = 1 -> 5
    # K^T V non-zero rows: d0 -> {0, 5}, d1 -> {0, 5, 2} (0.5*1 and 2*1 do not cancel: d1 row = [2, 0, -1.5, .., -2])
    # Q (K^T V): q spikes at d0 (1 query) x 2 + d3 (2 queries) x 0 -> 2
    assert r.layer("blocks.0.attn.ktv").attention_ops == 5
    assert r.layer("blocks.0.attn.qktv").attention_ops == 2
    assert r.layer("blocks.0.attn.k").spikes == 3  # non-zero ReLU outputs


# --------------------------------------------------------------------------- the torch-hook oracle
def _oracle(model, x, masks=None):
    """Per-module counts from forward hooks on the real inputs: Conv/Linear value-weighted ACs (integer rows) or
    non-zero MACs (real rows), unweighted events, and attention pairs of MatMul/Hadamard/TokenSum."""
    out = {}
    hooks = []

    def conv_hook(name):
        def f(mod, inp, o):
            x = inp[0]  # (TB, C, H, W)
            ones = torch.ones(mod.out_channels, mod.in_channels, 3, 3)
            integer = (x == x.round()).flatten(1).all(1)
            w = F.conv2d(x.abs(), ones, padding=1).flatten(1).sum(1)
            nz = F.conv2d((x != 0).float(), ones, padding=1).flatten(1).sum(1)
            out[name] = dict(acs=float((w * integer).sum()), macs=float((nz * ~integer).sum()), events=float(nz.sum()))
        return f

    def linear_hook(name):
        def f(mod, inp, o):
            x = inp[0]
            integer = (x == x.round()).all(-1)
            fo = mod.out_features
            acs = float((x.abs().sum(-1) * integer).sum()) * fo
            macs = float(((x != 0).sum(-1) * ~integer).sum()) * fo
            out[name] = dict(acs=acs, macs=macs, events=float((x != 0).sum()) * fo)
        return f

    def att_hook(name):
        def f(mod, inp, o):
            if isinstance(mod, MatMul):
                n = float(((inp[0] != 0).double() @ (inp[1] != 0).double()).sum())
            elif isinstance(mod, Hadamard):
                n = float(((inp[0] != 0) & (inp[1] != 0)).sum())
            else:
                n = float((inp[0] != 0).sum())
            out[name] = dict(attention_ops=n)
        return f

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook(name.rsplit(".conv", 1)[0] if name.endswith(".conv") else name)))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook(name.rsplit(".linear", 1)[0])))
        elif isinstance(m, (MatMul, Hadamard, TokenSum)):
            hooks.append(m.register_forward_hook(att_hook(name)))
    try:
        res = run_torch(model, x, masks=masks)
    finally:
        for h in hooks:
            h.remove()
    return res, out


CASES = [  # (attention, prune, static masks)
    ("ssa", dict(method="none"), False),
    ("ssa", dict(method="stata", keep=0.5), False),
    ("ssa", dict(method="stata", keep=0.5), True),
    ("ssa", dict(method="tp", keep=0.5), False),
    ("ssa", dict(method="tp", keep=0.5), True),
    ("sdsa", dict(method="stata", keep=0.3), True),
    ("sdsa", dict(method="l1", keep=0.5), False),
    ("a2os2a", dict(method="anchor", keep=0.5), False),
    ("a2os2a", dict(method="ssa", keep=0.4), False),
]
CASES += [(a, dict(method=m, keep=0.5) if m != "none" else dict(method=m), False)  # every registered kind x scorer
          for a in ATTENTIONS.names() for m in ["none"] + SCORERS.names()
          if not any(c[0] == a and c[1]["method"] == m and not c[2] for c in CASES)]


@pytest.mark.parametrize("attention,prune,static", CASES,
                         ids=[f"{a}-{p['method']}-{'static' if s else 'dynamic'}" for a, p, s in CASES])
def test_counts_match_forward_hooks(attention, prune, static):
    torch.manual_seed(1)
    cfg = make_config("spikformer-tiny", attention=attention, depth=3, T=3, prune=PruneConfig(**prune))
    model = build_model(cfg).eval()
    with torch.no_grad():  # livelier spikes than the init: most layers fire at 30-60 %
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.mul_(2.0)
                m.bias.uniform_(0.0, 2.5)
    x = torch.rand(2, 1, 8, 8)
    masks = calibrate_masks(model, [torch.rand(4, 1, 8, 8)]) if static else None
    res, oracle = _oracle(model, x, masks)
    rep = count_ops(cfg, res, masks)
    B = x.shape[0]
    for name, o in oracle.items():
        lo = rep.layer(name)
        for f, v in o.items():
            assert getattr(lo, f) * B == pytest.approx(v, abs=1e-6), (name, f)
    n_att = sum(isinstance(m, (MatMul, Hadamard, TokenSum)) for m in model.blocks[0].attn.modules())
    assert len(oracle) == 5 + cfg.depth * (6 + n_att) + 1  # 5 stem convs, 6 Linears + products per block, head
    assert oracle["blocks.2.mlp.fc1"]["events"] > 0 and oracle["blocks.2.attn.proj"]["acs"] > 0
    # every neuron layer's updates and spikes
    for name, s in res.spikes.items():
        lo = [l for l in rep.layers if l.neuron == name]
        assert len(lo) == 1, name
        assert round(lo[0].spikes * B, 6) == float((s != 0).sum())
        assert round(lo[0].neuron_updates * B, 6) == s.size
    if prune["method"] != "none":
        assert sum(1 for l in rep.layers if l.kind == "scorer") == (0 if static else len(res.kept))
        # pruned tokens cost nothing: the fc1 of the last block sees only the kept tokens
        k_last = res.spikes["blocks.2.mlp.fc1_lif"].shape[2]
        assert k_last < cfg.num_tokens
    assert rep.neuron_updates > 0 and 0 < rep.firing_rate < 1


def test_idle_updates_for_timestep_wise_tokens():
    torch.manual_seed(0)
    cfg = make_config("spikformer-tiny", depth=2, prune=PruneConfig(method="stata", keep=0.25))
    model = build_model(cfg)
    res = run_torch(model, torch.rand(2, 1, 8, 8))
    rep = count_ops(cfg, res)
    g = res.kept[1]  # (T, B, k)
    union = sum(len(set(g[:, b].reshape(-1).tolist())) for b in range(2))
    idle_tokens = (union - 2 * g.shape[-1]) * cfg.T
    assert rep.layer("blocks.1.attn.q").idle_neuron_updates * 2 == idle_tokens * cfg.dim
    assert rep.layer("blocks.0.attn.q").idle_neuron_updates == 0


def test_pruning_reduces_ops_and_merge_and_errors():
    torch.manual_seed(0)
    base_cfg = make_config("spikformer-tiny", depth=3, T=3)
    model = build_model(base_cfg)
    x = torch.rand(4, 1, 8, 8)
    r0 = count_ops(base_cfg, run_torch(model, x))
    pcfg = base_cfg.replace(prune={"method": "l1", "keep": 0.25})
    pm = build_model(pcfg)
    pm.load_state_dict(model.state_dict(), strict=False)
    r1 = count_ops(pcfg, run_torch(pm, x))
    assert r1.layer("blocks.2.mlp.fc1").neuron_updates < r0.layer("blocks.2.mlp.fc1").neuron_updates
    assert r1.neuron_updates < r0.neuron_updates
    # merge of two half batches = the whole batch
    a = count_ops(base_cfg, run_torch(model, x[:1]))
    b = count_ops(base_cfg, run_torch(model, x[1:]))
    m = OpsReport.merge([a, b])
    assert m.samples == 4 and m.acs == pytest.approx(r0.acs) and m.attention_ops == pytest.approx(r0.attention_ops)
    d = m.to_dict()
    assert isinstance(d["layers"], list) and d["layers"][0]["name"] == "stem.stages.0.conv"
    # missing recordings are errors naming what is missing
    res = run_torch(model, x, record=False)
    with pytest.raises(CountError, match="stem.stages.0.lif"):
        count_ops(base_cfg, res)
    res = run_torch(pm, x)
    res.kept.clear()
    with pytest.raises(CountError, match="site 1"):
        count_ops(pcfg, res)


# ------------------------------------------------------------- the IR counter equals today's counter (issue 13)
def _variants():
    """(pruning method, how the run is pruned): every registered scorer, dynamic and with calibrated masks."""
    yield "none", "unpruned"
    yield "none", "random-masks"  # an unpruned model run with per-timestep masks (what the Lava tests run)
    for method in SCORERS.names():
        yield method, "dynamic"
        yield method, "calibrated"
    yield "stata", "random-masks"  # per-timestep masks, time-varying for every site token


EQUAL_CASES = [(a, m, v) for a in ATTENTIONS.names() for m, v in _variants()]


def assert_same_report(got: OpsReport, want: OpsReport):
    """Every layer: name, kind, neuron, fan-out, the same per-timestep counts (same keys) and events (1e-9 rel)."""
    assert (got.samples, got.T) == (want.samples, want.T)
    assert [l.name for l in got.layers] == [l.name for l in want.layers]
    for g, w in zip(got.layers, want.layers):
        assert (g.kind, g.neuron, g.fan_out) == (w.kind, w.neuron, w.fan_out), g.name
        assert list(g.counts_t) == list(w.counts_t), g.name
        for f in w.counts_t:
            np.testing.assert_allclose(g.counts_t[f], w.counts_t[f], rtol=1e-9, atol=0, err_msg=f"{g.name} {f}")
        assert (g.events_t is None) == (w.events_t is None), g.name
        if w.events_t is not None:
            np.testing.assert_allclose(g.events_t, w.events_t, rtol=1e-9, atol=0, err_msg=f"{g.name} events")
    assert got.sops == pytest.approx(want.sops, rel=1e-9) and got.counts() == pytest.approx(want.counts(), rel=1e-9)


@pytest.mark.parametrize("attention,method,variant", EQUAL_CASES, ids=[f"{a}-{m}-{v}" for a, m, v in EQUAL_CASES])
def test_ir_counter_equals_the_frozen_reference(attention, method, variant, digits):
    """Lively 5-block models (stata: sites 1 and 4; tp: every block from 1) on 8 digits images."""
    import _sops_reference as frozen

    if attention not in frozen.ATTENTIONS or method not in frozen.METHODS:
        pytest.skip(f"{attention}/{method} is newer than the frozen reference; the forward-hook oracle covers it")
    prune = PruneConfig(method=method, keep=0.5) if method != "none" else PruneConfig()
    anchor = variant in ("dynamic", "random-masks")  # (stata and anchor always have one)
    torch.manual_seed(0)
    cfg = make_config("spikformer-tiny", attention=attention, depth=5, anchor=anchor, prune=prune)
    model = liven_batchnorm(build_model(cfg).eval(), 0)
    x = torch.as_tensor(digits.x_test[:8])
    masks = None
    if variant == "calibrated":
        masks = calibrate_masks(model, [torch.as_tensor(digits.x_test[8:40])])
    elif variant == "random-masks":
        masks = random_timestep_masks(cfg, 1, 0.5, 0)
    res = run_torch(model, x, masks)
    want = frozen.count_ops_reference(cfg, res, masks)
    assert want.sops > 0 and (variant == "unpruned" or len(res.kept) > 0)
    assert_same_report(count_ops(cfg, res, masks), want)  # the IR counter (stata_deploy/ir/count.py)


def test_idle_updates_are_those_of_the_graph_after_drop_never_kept():
    """Counting lowers the passes: without DropNeverKept every token of the sequence keeps neurons after the site."""
    from stata_deploy.ir import structure_ir
    from stata_deploy.ir.count import count
    from stata_deploy.ir.passes import ApplyMasks, DropNeverKept

    torch.manual_seed(0)
    cfg = make_config("spikformer-tiny", depth=3, anchor=True)
    model = liven_batchnorm(build_model(cfg).eval(), 0)
    masks = random_timestep_masks(cfg, 1, 0.25, 0)
    res = run_torch(model, torch.rand(2, 1, 8, 8), masks)
    g = structure_ir(cfg).transform(ApplyMasks(masks))
    all_tokens, union_only = count(g, res), count(g.transform(DropNeverKept()), res)
    assert union_only.idle_neuron_updates == count_ops(cfg, res, masks).idle_neuron_updates
    n, union, k = cfg.num_tokens, int(masks.sites[1].any(0).sum()), masks.kept(1)
    per_token = 10 * cfg.dim  # q, k, v, attn, proj, fc2: D neurons each, fc1: 4 D (blocks 1 and 2)
    assert union_only.idle_neuron_updates == (union - k) * cfg.T * per_token * 2
    assert all_tokens.idle_neuron_updates == (n - k) * cfg.T * per_token * 2
    assert all_tokens.neuron_updates == union_only.neuron_updates and all_tokens.sops == union_only.sops
