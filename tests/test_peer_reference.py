"""The SpikingJelly Spikformer of benchmarks/peer_speed.py (benchmarks/_sj_spikformer.py) against our model.

Without SpikingJelly (CI does not install it) the reference runs with ``TorchLIF``, LIFNode's equations in plain
torch: that checks the wiring (shapes, parameter count, logits and every spike with our weights copied in). With
SpikingJelly 2.0.0 (``bash scripts/install_peers.sh .venv``) the same checks run on the real ``LIFNode``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _sj_spikformer as R  # noqa: E402

from stata_deploy.config import make_config  # noqa: E402
from stata_deploy.nn import neurons  # noqa: E402
from stata_deploy.nn.model import build_model, count_params  # noqa: E402
from stata_deploy.testing import liven_batchnorm  # noqa: E402

needs_sj = pytest.mark.skipif(importlib.util.find_spec("spikingjelly") is None,
                              reason="SpikingJelly is not installed (bash scripts/install_peers.sh .venv)")

# tiny, with max-pools and 3 input channels (the 4-384 stem's structure at 8x8)
TINY = dict(preset="spikformer-tiny", pool_stages=1, in_channels=3, img_size=8)


def _pair(neuron, anchor=False, **kw):
    kw = {**TINY, **kw}
    cfg = make_config(kw.pop("preset"), anchor=anchor, **kw)
    torch.manual_seed(0)
    ours = liven_batchnorm(build_model(cfg))
    ref = R.from_config(cfg, neuron=neuron)
    return cfg, ours, ref


def _batch(cfg, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, cfg.in_channels, cfg.img_size, cfg.img_size, generator=g)
    return x, torch.randint(0, cfg.num_classes, (n,), generator=g)


def test_constants_are_ours():
    assert (R.TAU, R.V_TH, R.V_RESET, R.ATTN_V_TH, R.ALPHA) == (
        neurons.TAU, neurons.V_TH, neurons.V_RESET, neurons.ATTN_V_TH, neurons.ALPHA)


@pytest.mark.parametrize("preset", ["spikformer-tiny", "spikformer-4-384"])
def test_same_parameter_count_and_output_shape(preset):
    cfg = make_config(preset)
    ours, ref = build_model(cfg), R.from_config(cfg, neuron=R.torch_lif)
    assert count_params(ref) == count_params(ours)
    x = torch.rand(1, cfg.in_channels, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        logits, logits_t = R.run(ref.eval(), x)
        out = ours.eval()(x)
    assert logits.shape == out.logits.shape == (1, cfg.num_classes)
    assert logits_t.shape == out.logits_t.shape == (cfg.T, 1, cfg.num_classes)


def test_copy_weights_refuses_a_model_with_an_anchor():
    _, ours, ref = _pair(R.torch_lif, anchor=True)
    with pytest.raises(ValueError, match="length"):
        R.copy_weights(ours, ref)


def _check_parity(neuron):
    cfg, ours, ref = _pair(neuron)
    R.copy_weights(ours, ref)
    x, y = _batch(cfg)
    for labels in (None, y):  # eval (running statistics), then train mode with gradients
        r = R.parity(ours, ref, x, labels)
        assert r["layers"] == (19, 19)
        assert 0.05 < r["spike_rate"] < 0.95  # every layer's spikes are compared, not mostly zeros
        assert r["mismatches"] == 0, r
        assert r["max_logit_diff"] == 0.0, r
        if labels is not None:
            assert r["max_rel_grad_diff"] < 1e-4, r


def test_wiring_matches_ours_with_the_plain_torch_lif():
    _check_parity(R.torch_lif)


def test_parity_detects_a_different_threshold():
    cfg, ours, ref = _pair(lambda th: R.TorchLIF(th * 1.25))
    R.copy_weights(ours, ref)
    r = R.parity(ours, ref, _batch(cfg)[0])
    assert r["mismatches"] > 0 and r["max_logit_diff"] > 0


@needs_sj
def test_spikingjelly_lifnode_matches_ours():
    _check_parity(None)


@needs_sj
def test_spikingjelly_state_is_reset_between_runs():
    cfg, ours, ref = _pair(None)
    R.copy_weights(ours, ref)
    ref.eval()
    x, _ = _batch(cfg)
    with torch.no_grad():
        a = R.run(ref, x)[1]
        b = R.run(ref, x)[1]
        c = ref(x)[1]
        d = ref(x)[1]  # no reset_net before: starts from the membranes c left behind
        R.reset(ref)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(c, d)
