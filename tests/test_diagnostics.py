"""The study's diagnostics measure what they say (benchmarks/alignment_diagnostics.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from stata_deploy.config import PruneConfig, make_config  # noqa: E402
from stata_deploy.nn.model import build_model  # noqa: E402
from stata_deploy.testing import liven_batchnorm  # noqa: E402


def _model(intra=1e-2, inter=1e-2):
    torch.manual_seed(0)
    cfg = make_config("spikformer-tiny", depth=3, prune=PruneConfig("stata", 0.5, align=["intra", "inter"],
                                                                    intra_weight=intra, inter_weight=inter))
    return liven_batchnorm(build_model(cfg).eval(), 0)


def test_alignment_gradients_scale_with_their_weight_and_leave_the_model_as_it_was():
    from alignment_diagnostics import diagnose

    x = torch.rand(16, 1, 8, 8).numpy()
    y = np.arange(16) % 10
    m1 = _model()
    before = {k: v.clone() for k, v in m1.state_dict().items()}
    a = diagnose(m1, x, y, 0.1)
    assert all(torch.equal(v, m1.state_dict()[k]) for k, v in before.items())  # measured, not trained
    assert "_finish" not in vars(m1)  # the capture hook is gone
    b = diagnose(_model(10.0, 10.0), x, y, 0.1)
    assert a["intra"] > 0 and a["inter"] > 0 and a["g_ce"] > 0 and a["sites"] == b["sites"]
    assert (a["intra"], a["inter"], a["ce"]) == pytest.approx((b["intra"], b["inter"], b["ce"]))  # same model
    # the weighted gradient is linear in its weight: x 1000
    assert b["g_intra/g_ce"] == pytest.approx(1000 * a["g_intra/g_ce"], rel=1e-6)
    assert b["g_inter/g_ce"] == pytest.approx(1000 * a["g_inter/g_ce"], rel=1e-6)
    assert 0 <= a["zero_maps"] <= 1
