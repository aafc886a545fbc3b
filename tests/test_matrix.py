"""Every registered attention kind x exporter x runtime that reads the exporter's file: the same spikes as torch.

The matrix is built from the registries (a new attention kind, exporter or runtime joins it automatically). Models
are tiny, "lively" (every layer fires) and pruned by random per-timestep masks at block 1 with the anchor token, so
the per-timestep token schedule is exercised everywhere. netx cannot hold a whole transformer: its cell asserts the
clear refusal naming the attention.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from stata_deploy.nn.attention import ATTENTIONS
from stata_deploy.registry import EXPORTERS, RUNTIMES

READS = {".onnx": ("onnxruntime",), ".nir": ("nir", "lava"), ".net": ()}  # suffix -> runtimes reading such files
OPTIONS = {"lava": {"batch": 8, "timeout": 300}}
AVAILABLE = {"lava": importlib.util.find_spec("lava") is not None,
             "onnxruntime": importlib.util.find_spec("onnxruntime") is not None}


def _cells():
    for att in ATTENTIONS.names():
        for exp in EXPORTERS.names():
            suffix = EXPORTERS.get(exp).suffix
            assert suffix in READS, f"exporter {exp!r} ({suffix}) is missing from this matrix's READS"
            runtimes = [r for r in READS[suffix] if r in RUNTIMES.names()] or [None]
            for rt in runtimes:
                yield pytest.param(att, exp, rt, id=f"{att}-{exp}-{rt or 'refused'}")


@pytest.fixture(scope="module")
def models():
    from stata_deploy.config import make_config
    from stata_deploy.nn.model import build_model
    from stata_deploy.testing import liven_batchnorm, random_timestep_masks

    out = {}
    for att in ATTENTIONS.names():
        torch.manual_seed(0)
        model = liven_batchnorm(build_model(make_config("spikformer-tiny", attention=att, anchor=True)).eval(), 0)
        out[att] = (model, random_timestep_masks(model.cfg, 1, 0.5, 0))
    return out


@pytest.mark.parametrize("att,exp,rt", list(_cells()))
def test_same_spikes_as_torch(att, exp, rt, models, digits, tmp_path):
    from stata_deploy.errors import UnsupportedOpError
    from stata_deploy.inference import run_torch

    model, masks = models[att]
    exporter = EXPORTERS.get(exp)()
    path = tmp_path / f"m{exporter.suffix}"
    if rt is None:  # no runtime reads this format: the export of a whole transformer must be refused clearly
        with pytest.raises(UnsupportedOpError, match=r"blocks\.0\.attn\.\w+ \(a product of two activations \(\w+\)\)"):
            exporter.export(model, masks, path)
        assert not path.exists()
        return
    if not AVAILABLE.get(rt, True):
        pytest.skip(f"the {rt} runtime's package is not installed")
    exporter.export(model, masks, path)
    x = digits.x_test[:8]
    ref = run_torch(model, torch.as_tensor(x), masks)
    with RUNTIMES.get(rt)(path, **OPTIONS.get(rt, {})) as runtime:
        got = runtime.run(x)
    assert set(got.spikes) == set(ref.spikes)
    fired = 0
    for k, a in ref.spikes.items():
        b = got.spikes[k]
        assert a.shape == b.shape, k
        if np.isin(a, (-1, 0, 1)).all():
            assert int((a != b).sum()) == 0, f"{k}: {int((a != b).sum())} spikes differ"
        else:  # A2OS2A's ReLU K is real-valued
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=k)
        fired += int((a != 0).sum())
    assert fired > 1000  # a real comparison: the model fires
    assert (got.predictions == ref.predictions).all()
