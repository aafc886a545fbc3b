import math

import pytest
import torch

from stata_deploy.config import PRESETS, PruneConfig, make_config
from stata_deploy.errors import ConfigError
from stata_deploy.nn.model import build_model, count_params
from stata_deploy.nn.neurons import LIF, ReLUNeuron, TernaryLIF

TINY = [p for p in PRESETS.names() if p.endswith("tiny")]


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("attention", ["ssa", "sdsa", "a2os2a"])
def test_forward_backward_every_param_gets_grad(preset, attention):
    torch.manual_seed(0)
    cfg = make_config(preset, attention=attention)
    m = build_model(cfg)
    spikes = {}
    for name, mod in m.named_modules():
        if isinstance(mod, (LIF, TernaryLIF, ReLUNeuron)):
            mod.register_forward_hook(lambda mod, i, o, name=name: spikes.__setitem__(name, (mod, o)))
    out = m(torch.rand(4, 1, 8, 8))
    assert out.logits.shape == (4, 10) and out.logits_t.shape == (cfg.T, 4, 10)
    out.logits.sum().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    for name, (mod, o) in spikes.items():
        vals = set(o.unique().tolist())
        if isinstance(mod, TernaryLIF):
            assert vals <= {-1.0, 0.0, 1.0}, name
        elif isinstance(mod, LIF):
            assert vals <= {0.0, 1.0}, name
        else:
            assert o.min() >= 0, name
    if attention == "a2os2a":
        assert any(isinstance(m_, TernaryLIF) for m_, _ in spikes.values())


@pytest.mark.parametrize("preset,expected", [("spikformer-4-384", 9.33e6), ("spikformer-8-768", 66.3e6)])
def test_paper_preset_param_counts(preset, expected):
    cfg = make_config(preset, num_classes=10 if "384" in preset else 1000)
    assert abs(count_params(build_model(cfg)) - expected) / expected < 0.01


@pytest.mark.parametrize("method", ["stata", "anchor", "random", "l1", "ssa", "tp"])
@pytest.mark.parametrize("keep", [0.2, 0.5])
def test_kept_token_counts_exact(method, keep):
    cfg = make_config("spikformer-tiny", depth=4, prune=PruneConfig(method=method, keep=keep))
    m = build_model(cfg)
    out = m(torch.rand(3, 1, 8, 8))
    k = math.ceil(keep * 64 - 1e-9)
    anchor = 1 if cfg.anchor else 0
    assert sorted(out.kept) == cfg.prune.resolved_sites(4) or method == "tp"
    n_img = 64
    for site in sorted(out.kept):
        g = out.kept[site]
        if method != "tp":
            n_img = math.ceil(keep * n_img - 1e-9)
        else:
            n_img = k
        assert g.shape == (cfg.T, 3, n_img + anchor)
        if anchor:
            assert (g[..., 0] == 0).all()  # anchor never pruned
        assert (g[..., 1:] > g[..., :-1]).all()  # distinct, ascending
    if method == "stata":
        # timestep-wise: kept sets may differ between timesteps
        assert out.kept[1].shape[0] == cfg.T


def test_stata_gradients_flow_to_kept_tokens_and_anchor():
    cfg = make_config("spikformer-tiny", prune=PruneConfig(method="stata", keep=0.3))
    m = build_model(cfg)
    out = m(torch.rand(4, 1, 8, 8))
    out.logits.sum().backward()
    assert m.anchor.grad is not None and m.anchor.grad.abs().sum() > 0
    assert m.blocks[1].mlp.fc1.linear.weight.grad.abs().sum() > 0


def test_tp_skip_path_returns_input_for_unselected_tokens():
    cfg = make_config("spikformer-tiny", prune=PruneConfig(method="tp", keep=0.25, sites=[1]))
    torch.manual_seed(0)
    m = build_model(cfg).train()  # batch statistics: an untrained net in eval mode barely spikes
    x = m.tokens(torch.rand(2, 1, 8, 8))
    y, _, sel = m._skip_block(m.blocks[1], x, 1, None, 0)
    unselected = torch.ones(x.shape[:3], dtype=torch.bool)
    unselected.scatter_(2, sel, False)
    assert torch.equal(y[unselected], x[unselected])
    assert not torch.equal(y[~unselected], x[~unselected])


@pytest.mark.parametrize("keep", [0.0, 1.7, -0.5, float("nan")])
def test_keep_out_of_range_is_config_error(keep):
    with pytest.raises(ConfigError, match="keep ratio"):
        make_config("spikformer-tiny", prune=PruneConfig(method="stata", keep=keep))


def test_alignment_losses_zero_for_identical_positive_otherwise():
    from stata_deploy.pruning.alignment import inter_alignment, intra_alignment

    same = torch.rand(1, 2, 1, 5, 5).expand(4, 2, 3, 5, 5).contiguous()
    assert intra_alignment(same).item() == 0.0
    assert intra_alignment(torch.rand(4, 2, 3, 5, 5)).item() > 0
    deep = torch.rand(4, 2, 3, 5, 5)
    assert inter_alignment([deep.clone()], deep).item() < 1e-12
    assert inter_alignment([torch.rand(4, 2, 3, 9, 9)], deep).item() > 0


def test_static_masks_reproduce_their_token_sets(digits):
    from stata_deploy.pruning.calibration import calibrate_masks

    cfg = make_config("spikformer-tiny", prune=PruneConfig(method="stata", keep=0.5))
    m = build_model(cfg).eval()
    x = torch.from_numpy(digits.x_test[:16])
    masks = calibrate_masks(m, [x])
    out = m(x, masks=masks)
    for site, mask in masks.sites.items():
        for t in range(cfg.T):
            assert out.kept[site][t, 0].tolist() == mask[t].nonzero()[0].tolist()


def test_anchor_scorers_break_ties_by_activity_never_against_the_score():
    from stata_deploy.nn.attention import AttnInfo
    from stata_deploy.pruning.scorers import SCORERS, select_topk

    T, B, H, n, dh = 2, 1, 2, 6, 4
    q = torch.zeros(T, B, H, n, dh)  # silent anchor query: every anchor score ties at 0
    k = torch.zeros(T, B, H, n, dh)
    x = torch.zeros(T, B, n, 8)
    x[:, 0, 4, :6] = 1.0  # the most active image tokens: slots 4, then 5
    x[:, 0, 5, :3] = 1.0
    x[:, 0, 1, :1] = 1.0
    info = AttnInfo(q, k, 0.125)
    for method in ("stata", "anchor"):
        scores, tw = SCORERS.get(method)(x, info)
        assert select_topk(scores, tw, T, 0.4, 1)[:, 0].tolist() == [[0, 4, 5]] * T, method
    # a strictly higher anchor score wins over any activity: the anchor attends to slot 2 at t=1 only
    q[1, 0, :, 0, 0] = 1.0
    k[1, 0, :, 2, 0] = 1.0
    scores, tw = SCORERS.get("stata")(x, AttnInfo(q, k, 0.125))
    assert select_topk(scores, tw, T, 0.4, 1)[:, 0].tolist() == [[0, 4, 5], [0, 2, 4]]


def test_score_gradient_is_the_identity_forward_and_the_straight_through_path_backward():
    from stata_deploy.nn.model import _score_gradient

    torch.manual_seed(0)
    T, B, n, D, k = 3, 2, 6, 4, 3
    x = torch.randn(T, B, k, D)
    scores = torch.randn(T, B, n, requires_grad=True)
    local = torch.stack([torch.randperm(n)[:k].sort().values for _ in range(T * B)]).reshape(T, B, k)
    y = _score_gradient(x, scores, local, True)
    assert torch.equal(y, x)  # bitwise: s - s.detach() is exactly 0
    w = torch.randn_like(x)
    (y * w).sum().backward()
    want = torch.zeros(T, B, n).scatter_(2, local, (w * x).sum(-1))  # <dL/dx_j, x_j> at kept slots, 0 elsewhere
    assert torch.allclose(scores.grad, want, atol=1e-6)
    s2 = torch.randn(B, n, requires_grad=True)  # AT: one score per token for every timestep
    _score_gradient(x, s2, local, False).mul(w).sum().backward()
    assert torch.allclose(s2.grad, want.sum(0), atol=1e-5)


@pytest.mark.parametrize("method", ["stata", "anchor"])
def test_anchor_grad_changes_only_the_gradient(method):
    """--anchor-grad: the same logits bit for bit in training mode, and a gradient that reaches the attention of
    the block before the site (the anchor's Q) which top-k alone does not give."""
    grads, logits = {}, {}
    for on in (True, False):
        torch.manual_seed(0)
        cfg = make_config("spikformer-tiny", prune=PruneConfig(method=method, keep=0.5, anchor_grad=on))
        m = build_model(cfg).train()
        torch.manual_seed(1)
        out = m(torch.rand(4, 1, 8, 8))
        out.logits.sum().backward()
        logits[on] = out.logits.detach()
        grads[on] = m.blocks[0].attn.q.linear.weight.grad.clone()
    assert torch.equal(logits[True], logits[False])
    assert not torch.equal(grads[True], grads[False])
