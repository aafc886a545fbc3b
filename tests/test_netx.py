"""lava-dl netx: `stata-deploy export --to netx` from the CLI, read back by lava-dl's own loader."""
from __future__ import annotations

import importlib.util

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from stata_deploy.cli.main import main

needs_lava_dl = pytest.mark.skipif(importlib.util.find_spec("lava.lib.dl") is None,
                                   reason="lava-dl is not installed (bash scripts/install_lava_dl.sh .venv)")


def test_export_netx_names_every_part_it_cannot_hold(base_run, tmp_path):
    out = tmp_path / "m.net"
    r = CliRunner().invoke(main, ["export", str(base_run), "--to", "netx", "--out", str(out)])
    assert r.exit_code == 2 and not out.exists()
    err = [l for l in r.output.splitlines() if l.startswith("error:")]
    assert len(err) == 1
    for part in ("stem.rpe_residual (a residual sum", "blocks.0.attn.qk (a product of two activations (qk))",
                 "blocks.1.mlp_residual", "head (the mean over tokens", "--part stem"):
        assert part in err[0], part
    r = CliRunner().invoke(main, ["export", str(base_run), "--to", "onnx", "--part", "stem", "--out", str(tmp_path / "a.onnx")])
    assert r.exit_code == 2 and "--part does not apply" in r.output


# lava-dl's loader, in a child process like every Lava use here (Lava sets the multiprocessing start method when
# imported, which fails inside a process that has already chosen one)
_LOAD = """
import json, sys
import numpy as np
from lava.lib.dl import netx
net = netx.hdf5.Network(net_config=sys.argv[1], input_message_bits=9)
w = [np.asarray(l.synapse.weight.init).tolist() for l in net.layers]
print(json.dumps({"layers": [type(l).__name__ for l in net.layers], "weights": w}))
"""


@needs_lava_dl
def test_netx_stem_loads_in_lava_dl(base_run, tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "stem.net"
    r = CliRunner().invoke(main, ["export", str(base_run), "--to", "netx", "--part", "stem", "--out", str(out),
                                  "--json"])
    assert r.exit_code == 0, r.output
    p = subprocess.run([sys.executable, "-c", _LOAD, str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["layers"] == ["Conv", "Conv", "Conv", "Conv"]  # layer 0 is a plain input: graded pixels
    with h5py.File(out, "r") as f:
        for i, w in enumerate(got["weights"], start=1):
            # lava-dl reads the file's (Co, Ci, kh, kw) torch-layout kernel into Lava's Conv layout (Co, kw, kh, Ci),
            # flipped (Lava convolves): our integer mantissas arrive unchanged
            ours = f[f"layer/{i}/weight"][()]
            assert np.array_equal(np.asarray(w), ours[:, :, ::-1, ::-1].transpose(0, 3, 2, 1)), i


# The netx stem run on Lava's bit-accurate models: one sample after another, T steps each (LIFReset every T)
_RUN = """
import sys
import numpy as np
from lava.lib.dl import netx
from lava.magma.core.run_conditions import RunSteps
from lava.magma.core.run_configs import Loihi2SimCfg
from lava.proc.io.extractor import Extractor, PyLoihiExtractorModel
from lava.proc.io.injector import Injector, PyLoihiInjectorModel

net_path, x_path, out_path = sys.argv[1:4]
x = np.load(x_path)  # (B, T, C, H, W) integer pixels
B, T = x.shape[:2]
bits = int(sys.argv[4])
net = netx.hdf5.Network(net_config=net_path, input_message_bits=bits, reset_interval=T, reset_offset=1)
inj = Injector(shape=net.inp.shape, buffer_size=4)
inj.out_port.connect(net.inp)
ext = []
for layer in net.layers:
    e = Extractor(shape=layer.out.shape, buffer_size=4)
    layer.out.connect(e.in_port)
    ext.append(e)
L = len(net.layers)
steps = (B + 1) * T  # one chunk of zeros drains the L-step lag
got = [[] for _ in ext]
cfg = Loihi2SimCfg(select_tag="fixed_pt", exception_proc_model_map={Injector: PyLoihiInjectorModel,
                                                                    Extractor: PyLoihiExtractorModel})
inj.run(condition=RunSteps(num_steps=steps, blocking=False), run_cfg=cfg)
for s in range(steps):
    b, t = divmod(s, T)
    inj.send(x[b, t].transpose(2, 1, 0) if b < B else np.zeros(net.inp.shape))  # (C, H, W) -> netx's (W, H, C)
    for i, e in enumerate(ext):
        got[i].append(e.receive())
inj.wait()
inj.stop()
res = {}
for i, seq in enumerate(got):  # layer i lags i + 1 steps (one per Conv synapse, as our Sparse)
    a = np.stack(seq[i + 1:i + 1 + B * T]).reshape(B, T, *seq[0].shape).transpose(1, 0, 4, 3, 2)
    res[f"stem.stages.{i}.lif"] = a  # (T, B, C, H, W)
np.savez(out_path, **res)
"""


@needs_lava_dl
def test_netx_stem_runs_as_our_lava_fixed_point(digits, tmp_path):
    """Round trip: the netx stem file loaded by lava-dl and run on Loihi2SimCfg(select_tag="fixed_pt") (lava-dl's
    Conv + Lava's PyLifResetModelBitAcc) gives the same spikes, layer by layer, as the stem of the whole model run
    by our Lava runtime in fixed point (Lava's PySparseModelBitAcc + PyLifResetModelBitAcc): same integers
    (stata_deploy.loihi_fixed), same timing after removing each layer's lag."""
    import subprocess
    import sys

    import torch

    from exporters.netx_exporter import NetxExporter
    from exporters.nir_exporter import NirExporter
    from runtimes.lava_runtime import LavaRuntime
    from stata_deploy.config import make_config
    from stata_deploy.nn.model import build_model
    from stata_deploy.testing import liven_batchnorm

    torch.manual_seed(0)  # a "lively" model (BatchNorm set so that every stem layer fires)
    model = liven_batchnorm(build_model(make_config("spikformer-tiny", depth=1)).eval(), 0)
    net, nirf = tmp_path / "stem.net", tmp_path / "model.nir"
    NetxExporter().export(model, None, net, part="stem")
    NirExporter().export(model, None, nirf)
    x = digits.x_test[:8]
    with LavaRuntime(nirf, precision="fixed", batch=8, timeout=300, netx_input=True) as rt:
        ours = rt.run(x)
        first = next(q for q in rt.quantisation if q["layer"] == "stem.stages.0.lif")
    with h5py.File(net, "r") as f:
        scale, bits, T = float(f.attrs["input_scale"]), int(f.attrs["input_message_bits"]), int(f.attrs["timesteps"])
        nlayers = len(f["layer"]) - 1
    assert scale == 1.0 / first["in_grid"]  # the runtime's pixel grid, chosen by the same first layer
    xi = np.rint(np.broadcast_to(x[:, None], (len(x), T, *x.shape[1:])) * scale).astype(np.int32)
    np.save(tmp_path / "x.npy", xi)
    p = subprocess.run([sys.executable, "-c", _RUN, str(net), str(tmp_path / "x.npy"), str(tmp_path / "out.npz"),
                        str(bits)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as z:
        theirs = {k: z[k] for k in z.files}
    assert len(theirs) == nlayers == 4
    mism = fired = 0
    for k, a in theirs.items():
        b = ours.spikes[k]
        assert a.shape == b.shape, (k, a.shape, b.shape)
        m = int((a != b).sum())
        print(f"{k}: {m} of {a.size} spikes differ (netx fired {int(a.sum())}, ours {int(b.sum())})")
        mism += m
        fired += int(b.sum())
    assert fired > 4000  # the stem is alive
    assert mism == 0
