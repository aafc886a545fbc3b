"""Export to lava-dl's ``netx`` HDF5 network description (what Loihi users load with ``lava.lib.dl.netx``).

netx holds SEQUENTIAL networks of ``input`` / ``conv`` / ``dense`` / ``flatten`` layers with CUBA (Loihi LIF),
SDNN or RF neurons in fixed point. It has no residual sums, no pooling of our kind (netx raises NotImplemented for
``pool``), no product of two activations and no per-timestep token masks, so a whole spiking transformer cannot be
held: ``export(..., part="full")`` (the default) raises ``UnsupportedOpError`` naming every part netx cannot hold
(the RPE residual, each block's attention product and residuals, the token masks, the head's mean over tokens).
``part="stem"`` writes the sequential prefix netx supports: the SPS stem convolutions and their LIF neurons.

File layout (as ``lava.lib.dl.netx.utils.NetDict`` reads it; every value a dataset)::

    attrs    input_scale, input_message_bits, timesteps
    layer/0  type='input'  shape=(C, H, W)
    layer/i  type='conv'   shape=(C', H', W')  weight int (Co, Ci, kh, kw)  bias int (Co,)  stride, padding,
             dilation (2,)  groups ()  neuron/{type='CUBA', iDecay, vDecay, vThMant, refDelay}

Quantisation: ``stata_deploy.loihi_fixed`` (the one the Lava runtime's ``--precision fixed`` uses), so the file
holds exactly the integers our Lava runtime runs: per stem layer, BatchNorm folded as for NIR (float64), weights
w = W / tau as 8-bit mantissas filled by the largest |w| (mixed signs: even integers in [-256, 254]), no weight
exponent (Lava's ``Conv`` fixed-point model, which netx builds for conv layers, applies none: a layer that would
need one is refused), iDecay = 4096 (the current forgets each step), vDecay = round(4096 / tau), vThMant =
floor(v_threshold / q) (Loihi fires at v > vth << 6, our LIF at H >= V_th: the NIR threshold on the layer's input
quantum q), bias in a_in units (netx's bias exponent 6). The image enters as graded spikes: layer 0 is a plain
``input`` (shape only, no neuron), and the first conv reads integer pixels round(x * input_scale) with
input_message_bits bits (file attributes ``input_scale`` = 2^k, the finest grid the first layer can hold without
a weight exponent, and ``input_message_bits``): load with ``netx.hdf5.Network(net_config=FILE,
input_message_bits=..., reset_interval=T, reset_offset=1)`` to run what our runtime runs with
``LavaRuntime(..., precision="fixed", netx_input=True)`` (tests/test_netx.py). The limit: the runtime's default
takes 8-bit pixels into a first layer with a negative weight exponent (a right shift lava-dl's Conv cannot do),
so the netx file's first layer is coarser in its pixels than the runtime's default (digits' k/16 pixels: exact
from k = 4) and has less headroom.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from stata_deploy import loihi_fixed
from stata_deploy.errors import StataError, UnsupportedOpError
from stata_deploy.exporter_api import Exporter
from stata_deploy.fileio import atomic_write_bytes
from stata_deploy.pruning.masks import TokenMasks

from exporters.nir_exporter import fold_bn, nir_threshold


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


def _neuron(g, lif: dict) -> None:
    n = g.create_group("neuron")
    n.create_dataset("type", data=np.array([b"CUBA"]))
    n.create_dataset("iDecay", data=np.int64(lif["du"] + 1))  # netx: du = iDecay - 1
    n.create_dataset("vDecay", data=np.int64(lif["dv"]))
    n.create_dataset("vThMant", data=np.int64(lif["vth"]))
    n.create_dataset("refDelay", data=np.int64(1))
    n.create_dataset("gradedSpike", data=np.bool_(False))


def stem_layer(stage, in_grid: float | None) -> dict:
    """One stem stage (conv + BN + LIF) in Loihi's integers (``stata_deploy.loihi_fixed``, as the Lava runtime's
    fixed point): weight (Co, Ci, kh, kw) int, bias (Co,) int in netx's units (<< 6), the LIF's parameters, the
    report. Refuses a layer that needs a weight exponent (netx's Conv applies none)."""
    w, b = fold_bn(stage.conv.conv.weight, stage.conv.conv.bias, stage.conv.bn)
    tau, v_thr = float(stage.lif.tau), float(nir_threshold(float(stage.lif.v_th)))
    c = 1.0 / tau  # r = 1: the membrane takes X / tau
    sc = loihi_fixed.layer_scale(w * c, v_thr, in_grid, netx=True)
    if sc["weight_exp"] != 0:
        raise UnsupportedOpError(f"netx: this stem layer needs a weight exponent {sc['weight_exp']} (its weights are "
                                 "tiny next to its threshold); lava-dl's Conv applies none")
    lif, rep = loihi_fixed.lif_params(sc["q"], b * c, v_thr, tau)
    bias = np.asarray(lif["bias_mant"], dtype=np.int64) << (lif["bias_exp"] - loihi_fixed.BIAS_EXP)
    return dict(weight=loihi_fixed.quantise_weights(w * c, sc), bias=bias, lif=lif, in_grid=sc["in_grid"],
                report=dict(sign_mode=sc["mode"], weight_scale=sc["g"], **rep))


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
        layers, quant = [], {}
        stages = []
        for i, st in enumerate(model.stem.stages):
            stages.append(stem_layer(st, None if i == 0 else 1.0))
        in_scale = 1.0 / stages[0]["in_grid"]
        in_bits = int(np.log2(in_scale)) + 1  # pixels in [0, 1] -> integers 0 .. 2^k
        buf = io.BytesIO()  # h5py writes into memory; stata_deploy.fileio writes the bytes atomically
        with h5py.File(buf, "w") as f:
            f.attrs["generator"] = "stata-deploy netx exporter"
            f.attrs["scope"] = "SPS stem of " + cfg.name
            f.attrs["input_scale"] = in_scale
            f.attrs["input_message_bits"] = in_bits
            f.attrs["timesteps"] = cfg.T
            L = f.create_group("layer")
            g0 = L.create_group("0")
            g0.create_dataset("type", data=np.array([b"input"]))
            g0.create_dataset("shape", data=np.array([cfg.in_channels, cfg.img_size, cfg.img_size]))
            layers.append("input")
            H = cfg.img_size
            for i, (st, q) in enumerate(zip(model.stem.stages, stages)):
                gi = L.create_group(str(i + 1))
                gi.create_dataset("type", data=np.array([b"conv"]))
                gi.create_dataset("shape", data=np.array([q["weight"].shape[0], H, H]))
                gi.create_dataset("weight", data=q["weight"].astype(np.int16))
                gi.create_dataset("bias", data=q["bias"].astype(np.int32))
                gi.create_dataset("stride", data=np.array([1, 1]))
                gi.create_dataset("padding", data=np.array([1, 1]))
                gi.create_dataset("dilation", data=np.array([1, 1]))
                gi.create_dataset("groups", data=np.int64(1))
                _neuron(gi, q["lif"])
                layers.append(f"stem.stages.{i}")
                quant[f"stem.stages.{i}"] = q["report"]
        atomic_write_bytes(out, buf.getvalue())
        return {
            "path": str(out),
            "format": "lava-dl netx HDF5 (fixed point, CUBA neurons)",
            "layers": layers,
            "input_scale": in_scale,
            "input_message_bits": in_bits,
            "quantisation": quant,
            "not_exported": unsupported_parts(model, masks),
            "notes": ["only the SPS stem is exported (netx networks are sequential)",
                      "the integers of the Lava runtime's --precision fixed (stata_deploy.loihi_fixed)",
                      f"the image enters as graded spikes round(x * {in_scale:g}) into the first conv "
                      f"(netx.hdf5.Network(..., input_message_bits={in_bits}))"],
        }
