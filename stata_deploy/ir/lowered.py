"""The lowered dialect of the IR: what a ``.nir`` file holds, one typed node per NIR node.

nodes.py describes the network as the model computes it (token rows, Select, Product, ...); the NIR exporter lowers
that graph to NIR's primitives (token rows become Conv1d over a token axis, the AND of two spike trains a threshold
gate, ...). This module is the graph a NIR file *is*, read back (``runtimes/nir_graph.py``: nir -> ``Graph`` here),
executed by the numpy executor and lowered to Lava processes (``runtimes/lava_runtime.py``), each through a table
keyed by node type. What NIR cannot express travels beside the NIR graph as host operations, and a host operation's
node *is* a core IR node: a ``nodes.Product`` or a ``nodes.Neuron`` (relu, ternary), with its equation and checks.

Shapes are per sample and per timestep, in NIR's layout: feature maps (C, H, W), token rows (D, n) (tokens on the
last axis), token maps (D, g, g). Every node's input is the SUM of the outputs of ``Graph.inputs[name]`` at the same
timestep (NIR: several edges into one node are summed); there is no synaptic delay. A node with ``tokens = sid``
belongs to token segment ``Graph.segments[sid]``: at timestep t its output is multiplied by that segment's schedule
along the last axis, and a LIF neuron of a masked token gets no input (its membrane decays, it cannot spike).

Arrays are read-only float64 copies (NIR stores float32; float64 keeps sums of products exact for the executor).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from .nodes import NEURON_KINDS, PRODUCT_SHAPES, Neuron, Node, Product, Shape

LAYOUTS = ("grid", "tokens", "grid_tokens", "single")  # how a recorded node maps to RunResult.spikes' slot layout


@dataclass(frozen=True, eq=False, kw_only=True)
class Lowered(Node):
    """Base of the lowered nodes: the output shape and how the output is read back."""

    shape: Shape  # per-sample output shape
    layer: str | None = None  # torch module name the output is recorded under (RunResult.spikes key)
    layout: str | None = None  # one of LAYOUTS: how ``layer`` is recorded
    tokens: str | None = None  # token segment id: last axis = that segment's tokens, masked per timestep
    role: str | None = None  # the exporter's note: "gate", "host_port", "host_result", "seg_in", "seg_out", ...
    kind: ClassVar[str] = ""  # short name of the node type (summaries, messages)

    def check(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < 1 for s in self.shape):
            self.fail(f"shape must have positive sides, got {self.shape}")
        if self.layer is not None and self.layout is not None and self.layout not in LAYOUTS:
            self.fail(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        for k, v in vars(self).items():
            if isinstance(v, np.ndarray) and v.dtype.kind in "fc" and not np.isfinite(v).all():
                self.fail(f"parameter {k!r} contains NaN or infinite values ({int((~np.isfinite(v)).sum())} of "
                          f"{v.size})")
        self.check_params()

    def check_params(self) -> None:
        """Node-type checks of the parameters (raise IRError via ``fail``)."""


@dataclass(frozen=True, eq=False, kw_only=True)
class InputPort(Lowered):
    """x[t] = the value fed at timestep t: the encoded image (``Graph.input``), a host operation's result
    (``role == "host_result"``) or, in a ``--split`` segment file, the previous segment's output."""

    kind: ClassVar[str] = "input"


@dataclass(frozen=True, eq=False, kw_only=True)
class OutputPort(Lowered):
    """y[t] = the sum of its inputs: the logits (``Graph.logits``), an operand of a host operation, or, in a
    segment file, what the next segment reads."""

    kind: ClassVar[str] = "output"


@dataclass(frozen=True, eq=False, kw_only=True)
class Affine(Lowered):
    """y = W @ x + b over the LAST axis. W (..., out, in): leading axes are per-position batch axes (NIR's rule:
    input_type = W.shape[:-2] + (in,)); b broadcasts to the output shape. (nir.Linear: b = 0.)"""

    kind: ClassVar[str] = "affine"

    weight: np.ndarray
    bias: np.ndarray

    def check_params(self):
        if self.weight.ndim < 2:
            self.fail(f"weight must be (..., out, in), got shape {self.weight.shape}")


@dataclass(frozen=True, eq=False, kw_only=True)
class Conv1d(Lowered):
    """y = conv1d(x, weight, bias, stride, padding, dilation, groups) (torch semantics, cross-correlation):
    (Ci, L) -> (Co, L'). The exporter's token rows: a 1-wide kernel is a per-token linear, one-hot kernels re-order
    or crop tokens."""

    kind: ClassVar[str] = "conv1d"

    weight: np.ndarray  # (Co, Ci / groups, k)
    bias: np.ndarray | None  # (Co,)
    stride: int
    padding: int
    dilation: int
    groups: int
    in_len: int | None = None  # L, when the file says

    def check_params(self):
        if self.weight.ndim != 3:
            self.fail(f"weight must be (Co, Ci/groups, k), got shape {self.weight.shape}")


@dataclass(frozen=True, eq=False, kw_only=True)
class Conv2d(Lowered):
    """y = conv2d(x, weight, bias, stride, padding, dilation, groups) (torch semantics, cross-correlation, zero
    padding): (Ci, H, W) -> (Co, H', W'). Stem convs, and over a (D, g, g) token map: per-token linear (1x1),
    token sum / broadcast / head ((g, g) kernels)."""

    kind: ClassVar[str] = "conv2d"

    weight: np.ndarray  # (Co, Ci / groups, kh, kw)
    bias: np.ndarray | None  # (Co,)
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    in_hw: tuple[int, int] | None = None  # (H, W), when the file says

    def check_params(self):
        if self.weight.ndim != 4:
            self.fail(f"weight must be (Co, Ci/groups, kh, kw), got shape {self.weight.shape}")


@dataclass(frozen=True, eq=False, kw_only=True)
class SumPool2d(Lowered):
    """y[c] = the sum of x[c] over each kernel window (zero padding): the exporter's OR of max-pooled spikes is
    a sum pool followed by a threshold gate."""

    kind: ClassVar[str] = "sumpool2d"

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True, eq=False, kw_only=True)
class Flatten(Lowered):
    """y = x reshaped: the per-sample dims start_dim..end_dim merged (``in_shape`` -> ``shape``)."""

    kind: ClassVar[str] = "flatten"

    start_dim: int
    end_dim: int
    in_shape: Shape = ()


@dataclass(frozen=True, eq=False, kw_only=True)
class LIF(Lowered):
    """NIR's LIF, forward Euler with step dt (``tau_steps`` = tau / dt), per element:

        H[t] = V[t-1] + (r X[t] - (V[t-1] - v_leak)) / tau_steps
        S[t] = H[t] > v_threshold          (NIR's rule, compared in float32: the exporter writes the float32 below
                                            the model's V_th, so this is the model's H >= V_th)
        V[t] = v_reset where S[t] else H[t]

    tau_steps == 1 makes it memoryless (H = v_leak + r X): the exporter's threshold GATE (``role == "gate"``: the
    AND of two binary spike trains is gate(a + b) with threshold 1.5). All parameters have the node's shape.
    """

    kind: ClassVar[str] = "lif"

    tau: np.ndarray
    tau_steps: np.ndarray
    r: np.ndarray
    v_leak: np.ndarray
    v_reset: np.ndarray
    v_threshold: np.ndarray

    def check_params(self):
        if (self.tau <= 0).any():
            self.fail("LIF time constant tau must be positive")

    @property
    def v_threshold32(self) -> np.ndarray:
        """The threshold as the float32 NIR stores (the executor compares in float32)."""
        return self.v_threshold.astype(np.float32)


# ------------------------------------------------------------------------------------------- writing NIR
def _nir_writers() -> dict:
    """lowered node type -> f(node) -> its nir node: how the NIR exporter writes (and ``runtimes.nir_graph`` writes
    back) a graph; ``runtimes.nir_graph`` reads with the inverse table (nir.Linear reads as an Affine, zero bias)."""
    import nir

    return {
        InputPort: lambda n: nir.Input(input_type={"input": np.array(n.shape)}),
        OutputPort: lambda n: nir.Output(output_type={"output": np.array(n.shape)}),
        Affine: lambda n: nir.Affine(weight=np.array(n.weight), bias=np.array(n.bias)),
        Conv2d: lambda n: nir.Conv2d(input_shape=n.in_hw, weight=np.array(n.weight), stride=n.stride,
                                     padding=n.padding, dilation=n.dilation, groups=n.groups, bias=np.array(n.bias)),
        Conv1d: lambda n: nir.Conv1d(input_shape=n.in_len, weight=np.array(n.weight), stride=n.stride,
                                     padding=n.padding, dilation=n.dilation, groups=n.groups, bias=np.array(n.bias)),
        SumPool2d: lambda n: nir.SumPool2d(kernel_size=np.array(n.kernel), stride=np.array(n.stride),
                                           padding=np.array(n.padding)),
        Flatten: lambda n: nir.Flatten(input_type={"input": np.array(n.in_shape)}, start_dim=n.start_dim,
                                       end_dim=n.end_dim),
        LIF: lambda n: nir.LIF(tau=np.array(n.tau), r=np.array(n.r), v_leak=np.array(n.v_leak),
                               v_reset=np.array(n.v_reset), v_threshold=np.array(n.v_threshold)),
    }


def to_nir_graph(nodes: dict[str, Lowered], edges, metadata: dict):
    """A nir.NIRGraph of lowered nodes: each written by its type's writer with its recording fields (layer, layout,
    tokens, role) as node metadata; ``edges`` (src, dst) pairs; ``metadata`` the graph's."""
    import nir

    writers = _nir_writers()
    out = {}
    for name, op in nodes.items():
        node = writers[type(op)](op)
        md = {k: getattr(op, k) for k in ("layer", "layout", "tokens", "role") if getattr(op, k) is not None}
        if md:
            node.metadata = md
        out[name] = node
    return nir.NIRGraph(nodes=out, edges=list(edges), metadata=metadata)


def write_nir(graph, path) -> Path:
    """nir.write of a nir.NIRGraph into memory (h5py), then one atomic write: a full disk is one error, never a
    crash in HDF5 or a half-written file (the exporter's files and ``runtimes.nir_graph.write_graph``)."""
    import nir

    from ..fileio import write_via_buffer

    return write_via_buffer(Path(path), lambda buf: nir.write(buf, graph))


# ------------------------------------------------------------------------------------------- host operations
HOST_NODE_TYPES = (Product, Neuron)  # a host operation's node: an IR Product, or a relu / ternary Neuron


def host_node(name: str, kind: str, attrs: dict) -> Product | Neuron:
    """The core IR node of a host operation of ``kind`` with the exporter's ``attrs`` (the node's fields).
    Raises IRError for fields out of range, KeyError for a kind that is neither a Product nor a Neuron kind."""
    if kind in PRODUCT_SHAPES:
        allowed = {"heads", "scale"}
        cls = Product
    elif kind in NEURON_KINDS and kind != "lif":  # a LIF is a NIR node, never a host operation
        allowed = {"tau", "v_th", "v_reset"}
        cls = Neuron
    else:
        raise KeyError(kind)
    extra = sorted(set(attrs) - allowed)
    if extra:
        raise TypeError(f"unknown attrs {extra} for a {kind} host operation (known: {sorted(allowed)})")
    return cls(name=name, kind=kind, **attrs)


@dataclass(frozen=True)
class HostOp:
    """An IR node NIR cannot express, computed beside the NIR graph. It reads NIR output ports or earlier host
    operations' results (``inputs``, in argument order) and, when a NIR node reads its result, writes the input
    port ``output`` (None: read by other host operations only). ``tokens``: the token segment of its token rows
    (its result is masked by the schedule at t; a neuron's masked tokens get no input). ``layer``: the torch
    module name its result is recorded under (neurons)."""

    node: Product | Neuron  # the IR node: its kind, fields and equation
    inputs: tuple[str, ...]
    output: str | None
    tokens: str | None = None
    layer: str | None = None

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def kind(self) -> str:
        return self.node.kind


# ------------------------------------------------------------------------------------------------ the graph
@dataclass(frozen=True)
class TokenSegment:
    """The n tokens a part of the graph carries: their positions in the full sequence (graph order) and the static
    schedule of which of them are kept at each timestep."""

    sid: str
    site: int | None  # pruning site (block index) that opened this segment; None: all tokens
    positions: np.ndarray  # (n,) positions in the full token sequence
    schedule: np.ndarray  # (T, n) bool: kept at timestep t


@dataclass(frozen=True)
class Graph:
    """A lowered network: ``ops`` in topological order, each reading the sum of ``inputs[name]``; the host
    operations; the token segments; and what the file's description says about ports, sites and token order."""

    ops: dict[str, Lowered]
    inputs: dict[str, tuple[str, ...]]  # node name -> the nodes whose outputs it sums
    host_ops: tuple[HostOp, ...]
    segments: dict[str, TokenSegment]
    T: int
    dt: float
    input: str | None  # the image input port
    logits: str | None  # the logits output port
    meta: dict  # the exporter's JSON description (config, masks, host ops, ...)
    sites: dict = field(default_factory=dict)  # site -> segment id (for RunResult.kept)
    row_positions: np.ndarray | None = None  # positions of the token row before any site, graph order

    def kept_positions(self, sid: str, t: int) -> np.ndarray:
        """Positions kept by token segment ``sid`` at timestep t, ascending (torch's slot order)."""
        seg = self.segments[sid]
        return np.sort(seg.positions[seg.schedule[t]])

    @property
    def config(self) -> dict:
        return self.meta.get("config", {})
