"""Export to lava-dl's ``netx`` HDF5 network description (what Loihi users load with ``lava.lib.dl.netx``).

netx holds SEQUENTIAL networks of ``input`` / ``conv`` / ``dense`` / ``flatten`` layers with CUBA (Loihi LIF),
SDNN or RF neurons in fixed point. It has no residual sums, no pooling of our kind (netx raises NotImplemented for
``pool``), no product of two activations and no per-timestep token masks, so a whole spiking transformer cannot be
held: ``export(..., part="full")`` (the default) raises ``UnsupportedOpError`` naming every part netx cannot hold
(the RPE residual, each block's attention product and residuals, the token masks, the head's mean over tokens).
``part="stem"`` writes the sequential prefix netx supports: the SPS stem convolutions and their LIF neurons.
Both are lowerings of the core IR (``build_ir(model).transform(FoldBatchNorm())``): the refusal names every IR node
netx cannot hold (a table {node type -> reason}, so a new attention kind needs nothing here), the stem is the IR's
``stem.stages.{i}.conv`` / ``.lif`` nodes with their own kernel, stride and padding.

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

from exporters.nir_exporter import nir_threshold
from stata_deploy.ir.build import build_ir
from stata_deploy.ir.nodes import Add, Head, MaxPool, Neuron, Node, Product, Select, Tokens
from stata_deploy.ir.passes import FoldBatchNorm

# IR node type -> why netx cannot hold it (netx: a chain of input/dense/conv/flatten layers with CUBA neurons);
# a node type not listed here (Input, Conv, TokenLinear, BatchNorm, a LIF Neuron) maps to netx layers
_CANNOT = {
    MaxPool: lambda n: "max-pool; netx 'pool' layers are not implemented",
    Add: lambda n: "a residual sum: netx networks are sequential",
    Tokens: lambda n: "the anchor token (a constant token prepended to the sequence)" if n.anchor else None,
    Product: lambda n: f"a product of two activations ({n.kind})",
    Neuron: lambda n: None if n.kind == "lif" else f"a {n.kind} neuron (netx has CUBA neurons only)",
    Select: lambda n: "token selection (per-timestep token schedules)",
    Head: lambda n: "the mean over tokens before the classifier",
}


def unsupported_parts(graph) -> list[str]:
    """What netx cannot hold, in forward order, one line per IR node (empty: the whole graph fits)."""
    out = []
    for node in graph:
        why = _CANNOT.get(type(node), lambda n: None)(node)
        if why:
            out.append(f"{node.name} ({why})")
    return out


def _neuron(g, lif: dict) -> None:
    n = g.create_group("neuron")
    n.create_dataset("type", data=np.array([b"CUBA"]))
    n.create_dataset("iDecay", data=np.int64(lif["du"] + 1))  # netx: du = iDecay - 1
    n.create_dataset("vDecay", data=np.int64(lif["dv"]))
    n.create_dataset("vThMant", data=np.int64(lif["vth"]))
    n.create_dataset("refDelay", data=np.int64(1))
    n.create_dataset("gradedSpike", data=np.bool_(False))


def stem_layer(conv: Node, lif: Node, in_grid: float | None) -> dict:
    """One stem stage (an IR Conv with its BatchNorm folded, and its LIF Neuron) in Loihi's integers
    (``stata_deploy.loihi_fixed``, as the Lava runtime's fixed point): weight (Co, Ci, kh, kw) int, bias (Co,) int in
    netx's units (<< 6), the LIF's parameters, the report. Refuses a layer that needs a weight exponent (netx's Conv
    applies none)."""
    w = conv.weight.astype(np.float64)
    b = conv.bias.astype(np.float64) if conv.bias is not None else np.zeros(w.shape[0])
    tau, v_thr = float(lif.tau), float(nir_threshold(float(lif.v_th)))
    c = 1.0 / tau  # r = 1: the membrane takes X / tau
    sc = loihi_fixed.layer_scale(w * c, v_thr, in_grid, netx=True)
    if sc["weight_exp"] != 0:
        raise UnsupportedOpError(f"netx: this stem layer needs a weight exponent {sc['weight_exp']} (its weights are "
                                 "tiny next to its threshold); lava-dl's Conv applies none")
    lif_p, rep = loihi_fixed.lif_params(sc["q"], b * c, v_thr, tau)
    bias = np.asarray(lif_p["bias_mant"], dtype=np.int64) << (lif_p["bias_exp"] - loihi_fixed.BIAS_EXP)
    return dict(weight=loihi_fixed.quantise_weights(w * c, sc), bias=bias, lif=lif_p, in_grid=sc["in_grid"],
                kernel=conv.kernel, stride=conv.stride, padding=conv.padding, report=dict(sign_mode=sc["mode"], weight_scale=sc["g"], **rep))


def _stem_stages(graph) -> list[tuple[Node, Node]]:
    """(Conv, LIF Neuron) of every SPS stem stage, in order (the BatchNorm already folded into the Conv)."""
    stages, i, names = [], 0, {n.name for n in graph}
    while f"stem.stages.{i}.conv" in names:
        stages.append((graph.node(f"stem.stages.{i}.conv"), graph.node(f"stem.stages.{i}.lif")))
        i += 1
    return stages


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
        graph = build_ir(model).transform(FoldBatchNorm())
        if part == "full":
            raise UnsupportedOpError(
                "netx (lava-dl) holds sequential conv/dense/flatten networks with CUBA neurons only; it cannot hold: "
                + "; ".join(unsupported_parts(graph))
                + (f"; token masks at sites {sorted(masks.sites)} (per-timestep token schedules)" if masks else "")
                + ". Use --part stem (part='stem') for the sequential SPS stem, or export to NIR for the whole model")
        pools = [n.name for n in graph if isinstance(n, MaxPool) and n.name.startswith("stem.stages.")]
        if pools:
            raise UnsupportedOpError(f"netx cannot hold {', '.join(pools)} (netx 'pool' layers are not "
                                     "implemented); a stem without pooling (pool_stages=0) exports")
        out = Path(out)
        layers, quant = [], {}
        stages = [stem_layer(conv, lif, None if i == 0 else 1.0) for i, (conv, lif) in enumerate(_stem_stages(graph))]
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
            for i, q in enumerate(stages):
                H = (H + 2 * q["padding"] - q["kernel"]) // q["stride"] + 1
                gi = L.create_group(str(i + 1))
                gi.create_dataset("type", data=np.array([b"conv"]))
                gi.create_dataset("shape", data=np.array([q["weight"].shape[0], H, H]))
                gi.create_dataset("weight", data=q["weight"].astype(np.int16))
                gi.create_dataset("bias", data=q["bias"].astype(np.int32))
                gi.create_dataset("stride", data=np.array([q["stride"]] * 2))
                gi.create_dataset("padding", data=np.array([q["padding"]] * 2))
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
            "not_exported": unsupported_parts(graph),
            "notes": ["only the SPS stem is exported (netx networks are sequential)",
                      "the integers of the Lava runtime's --precision fixed (stata_deploy.loihi_fixed)",
                      f"the image enters as graded spikes round(x * {in_scale:g}) into the first conv "
                      f"(netx.hdf5.Network(..., input_message_bits={in_bits}))"],
        }
