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
    return make_config("spikformer-tiny", **{**dict(dim=8, heads=1, depth=1, T=1, img_size=2), **kw})


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
    fc2[2, 0] = 1  # head pool: one AC per non-zero term of the token sum: (t0, c0) = 2, (t0, c1), (t3, c3) = 2,
    # (t2, c0) -> 4 ACs (not 2 + 1 + 2 + 1 = 6: adding a 2 is one add); head input nonzero channels {0, 1, 3} -> 30 MACs
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
    assert L("head.pool").acs == 4
    assert L("head").macs == 30
    assert L("blocks.0.attn.q").spikes == 4 and L("blocks.0.attn.q").neuron_updates == N * d
    assert L("blocks.0.attn.q").firing_rate == 4 / 32
    assert L("blocks.0.mlp.fc1").neuron_updates == N * d * 4
    assert r.attention_ops == 13
    assert r.acs == 96 + 3 * 32 + 16 + 160 + 40 + 4
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


def test_max_pool_compares_count_real_inputs_only():
    """3x3 / stride 2 / padding 1 max-pool: a window compares its real inputs only (padding never competes).
    Along one axis of 8 inputs the 4 windows cover 2, 3, 3, 3 real inputs; of 4 inputs, 2 windows cover 2, 3."""
    cfg = _tiny_cfg(T=2, img_size=8, pool_stages=2)  # stage 2: (4, 8, 8) -> (4, 4, 4); stage 3: (8, 4, 4) -> (8, 2, 2)
    torch.manual_seed(0)
    r = count_ops(cfg, run_torch(build_model(cfg), torch.rand(3, 1, 8, 8)))
    per_map_8 = sum(a * b - 1 for a in (2, 3, 3, 3) for b in (2, 3, 3, 3))  # 3 + 5 * 6 + 8 * 9 = 105 (not 16 * 8)
    per_map_4 = sum(a * b - 1 for a in (2, 3) for b in (2, 3))  # 3 + 5 + 5 + 8 = 21 (not 4 * 8)
    assert (per_map_8, per_map_4) == (105, 21)
    assert r.layer("stem.stages.2.pool").compares == per_map_8 * 4 * cfg.T  # per inference: x channels x T
    assert r.layer("stem.stages.3.pool").compares == per_map_4 * 8 * cfg.T
    assert r.compares == (105 * 4 + 21 * 8) * cfg.T  # unpruned: no scorer compares


# --------------------------------------------------------------------------- the torch-hook oracle
def _scorer_oracle(method, x, info, B):
    """What the model's scorer computes on its real input x (T, B, n, D) (anchor row and all) -> (acs, attention
    acs) summed over the batch, straight from pruning/scorers.py; None for a method not written out here (tp)."""
    T, _, n, _ = x.shape
    nz = lambda a: float((a != 0).sum())
    if method == "tp":
        return None
    if method == "random":
        return 0.0, 0.0
    if method == "l1":  # x.abs().sum(-1).mean(0)
        return nz(x) + T * B * n, 0.0
    H = info.q.shape[2]
    qb, kb = (info.q != 0).double(), (info.k != 0).double().transpose(-1, -2)
    if method == "ssa":  # (q.mean(queries) @ k^T).mean(heads) * scale, .mean(0)
        return nz(info.q) + T * B * H * n + T * B * n, float(((info.q.sum(3, keepdim=True) != 0).double() @ kb).sum())
    att = float((qb[:, :, :, :1] @ kb).sum())  # q_anchor @ k^T per head
    # _tie_break: act / (act.amax + 1) * c + score: per row a divide, a scale, an add; one add for + 1 (the amax's
    # n - 1 compares: test_anchor_row_is_in_the_scorer_activity_by_hand)
    if method == "stata":  # _tie_break(anchor_row(), x): mean over heads; |x| over channels; tie-break per t
        return T * B * H * n + nz(x) + T * B * (3 * n + 1), att
    if method == "anchor":  # _tie_break(anchor_row().mean(0), x.mean(0)): score and x means; |x̄|, tie-break once
        return T * B * H * n + T * B * n + nz(x) + nz(x.mean(0)) + B * (3 * n + 1), att
    raise AssertionError(f"no oracle for scorer {method!r}: write out what it computes")


def _oracle(model, x, masks=None, monkeypatch=None):
    """Per-module counts from forward hooks on the real inputs: Conv/Linear value-weighted ACs (integer rows) or
    non-zero MACs (real rows), unweighted events, attention pairs of MatMul/Hadamard/TokenSum, max-pool compares
    (real inputs per window - 1, from unfold of a ones map), the head's token sum (non-zero terms of the stream the
    head reads) and, with ``monkeypatch``, each scorer's counts from the (x, info) the model hands it."""
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

    def pool_hook(name):
        def f(mod, inp, o):
            x = inp[0]  # (TB, C, H, W)
            real = F.unfold(torch.ones(1, 1, *x.shape[-2:]), mod.kernel_size, padding=mod.padding, stride=mod.stride)
            out[name] = dict(compares=float((real.sum(1) - 1).sum()) * x.shape[0] * x.shape[1])
        return f

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook(name.rsplit(".conv", 1)[0] if name.endswith(".conv") else name)))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook(name.rsplit(".linear", 1)[0])))
        elif isinstance(m, (MatMul, Hadamard, TokenSum)):
            hooks.append(m.register_forward_hook(att_hook(name)))
        elif isinstance(m, torch.nn.MaxPool2d):
            hooks.append(m.register_forward_hook(pool_hook(name.rsplit(".pool", 1)[0])))  # stages.i.pool
    scored = []
    if monkeypatch is not None:
        finish, get = type(model)._finish, SCORERS.get

        def finish_hook(self, x, n_fixed, *a):  # the stream the head's token mean reads
            out["head.pool"] = dict(acs=float((x[:, :, n_fixed:] != 0).sum()))
            return finish(self, x, n_fixed, *a)

        def get_hook(name):
            fn = get(name)

            def scorer(x, info, **kw):
                scored.append((name, x.detach().clone(), info))
                return fn(x, info, **kw)
            return scorer

        monkeypatch.setattr(type(model), "_finish", finish_hook)
        monkeypatch.setattr(SCORERS, "get", get_hook)
    try:
        res = run_torch(model, x, masks=masks)
    finally:
        for h in hooks:
            h.remove()
        if monkeypatch is not None:
            monkeypatch.undo()
    for site, (method, sx, info) in zip(sorted(res.kept), scored):  # one scorer call per site, in block order
        o = _scorer_oracle(method, sx, info, x.shape[0])
        if o is not None:
            out[f"blocks.{site}.scorer"] = dict(acs=o[0], attention_acs=o[1])
    return res, out


CASES = [  # (attention, prune, static masks, extra config)
    ("ssa", dict(method="none"), False, {}),
    ("ssa", dict(method="none"), False, dict(pool_stages=2)),  # max-pools in the stem
    ("ssa", dict(method="stata", keep=0.5), False, {}),
    ("ssa", dict(method="stata", keep=0.5), False, dict(pool_stages=1)),
    ("ssa", dict(method="stata", keep=0.5), True, {}),
    ("ssa", dict(method="tp", keep=0.5), False, {}),
    ("ssa", dict(method="tp", keep=0.5), True, {}),
    ("sdsa", dict(method="stata", keep=0.3), True, {}),
    ("sdsa", dict(method="l1", keep=0.5), False, {}),
    ("ssa", dict(method="l1", keep=0.5), False, dict(anchor=True)),  # l1 scores the anchor row too
    ("ssa", dict(method="ssa", keep=0.5), False, dict(anchor=True)),
    ("a2os2a", dict(method="anchor", keep=0.5), False, {}),
    ("a2os2a", dict(method="ssa", keep=0.4), False, {}),
]
CASES += [(a, dict(method=m, keep=0.5) if m != "none" else dict(method=m), False, {})  # every kind x scorer
          for a in ATTENTIONS.names() for m in ["none"] + SCORERS.names()
          if not any(c[0] == a and c[1]["method"] == m and not c[2] and not c[3] for c in CASES)]


def _case_id(a, p, s, extra):
    return "-".join([a, p["method"], "static" if s else "dynamic", *(f"{k}{v}" for k, v in extra.items())])


@pytest.mark.parametrize("attention,prune,static,extra", CASES, ids=[_case_id(*c) for c in CASES])
def test_counts_match_forward_hooks(attention, prune, static, extra, monkeypatch):
    torch.manual_seed(1)
    cfg = make_config("spikformer-tiny", attention=attention, depth=3, T=3, prune=PruneConfig(**prune), **extra)
    model = build_model(cfg).eval()
    with torch.no_grad():  # livelier spikes than the init: most layers fire at 30-60 %
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.mul_(2.0)
                m.bias.uniform_(0.0, 2.5)
    x = torch.rand(2, 1, 8, 8)
    masks = calibrate_masks(model, [torch.rand(4, 1, 8, 8)]) if static else None
    res, oracle = _oracle(model, x, masks, monkeypatch)
    rep = count_ops(cfg, res, masks)
    B = x.shape[0]
    for name, o in oracle.items():
        lo = rep.layer(name)
        for f, v in o.items():
            assert getattr(lo, f) * B == pytest.approx(v, abs=1e-6), (name, f)
    n_att = sum(isinstance(m, (MatMul, Hadamard, TokenSum)) for m in model.blocks[0].attn.modules())
    n_scored = 0 if static or prune["method"] in ("none", "tp") else len(res.kept)  # tp's scorer: not written out
    assert len(oracle) == 5 + cfg.pool_stages + cfg.depth * (6 + n_att) + 2 + n_scored  # + head and head.pool
    assert oracle["blocks.2.mlp.fc1"]["events"] > 0 and oracle["blocks.2.attn.proj"]["acs"] > 0
    assert oracle["head.pool"]["acs"] > 0
    if cfg.anchor and n_scored:  # the anchor row is scored: D real terms in the activity (l1 / stata / anchor)
        assert rep.layer(f"blocks.{min(res.kept)}.scorer").acs > 0
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


def test_anchor_row_is_in_the_scorer_activity_by_hand():
    """The tie-break's activity |x| over channels covers every row the model scores, the anchor's D real entries
    too. STATA, T=1, B=1, 1 head, 5 rows (anchor + 4 tokens): written out from pruning/scorers.py."""
    cfg = make_config("spikformer-tiny", dim=8, heads=1, depth=2, T=1, img_size=2,
                      prune=PruneConfig(method="stata", keep=0.5, sites=(1,)))
    torch.manual_seed(0)
    model = liven_batchnorm(build_model(cfg).eval(), 0)
    x = torch.rand(1, 1, 2, 2)
    res = run_torch(model, x)
    r = count_ops(cfg, res)
    n, D = 5, cfg.dim
    sp = {k: torch.from_numpy(v) for k, v in res.spikes.items()}
    img = (sp["stem.stages.3.lif"] + sp["stem.rpe_lif"]).flatten(3).transpose(2, 3)  # (T, B, 4, D) tokens
    img = img + sp["blocks.0.attn.proj_lif"][:, :, 1:] + sp["blocks.0.mlp.fc2_lif"][:, :, 1:]  # block 0's adds
    image_terms = int((img != 0).sum())  # the 4 image rows' non-zero entries; the anchor row: D real entries
    q, k = res.spikes["blocks.0.attn.q_lif"], res.spikes["blocks.0.attn.k_lif"]  # (1, 1, 5, D)
    pairs = int(((q[0, 0, :1] != 0).astype(int) @ (k[0, 0] != 0).astype(int).T).sum())
    lo = r.layer("blocks.1.scorer")
    assert lo.attention_acs == pairs
    # mean over 1 head: n; activity: image rows' non-zeros + the anchor's D; tie-break act / (amax + 1) * c + score:
    # one add for + 1, then a divide, a scale and an add per row
    assert lo.acs == n + image_terms + D + 1 + 3 * n
    assert lo.compares == 4 * 2 + (n - 1)  # top-2 of 4 image rows: 4 x ceil(log2(3)); the tie-break's amax over n


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


# --------------------------------------------------------------- kept positions vs the static masks counted with
def test_kept_positions_must_match_the_static_masks():
    """Counting a run with static masks checks RunResult.kept against the masks at every site and timestep."""
    torch.manual_seed(0)
    cfg = make_config("spikformer-tiny", depth=3, anchor=True)
    model = liven_batchnorm(build_model(cfg).eval(), 0)
    x = torch.rand(2, 1, 8, 8)
    masks = random_timestep_masks(cfg, 1, 0.5, 0)
    res = run_torch(model, x, masks)
    assert count_ops(cfg, res, masks).sops > 0  # the run's own masks: fine
    other = random_timestep_masks(cfg, 1, 0.5, 1)  # same site and k, other tokens
    assert (other.sites[1] != masks.sites[1]).any()
    with pytest.raises(CountError, match=r"site 1: the run kept tokens .* at timestep \d+ \(sample 0\)"):
        count_ops(cfg, res, other)
    res.kept[1] = res.kept[1].copy()
    t, b = 2, 1  # one sample, one timestep: a kept image token replaced by one the mask drops there
    dropped = int(np.flatnonzero(~masks.sites[1][t])[0])
    res.kept[1][t, b, -1] = dropped
    res.kept[1][t, b] = np.sort(res.kept[1][t, b])
    with pytest.raises(CountError, match=rf"site 1: the run kept tokens .* at timestep {t} \(sample {b}\)"):
        count_ops(cfg, res, masks)
    res.kept[1] = res.kept[1][:, :, :-1]  # one token fewer per timestep
    with pytest.raises(CountError, match=r"site 1: the run kept \d+ tokens per timestep, its static mask keeps"):
        count_ops(cfg, res, masks)


def test_kept_positions_must_match_calibrated_skip_masks():
    """TP (skip mode) with calibrated masks: the block's selection must be the mask's as well."""
    torch.manual_seed(0)
    cfg = make_config("spikformer-tiny", depth=3, prune=PruneConfig(method="tp", keep=0.5))
    model = liven_batchnorm(build_model(cfg).eval(), 0)
    masks = calibrate_masks(model, [torch.rand(4, 1, 8, 8)])
    res = run_torch(model, torch.rand(2, 1, 8, 8), masks)
    assert count_ops(cfg, res, masks).sops > 0
    site = max(res.kept)
    res.kept[site] = np.roll(res.kept[site], 1, axis=-1)  # same tokens, not in ascending order
    with pytest.raises(CountError, match=rf"site {site}: the run kept tokens"):
        count_ops(cfg, res, masks)


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
