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
    for part in ("stem.rpe", "blocks.0.attn", "blocks.1 residual sums", "head", "--part stem"):
        assert part in err[0], part
    r = CliRunner().invoke(main, ["export", str(base_run), "--to", "onnx", "--part", "stem", "--out", str(tmp_path / "a.onnx")])
    assert r.exit_code == 2 and "--part does not apply" in r.output


# lava-dl's loader, in a child process like every Lava use here (Lava sets the multiprocessing start method when
# imported, which fails inside a process that has already chosen one)
_LOAD = """
import json, sys
import numpy as np
from lava.lib.dl import netx
net = netx.hdf5.Network(net_config=sys.argv[1])
w = [np.asarray(l.synapse.weight.init).tolist() for l in net.layers[1:]]
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
    assert got["layers"] == ["Input", "Conv", "Conv", "Conv", "Conv"]
    with h5py.File(out, "r") as f:
        for i, w in enumerate(got["weights"], start=1):
            # lava-dl reads the file's (Co, Ci, kh, kw) torch-layout kernel into Lava's Conv layout (Co, kw, kh, Ci),
            # flipped (Lava convolves): our integer mantissas arrive unchanged
            ours = f[f"layer/{i}/weight"][()]
            assert np.array_equal(np.asarray(w), ours[:, :, ::-1, ::-1].transpose(0, 3, 2, 1)), i
