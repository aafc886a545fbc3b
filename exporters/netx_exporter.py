"""Export to lava-dl's ``netx`` HDF5 network description (what Loihi users load with ``lava.lib.dl.netx``).

netx holds SEQUENTIAL networks of ``input`` / ``conv`` / ``dense`` / ``flatten`` layers with CUBA (Loihi LIF),
SDNN or RF neurons in fixed point. It has no residual sums, no pooling of our kind (netx raises NotImplemented for
``pool``), no product of two activations and no per-timestep token masks, so a whole spiking transformer cannot be
held: ``export(..., part="full")`` (the default) raises ``UnsupportedOpError`` naming every part netx cannot hold
(the RPE residual, each block's attention product and residuals, the token masks, the head's mean over tokens).
``part="stem"`` writes the sequential prefix netx supports: the SPS stem convolutions and their LIF neurons.

File layout (as ``lava.lib.dl.netx.utils.NetDict`` reads it; every value a dataset)::

    layer/0  type='input'  shape=(C, H, W)  neuron/{type='CUBA', iDecay, vDecay, vThMant, refDelay}
    layer/i  type='conv'   shape=(C', H', W')  weight int (Co, Ci, kh, kw)  bias int (Co,)  stride, padding,
             dilation (2,)  groups ()  neuron/{...}

Our LIF -> CUBA mapping (fixed point, weight scale 2**6 as slayer uses): with tau = 2 our update is
``V = V (1 - 1/tau) + X / tau``; CUBA is ``u = u (1 - iDecay/4096) + W s``, ``v = v (1 - vDecay/4096) + u + b``. So
iDecay = 4096 (the current does not persist), vDecay = 4096 / tau, weight mantissas round(64 W / tau) as 8-bit
signed integers (clipped to [-256, 254], netx's range), bias round(64 b / tau), vThMant = round(64 V_th). BatchNorm
is folded first. Two deviations are stated, not hidden: Loihi fires at v > vth (ours: H >= V_th), and the input
layer of netx is a neuron layer, whereas our first convolution takes the real-valued pixels (a graded input).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from stata_deploy.errors import StataError, UnsupportedOpError
from stata_deploy.exporter_api import Exporter
from stata_deploy.fileio import atomic_write_bytes
from stata_deploy.pruning.masks import TokenMasks

W_SCALE = 64  # 2**6: fixed-point scale of weights, biases and thresholds
WMIN, WMAX = -256, 254  # netx's optimize_weight_bits range


def _f64(a) -> np.ndarray:
    return a.detach().cpu().double().numpy()


def _fold(conv, bn):
    w = _f64(conv.weight)
    b = _f64(conv.bias) if conv.bias is not None else np.zeros(w.shape[0])
    s = _f64(bn.weight) / np.sqrt(_f64(bn.running_var) + bn.eps)
    return w * s.reshape(-1, 1, 1, 1), (b - _f64(bn.running_mean)) * s + _f64(bn.bias)


def unsupported_parts(model, masks: TokenMasks | None) -> list[str]:
    """What netx cannot hold, in forward order (empty: the whole model fits)."""
    cfg = model.cfg
    parts = [f"stem.stages.{i}.pool (max-pool; netx 'pool' layers are not implemented)"
             for i, st in enumerate(model.stem.stages) if st.pool is not None]
    parts.append("stem.rpe (residual sum x + RPE(x): netx networks are sequential)")
    if cfg.anchor:
        parts.append("anchor token (a constant token prepended to the sequence)")
    names = {"ssa": "SSA: (Q K^T) V, a product of two activations", "sdsa": "SDSA: Q * sum(K * V), Hadamard products",
             "a2os2a": "A2OS2A: Q (K^T V), a product of two activations with ReLU/ternary neurons"}
    for i in range(cfg.depth):
        parts.append(f"blocks.{i}.attn ({names[cfg.attention]})")
        parts.append(f"blocks.{i} residual sums")
    if masks is not None:
        parts.append(f"token masks at sites {sorted(masks.sites)} (per-timestep token schedules)")
    parts.append("head (mean over tokens before the classifier)")
    return parts


def _neuron(g, v_th: float, tau: float) -> None:
    n = g.create_group("neuron")
    n.create_dataset("type", data=np.array([b"CUBA"]))
    n.create_dataset("iDecay", data=np.int64(4096))
    n.create_dataset("vDecay", data=np.int64(round(4096 / tau)))
    n.create_dataset("vThMant", data=np.int64(round(W_SCALE * v_th)))
    n.create_dataset("refDelay", data=np.int64(1))
    n.create_dataset("gradedSpike", data=np.bool_(False))


def _quant(a: np.ndarray, tau: float) -> tuple[np.ndarray, float]:
    q = np.round(a * W_SCALE / tau)
    clipped = float(np.mean((q < WMIN) | (q > WMAX)))
    return np.clip(q, WMIN, WMAX).astype(np.int16), clipped


class NetxExporter(Exporter):
    name = "netx"
    suffix = ".net"
    accepts = ("part",)

    def export(self, model, masks: TokenMasks | None, out: Path, **options) -> dict:
        import h5py

        part = options.get("part", "full")
        if part not in ("full", "stem"):
            raise StataError(f"netx export part must be 'full' or 'stem', got {part!r}")
        cfg = model.cfg
        if part == "full":
            raise UnsupportedOpError(
                "netx (lava-dl) holds sequential conv/dense/flatten networks with CUBA neurons only; it cannot hold: "
                + "; ".join(unsupported_parts(model, masks))
                + ". Use --part stem (part='stem') for the sequential SPS stem, or export to NIR for the whole model")
        pools = [f"stem.stages.{i}.pool" for i, st in enumerate(model.stem.stages) if st.pool is not None]
        if pools:
            raise UnsupportedOpError(f"netx cannot hold {', '.join(pools)} (netx 'pool' layers are not "
                                     "implemented); a stem without pooling (pool_stages=0) exports")
        out = Path(out)
        layers, clipped = [], {}
        buf = io.BytesIO()  # h5py writes into memory; stata_deploy.fileio writes the bytes atomically
        with h5py.File(buf, "w") as f:
            f.attrs["generator"] = "stata-deploy netx exporter"
            f.attrs["scope"] = "SPS stem of " + cfg.name
            L = f.create_group("layer")
            g0 = L.create_group("0")
            g0.create_dataset("type", data=np.array([b"input"]))
            g0.create_dataset("shape", data=np.array([cfg.in_channels, cfg.img_size, cfg.img_size]))
            _neuron(g0, 1.0, 2.0)
            layers.append("input")
            H = cfg.img_size
            for i, st in enumerate(model.stem.stages):
                w, b = _fold(st.conv.conv, st.conv.bn)
                gi = L.create_group(str(i + 1))
                gi.create_dataset("type", data=np.array([b"conv"]))
                gi.create_dataset("shape", data=np.array([w.shape[0], H, H]))
                wq, cw = _quant(w, st.lif.tau)
                bq, cb = _quant(b, st.lif.tau)
                gi.create_dataset("weight", data=wq)
                gi.create_dataset("bias", data=bq)
                gi.create_dataset("stride", data=np.array([1, 1]))
                gi.create_dataset("padding", data=np.array([1, 1]))
                gi.create_dataset("dilation", data=np.array([1, 1]))
                gi.create_dataset("groups", data=np.int64(1))
                _neuron(gi, st.lif.v_th, st.lif.tau)
                layers.append(f"stem.stages.{i}")
                clipped[f"stem.stages.{i}"] = max(cw, cb)
        atomic_write_bytes(out, buf.getvalue())
        return {
            "path": str(out),
            "format": "lava-dl netx HDF5 (fixed point, CUBA neurons)",
            "layers": layers,
            "weight_scale": W_SCALE,
            "clipped_fraction": clipped,
            "not_exported": unsupported_parts(model, masks),
            "notes": ["only the SPS stem is exported (netx networks are sequential)",
                      "Loihi CUBA fires at v > vth, ours at H >= V_th: exact ties differ",
                      "netx's input layer is a neuron layer; our first conv takes graded (real) pixels"],
        }
