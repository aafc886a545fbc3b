"""Export a trained stata-deploy model (and its static token masks) to a standard NIR 1.0 file: a lowering of the IR.

``build_graph`` builds the model's IR (``stata_deploy.ir.build_ir``), folds BatchNorm (``FoldBatchNorm``), applies
the static masks (``ApplyMasks``) and drops tokens never kept (``DropNeverKept``), then walks the IR once: one small
function per IR node type (``LOWER``; Product kinds in ``PRODUCTS``, Neuron kinds in ``NEURONS``) emits nodes of
the lowered IR (``stata_deploy.ir.lowered``: one typed node per NIR node, the graph the file is), written by that
module's writers (``to_nir_graph``), the inverse of the reader's table in ``runtimes/nir_graph.py``. No torch module
is looked at beyond ``build_ir``.

Only the standard NIR node types are written (Input, Output, Conv1d, Conv2d, Flatten, SumPool2d, LIF): a custom node
type makes ``nir.read`` fail for every reader, and other readers map ``nir.Affine`` to a 2-D linear layer (the
batched Affine NIR allows fails there), so no Affine is written. Everything a reader must know beyond the standard
nodes is described in the graph metadata under ``"stata_deploy"`` (a JSON string); ``runtimes.nir_graph`` documents
the executed semantics. The lowering:

- LIF (SpikingJelly form, tau in steps) -> ``nir.LIF(tau=tau_steps*NIR_DT, r=1, v_leak=V_reset, v_reset=V_reset,
  v_threshold=nir_threshold(V_th))`` with float64 parameters; under forward Euler with step NIR_DT this is the same
  update. Thresholds: NIR's spike rule is strict (``z = v > v_threshold``, the docstrings of nir.LIF / CubaLIF /
  Threshold), the model fires at ``v >= V_th``; the file holds the next float32 below V_th, so that ``v > that`` is
  exactly ``v >= V_th`` for every float32 v (snnTorch 1.0.0 on a trained sdt-tiny: 6.8 % of spikes flipped with
  ``V_th`` written as is, 0 with this encoding).
- BatchNorm is folded into the preceding Conv2d / Linear (weights and biases in float64).
- The SPS stem: Conv2d / LIF nodes on (C, H, W) maps; a max-pool of binary spikes is a SumPool2d followed by a
  memoryless gate (LIF with tau = NIR_DT, threshold 0.5: "any spike in the window"); the RPE residual sum is two
  edges into one node.
- Tokens, model without anchor and masks: they stay on the (D, g, g) map (per-token Linear = 1x1 Conv2d, token sum /
  broadcast / head = Conv2d with (g, g) kernels): Conv2d and LIF nodes only.
- Tokens otherwise: a token row (D, n), token axis last, built of Conv1d nodes (NIR 1.0.8 types a Conv2d's output
  with its kernel HEIGHT for both spatial axes, so a (1, K) Conv2d kernel over a (D, 1, n) row makes nir.read fail
  its type check; Conv1d is typed correctly). ``Flatten(-2, -1)`` turns the map into the row; the row's token order
  (``token_order`` in metadata) puts the anchor first, then the tokens kept by the last pruning site, then those kept
  by the site before, ... (a fixed schedule's kept sets are nested), so that every site keeps a PREFIX of the row:
  its selection is a crop, one depthwise Conv1d with a one-hot kernel of width n_in - n_out + 1. The re-ordering
  itself is one "token matrix" (four Conv1d with one-hot kernels through layouts where channels or tokens lie along
  the length; see ``_Builder.token_matrix``). The anchor token is a Conv1d with zero weights and the anchor as its
  bias, placed at its slot by a one-hot Conv1d. Per-token Linear+BN = Conv1d kernel 1. Residual sums are several
  edges into one node. The head (mean over image tokens + Linear) is one conv whose kernel covers the tokens (zero
  at the anchor): output port ``logits`` (classes, 1, 1) on the map, (classes, 1) on a row; the prediction averages
  it over T.
- SDSA (spike-driven) is complete in standard nodes: K ⊙ V = gate(k + v) with threshold 1.5, the token sum a
  depthwise conv with a kernel of ones over the tokens, LIF_0.5, a depthwise conv that copies the (D, 1[, 1]) result
  to every token, Q ⊙ kv = another gate. The gate is an ``nir.LIF`` with tau = 1 * NIR_DT (memoryless under Euler):
  snntorch 1.0.0 imports it exactly; ``nir.Threshold`` is rejected by spikingjelly's importer.
- IR nodes NIR cannot express (the Products qk, av of SSA and ktv, qktv of A²OS²A; the ReLU and ternary Neurons of
  A²OS²A) are host operations, one per IR node, named after it, with its kind and its own fields (``host_ops`` in
  metadata, ``HOST_EQUATIONS``; format_version 2): a host operation reads Output ports (the NIR values it needs
  leave the graph there) or earlier host operations' results, and the result a NIR node reads enters through an
  Input port. A metadata-ignoring reader sees a graph with extra inputs it has no values for: it cannot run the
  model without supplying them, so it cannot silently compute a different network. ``split=True`` also writes the
  standard segments between host operations as separate, runnable files.
- Static masks (``TokenMasks``): at each drop site, tokens never kept at any timestep are removed from the graph
  (the crop); the remaining schedule (T, n) is in metadata (``token_segments``, positions in graph order) and
  executed by our reader. A fixed schedule (``calibrate --schedule fixed``) is entirely structural: the file is then
  exact for a reader that ignores metadata. TP ("skip") masks must be the same at every timestep and are then
  entirely structural (a crop before the block, a zero pad back into the row after it).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stata_deploy import description
from stata_deploy.errors import StataError, UnsupportedOpError
from stata_deploy.exporter_api import Exporter
from stata_deploy.ir import lowered as low
from stata_deploy.ir.geometry import conv_len
from stata_deploy.ir.lowered import Lowered
from stata_deploy.ir.nodes import (TOKEN_INDEPENDENT_PRODUCTS, Add, Conv, Graph, Head, Input, MaxPool, Neuron, Node,
                                   Product, Rejoin, Select, TokenLinear, Tokens)
from stata_deploy.pruning.masks import TokenMasks

NIR_DT = 1e-4  # the Euler step every LIF's tau is expressed in (tau = tau_steps * NIR_DT); the one place it is set
GATE_TH = 1.5  # threshold of the memoryless AND gate on a + b for binary a, b
FORMAT_VERSION = description.NIR_FORMAT_VERSION
# the host operations (IR nodes NIR cannot express), by kind; runtimes.nir_graph executes them (its HOST_KINDS)
HOST_EQUATIONS = {
    "qk": "IR Product qk: per head h, A_h = Q_h K_h^T (H, n, n); Q, K token rows (D, n) or maps (D, g, g) (tokens = "
          "the flattened spatial axes), channel h*dh+j is head h",
    "av": "IR Product av: per head h, Y_h = (A_h V_h) * scale, merged back to the layout of V",
    "ktv": "IR Product ktv: per head h, M_h = K_h^T V_h (H, dh, dh)",
    "qktv": "IR Product qktv: per head h, Y_h = Q_h M_h, merged back to the layout of Q",
    "relu": "IR Neuron relu: max(x, 0), stateless",
    "ternary": "IR Neuron ternary: H = V + (X - (V - v_reset)) / tau (tau in timesteps); +1 at H >= v_th, -1 at "
               "H <= -v_th, V = v_reset where it fired else H; state per element",
}


def nir_threshold(v_th) -> np.ndarray:
    """The NIR ``v_threshold`` for a neuron that fires at ``v >= v_th``: NIR fires at ``v > v_threshold``, and in
    float32 ``v > nextafter(v_th, -inf)`` is exactly ``v >= v_th``. Returned as float64 (exact)."""
    th = np.asarray(v_th, dtype=np.float32)
    return np.nextafter(th, np.float32(-np.inf)).astype(np.float64)


def _dense_groups(w: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv weight (Co, Ci/G, kh, kw) as the equivalent dense (Co, Ci, kh, kw) weight."""
    if groups == 1:
        return w
    co, cig, kh, kw = w.shape
    cog = co // groups
    out = np.zeros((co, cig * groups, kh, kw))
    for gi in range(groups):
        out[gi * cog:(gi + 1) * cog, gi * cig:(gi + 1) * cig] = w[gi * cog:(gi + 1) * cog]
    return out


@dataclass
class Tok:
    """Token layout: ``grid`` = g: tokens are the (D, g, g) map of the stem (no anchor, no masks: every node is a
    Conv2d/LIF); ``grid`` = None: a token row (D, n), token axis last (Conv1d nodes: NIR 1.0.8 types a Conv2d's
    output with its kernel height for both spatial axes, so a (1, K) kernel over a (D, 1, n) row fails nir.read)."""

    n: int
    grid: int | None = None

    def shape(self, D: int) -> tuple:
        return (D, self.grid, self.grid) if self.grid else (D, self.n)

    def single(self, D: int) -> tuple:
        """Shape of a per-channel value (a token sum)."""
        return (D, 1, 1) if self.grid else (D, 1)

    @property
    def layout(self) -> str:
        return "grid_tokens" if self.grid else "tokens"


class _Builder:
    """Collects the nodes of the lowered IR (the graph the file is) and edges; the lowering functions below add to
    it, ``stata_deploy.ir.lowered.to_nir_graph`` writes them."""

    def __init__(self, T: int):
        self.T = T
        self.nodes: dict[str, Lowered] = {}
        self.edges: list = []
        self.host_ops: list[dict] = []
        self.segments: dict[str, dict] = {}
        self.sites: dict[str, str] = {}
        self.order = None  # positions (full sequence) of the token row before any site, graph order

    def add(self, name: str, node: Lowered, inputs=(), **meta) -> str:
        """Add a node of the lowered IR (``stata_deploy.ir.lowered``: the graph the file is), fed by ``inputs``;
        ``meta``: its recording fields (layer, layout, tokens, role)."""
        if name in self.nodes:
            raise StataError(f"internal: duplicate NIR node {name!r}")
        meta = {k: v for k, v in meta.items() if v is not None}
        self.nodes[name] = dataclasses.replace(node, **meta) if meta else node
        for s in inputs:
            self.edges.append((s, name))
        return name

    # ---- node factories
    def lif(self, name, inputs, shape, v_th, tau_steps, v_reset=0.0, layer=None, layout=None, tokens=None, role=None):
        shape = tuple(shape)
        node = low.LIF(
            name=name, shape=shape,
            tau=np.full(shape, tau_steps * NIR_DT, dtype=np.float64),
            tau_steps=np.full(shape, tau_steps, dtype=np.float64),
            r=np.ones(shape, dtype=np.float64),
            v_leak=np.full(shape, v_reset, dtype=np.float64),
            v_threshold=np.full(shape, nir_threshold(v_th), dtype=np.float64),
            v_reset=np.full(shape, v_reset, dtype=np.float64),
        )
        return self.add(name, node, inputs, layer=layer, layout=layout, tokens=tokens, role=role)

    def conv(self, name, inputs, in_hw, w, b, stride=1, padding=0, groups=1, tokens=None, role=None):
        # NIR 1.0.8 types a Conv2d's input as weight.shape[1] channels, i.e. it does not model groups: a grouped
        # conv fails nir's type check, so grouped kernels are written as the equivalent dense (block-diagonal) one
        w = _dense_groups(np.asarray(w, np.float64), int(groups))
        (H, W), (kh, kw) = (int(v) for v in in_hw), w.shape[2:]
        node = low.Conv2d(name=name, shape=(w.shape[0], conv_len(H, kh, stride, padding), conv_len(W, kw, stride, padding)),
                          in_hw=(H, W), weight=w, stride=(int(stride),) * 2, padding=(int(padding),) * 2,
                          dilation=(1, 1), groups=1, bias=np.asarray(b, np.float64))
        return self.add(name, node, inputs, tokens=tokens, role=role)

    def conv1d(self, name, inputs, n_in, w, b, stride=1, padding=0, dilation=1, groups=1, tokens=None, role=None):
        """A Conv1d over the token axis of a row (C, n_in) (grouped kernels written dense, as for Conv2d)."""
        w = np.asarray(w, np.float64)
        if groups != 1:
            w = _dense_groups(w[:, :, None, :], int(groups))[:, :, 0, :]
        node = low.Conv1d(name=name, shape=(w.shape[0], conv_len(int(n_in), w.shape[2], stride, padding, dilation)),
                          in_len=int(n_in), weight=w, stride=int(stride), padding=int(padding),
                          dilation=int(dilation), groups=1, bias=np.asarray(b, np.float64))
        return self.add(name, node, inputs, tokens=tokens, role=role)

    def token_sum(self, name, srcs, D, tok: "Tok"):
        """Sum over tokens -> (D, 1, 1) / (D, 1): a depthwise conv whose kernel of ones covers the map / row."""
        if tok.grid:
            g = tok.grid
            return self.conv(name, srcs, (g, g), np.ones((D, 1, g, g)), np.zeros(D), groups=D, role="token_sum")
        return self.conv1d(name, srcs, tok.n, np.ones((D, 1, tok.n)), np.zeros(D), groups=D, role="token_sum")

    def token_broadcast(self, name, srcs, D, tok: "Tok", tokens=None):
        """(D, 1, 1) / (D, 1) -> every token: a depthwise conv of ones with padding kernel - 1."""
        if tok.grid:
            g = tok.grid
            return self.conv(name, srcs, (1, 1), np.ones((D, 1, g, g)), np.zeros(D), padding=g - 1, groups=D,
                             role="token_broadcast", tokens=tokens)
        n = tok.n
        return self.conv1d(name, srcs, 1, np.ones((D, 1, n)), np.zeros(D), padding=n - 1, groups=D,
                           role="token_broadcast", tokens=tokens)

    def token_window(self, name, inputs, D, n_in, n_out, shift=0, tokens=None, role="reindex"):
        """Token row (D, n_in) -> (D, n_out), output token q = input token q + shift (zero outside the input): one
        depthwise Conv1d with a one-hot kernel of width K and padding P. shift 0 and n_out < n_in is a crop (the
        first n_out tokens), n_out > n_in a zero pad; a copy with weight 1, exact in any reader."""
        for P in range(0, n_in + n_out + abs(shift) + 1):
            K = n_in + 2 * P + 1 - n_out
            kk = shift + P
            if K >= 1 and 0 <= kk < K:
                break
        else:  # pragma: no cover - P = n_out + |shift| always works
            raise StataError(f"internal: no window conv for {n_in} -> {n_out} tokens, shift {shift}")
        w = np.zeros((D, 1, K))
        w[:, 0, kk] = 1.0
        return self.conv1d(name, inputs, n_in, w, np.zeros(D), padding=P, groups=D, tokens=tokens, role=role)

    def token_matrix(self, name, inputs, D, n_in, mat, tokens=None, role="reindex"):
        """out[d, a] = sum_p mat[a, p] in[d, p] for every channel d: a row (D, n_in) -> (D, n_out) with the same
        (n_out, n_in) matrix for every channel (a permutation, a selection or its transpose). Other readers map
        nir.Affine to a 2-D linear layer and NIR's Conv1d does not model groups, so this is four dense Conv1d with
        one-hot kernels (weights D^2 + n_out*n_in + n_out^2 + D^2, no D^2 * n^2 term), through layouts where the
        tokens or the channels lie along the length:
          .stack   (D, n_in)     -> (1, D*n_in)   kernel D, dilation n_in, padding (D-1)*n_in (channel d -> block d)
          .gather  (1, D*n_in)   -> (n_out, D)    kernel n_in, stride n_in: channel a = mat[a] . block d
          .unstack (n_out, D)    -> (1, n_out*D)  kernel n_out, dilation D, padding (n_out-1)*D
          .row     (1, n_out*D)  -> (D, n_out)    kernel D, stride D: channel d = element d of block a"""
        mat = np.asarray(mat, np.float64)
        n_out = mat.shape[0]
        if mat.shape[1] != n_in:
            raise StataError(f"internal: token matrix {mat.shape} for {n_in} tokens")
        ws = np.zeros((1, D, D))
        ws[0, np.arange(D), D - 1 - np.arange(D)] = 1.0
        s = self.conv1d(f"{name}.stack", inputs, n_in, ws, np.zeros(1), padding=(D - 1) * n_in, dilation=n_in,
                        role=role)
        g = self.conv1d(f"{name}.gather", [s], D * n_in, mat[:, None, :], np.zeros(n_out), stride=n_in, role=role)
        wu = np.zeros((1, n_out, n_out))
        wu[0, np.arange(n_out), n_out - 1 - np.arange(n_out)] = 1.0
        u = self.conv1d(f"{name}.unstack", [g], D, wu, np.zeros(1), padding=(n_out - 1) * D, dilation=D, role=role)
        wr = np.zeros((D, 1, D))
        wr[np.arange(D), 0, np.arange(D)] = 1.0
        return self.conv1d(f"{name}.row", [u], n_out * D, wr, np.zeros(D), stride=D, tokens=tokens, role=role)

    def token_select(self, name, inputs, D, cur, pos, tokens=None):
        """The row holding positions ``cur`` (graph order) -> the row holding ``pos`` (in that order): a crop when
        ``pos`` is a prefix of ``cur`` (the exporter orders tokens so that it is), else a token matrix."""
        cur, pos = np.asarray(cur), np.asarray(pos)
        if len(pos) <= len(cur) and np.array_equal(cur[:len(pos)], pos):
            return self.token_window(name, inputs, D, len(cur), len(pos), tokens=tokens)
        return self.token_matrix(name, inputs, D, len(cur), _selection(cur, pos), tokens=tokens)

    def token_place(self, name, inputs, D, pos, cur, tokens=None):
        """The row holding ``pos`` -> the row holding ``cur`` (zeros at the other positions): a zero pad when
        ``pos`` is a prefix of ``cur``, else a token matrix."""
        cur, pos = np.asarray(cur), np.asarray(pos)
        if np.array_equal(cur[:len(pos)], pos):
            return self.token_window(name, inputs, D, len(pos), len(cur), tokens=tokens)
        return self.token_matrix(name, inputs, D, len(pos), _selection(cur, pos).T, tokens=tokens)

    def host(self, name, kind, inputs, output, attrs, tokens=None, layer=None) -> dict:
        """A host operation: the IR node ``name`` of ``kind`` (HOST_EQUATIONS) with its fields ``attrs``, reading
        output ports or earlier host ops, writing input port ``output`` (None: read by host ops only)."""
        if name in self.nodes or any(h["name"] == name for h in self.host_ops):
            raise StataError(f"internal: host operation {name!r} clashes with another node")
        op = dict(name=name, kind=kind, inputs=list(inputs), output=output, tokens=tokens, attrs=attrs,
                  **({"layer": layer} if layer else {}),
                  equation=HOST_EQUATIONS.get(kind, f"IR node kind {kind!r}: see stata_deploy.ir.nodes"))
        self.host_ops.append(op)
        return op

    def port_out(self, name, srcs, shape, tokens=None, role="host_port"):
        srcs = srcs if isinstance(srcs, list) else [srcs]
        return self.add(name, low.OutputPort(name=name, shape=tuple(shape)), srcs, tokens=tokens, role=role)

    def port_in(self, name, shape, tokens=None, role="host_result"):
        return self.add(name, low.InputPort(name=name, shape=tuple(shape)), [], tokens=tokens, role=role)


# ------------------------------------------------------------------------------------- the IR -> NIR lowering
class _Lowering:
    """One walk over the IR graph ``g`` (topological order), filling the NIR builder ``b``.

    The NIR form of an IR value: a list of NIR node names whose outputs sum to it (NIR sums several edges into one
    node: a residual Add is the concatenation of its operands' lists), or, for a value a host operation computes,
    ``HostVal``. A host value read by a NIR node enters through one input port (``srcs``); a NIR value read by a host
    operation leaves through one output port (``port``)."""

    def __init__(self, g: Graph, b: _Builder, grid: int | None, order: np.ndarray):
        self.g, self.b, self.grid = g, b, grid
        self.vals: dict[str, list[str] | HostVal] = {}
        self.pos: dict[str | None, np.ndarray] = {None: order}  # Select name (None: before any) -> row positions
        self.ports_out: dict[str, str] = {}  # IR value -> its output port
        self.ports_in: dict[str, str] = {}  # host value -> its input port
        self.maps: set[str] = set()  # IR values that are feature maps (C, H, W): the stem, up to the Tokens node
        self.single: set[str] = set()  # token-independent IR values (one row (1, D): SDSA's token sum and after)
        self.time_varying = False

    # ---- layout of an IR value in the NIR graph
    def seg(self, name: str) -> str | None:
        """The token segment id of the rows of IR value ``name`` (None: the rows before any pruning site)."""
        s = self.g.schedules[name]
        return None if s is None else f"site{self.g.node(s).site}"

    def rows(self, name: str) -> np.ndarray:
        """Positions (full sequence) of the NIR token rows that hold IR value ``name``, graph order."""
        return self.pos[self.g.schedules[name]]

    def tok(self, name: str) -> Tok:
        return Tok(len(self.rows(name)), self.grid)

    def shape(self, name: str) -> tuple:
        """The NIR shape of IR value ``name``: maps stay (C, H, W); token rows (n, D) are (D, n) / (D, g, g); a
        token-independent row (1, D) is (D, 1) / (D, 1, 1)."""
        s = self.g.shapes[name]
        if name in self.maps:
            return s
        if len(s) != 2:
            raise UnsupportedOpError(f"IR value {name!r} of shape {s} has no NIR form (only host operations read it)")
        tok = self.tok(name)
        return tok.single(s[1]) if name in self.single else tok.shape(s[1])

    def layout(self, name: str) -> str:
        if name in self.maps:
            return "grid"
        if name in self.single:
            return "single"
        return self.tok(name).layout

    # ---- values
    def srcs(self, name: str) -> list[str]:
        """The NIR nodes whose sum is IR value ``name`` (a host value: its input port, made once)."""
        v = self.vals[name]
        if not isinstance(v, HostVal):
            return list(v)
        if name not in self.ports_in:
            parent = name.rsplit(".", 1)[0]
            port = f"{parent}.host.result"
            if port in self.b.nodes:
                port = f"{name}.host.result"
            self.ports_in[name] = self.b.port_in(port, self.shape(name), self.seg(name))
            v.op["output"] = port
        return [self.ports_in[name]]

    def host_input(self, name: str) -> str:
        """What a host operation reads for IR value ``name``: another host op's name, or an output port."""
        v = self.vals[name]
        if isinstance(v, HostVal):
            return v.op["name"]
        if name not in self.ports_out:
            parent, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            leaf = leaf[:-4] if leaf.endswith("_lif") else leaf
            port = f"{parent}.host.{leaf}"
            self.ports_out[name] = self.b.port_out(port, list(v), self.shape(name), self.seg(name))
        return self.ports_out[name]

    def binary(self, node: Node, i: int) -> list[str]:
        """The NIR sources of input i of ``node``, which must be binary spikes (a LIF neuron) for a gate."""
        src = self.g.inputs[node.name][i]
        n = self.g.node(src)
        if not (isinstance(n, Neuron) and n.kind == "lif"):
            raise UnsupportedOpError(f"{node.name} ({type(node).__name__}"
                                     f"{'.' + node.kind if isinstance(node, Product) else ''}): its input {src!r} is "
                                     "not a LIF neuron's binary spikes, which the NIR gate lowering needs")
        return self.srcs(src)


@dataclass
class HostVal:
    """An IR value computed by a host operation (``op``: its entry in the description's host_ops)."""

    op: dict


def _sibling(name: str, leaf: str) -> str:
    """``blocks.0.attn.qkv_gate`` -> ``blocks.0.attn.<leaf>``: a NIR node next to the IR node ``name``."""
    return f"{name.rsplit('.', 1)[0]}.{leaf}" if "." in name else leaf


def _input(lw: _Lowering, node: Input):
    return [lw.b.add(node.name, low.InputPort(name=node.name, shape=(node.channels, node.height, node.width)))]


def _conv(lw: _Lowering, node: Conv, x: str):
    _, h, w = lw.g.shapes[x]
    bias = node.bias if node.bias is not None else np.zeros(node.out_channels)
    return [lw.b.conv(node.name, lw.srcs(x), (h, w), node.weight, bias, stride=node.stride, padding=node.padding)]


def _token_linear(lw: _Lowering, node: TokenLinear, x: str):
    """Per-token Linear (+ folded BN): a 1x1 Conv2d on the token map (D, g, g), a kernel-1 Conv1d on a row (D, n)."""
    w = np.asarray(node.weight, np.float64)
    b = np.asarray(node.bias, np.float64) if node.bias is not None else np.zeros(node.out_features)
    tok, seg = lw.tok(x), lw.seg(node.name)
    if tok.grid:
        return [lw.b.conv(node.name, lw.srcs(x), (tok.grid, tok.grid), w[:, :, None, None], b, tokens=seg)]
    return [lw.b.conv1d(node.name, lw.srcs(x), tok.n, w[:, :, None], b, tokens=seg)]


def _lif(lw: _Lowering, node: Neuron, x: str):
    return [lw.b.lif(node.name, lw.srcs(x), lw.shape(node.name), node.v_th, node.tau, node.v_reset, layer=node.name,
                     layout=lw.layout(node.name), tokens=lw.seg(node.name))]


def _host(lw: _Lowering, node: Node, *ins: str, **attrs):
    """A host operation for IR node ``node``: named after it, its kind and its own fields; its token segment is
    that of its rows (or of its operands' rows, for a token-independent result)."""
    seg = lw.seg(node.name) or next((lw.seg(i) for i in ins if lw.seg(i)), None)
    op = lw.b.host(node.name, node.kind, [lw.host_input(i) for i in ins], None, attrs, tokens=seg,
                   layer=node.name if isinstance(node, Neuron) else None)
    return HostVal(op)


def _host_neuron(lw: _Lowering, node: Neuron, x: str):
    attrs = {} if not node.stateful else dict(tau=float(node.tau), v_th=float(node.v_th), v_reset=float(node.v_reset))
    return _host(lw, node, x, **attrs)


def _host_product(lw: _Lowering, node: Product, *ins: str):
    return _host(lw, node, *ins, heads=node.heads, scale=float(node.scale))


# Neuron kind -> lowering: a LIF is nir.LIF; ReLU and ternary neurons have no NIR form (host operations)
NEURONS = {"lif": _lif, "relu": _host_neuron, "ternary": _host_neuron}


def _neuron(lw: _Lowering, node: Neuron, x: str):
    fn = NEURONS.get(node.kind)
    if fn is None:
        raise UnsupportedOpError(f"IR neuron {node.name!r} of kind {node.kind!r} has no NIR lowering: add it to "
                                 "exporters.nir_exporter.NEURONS")
    return fn(lw, node, x)


def _max_pool(lw: _Lowering, node: MaxPool, x: str):
    """Max-pool of binary spikes = "any spike in the window": a SumPool2d and a memoryless gate (threshold 0.5)."""
    lw.binary(node, 0)
    k, s, p = ((int(v),) * 2 for v in (node.kernel, node.stride, node.padding))
    sm = lw.b.add(f"{node.name}.sum", low.SumPool2d(name=f"{node.name}.sum", shape=lw.shape(node.name), kernel=k,
                                                    stride=s, padding=p), lw.srcs(x))
    return [lw.b.lif(f"{node.name}.any", [sm], lw.shape(node.name), 0.5, 1.0, role="gate")]


def _add(lw: _Lowering, node: Add, a: str, b: str):
    return lw.srcs(a) + lw.srcs(b)  # several edges into one node are summed


def _tokens(lw: _Lowering, node: Tokens, x: str):
    D, g, _ = lw.g.shapes[x]
    if lw.grid:
        return lw.srcs(x)  # tokens stay on the stem's (D, g, g) map
    return _token_row(lw.b, lw.srcs(x), D, g, node.anchor_value if node.anchor else None, node.n_fixed,
                      lw.pos[None])


def _select(lw: _Lowering, node: Select, x: str):
    """A static pruning site: the rows of the tokens whose neurons exist after it (drop: kept at some timestep,
    ``DropNeverKept``; skip: the kept tokens, the same at every timestep) are a prefix of the row in token order,
    so the selection is a crop. The schedule of the kept ones per timestep goes to metadata (a token segment)."""
    cur, m, sid = lw.rows(x), node.schedule, f"site{node.site}"
    if node.mode == "skip":
        if node.timestep_wise:
            raise UnsupportedOpError(f"skip-mode (tp) masks that differ across timesteps at block {node.site} have no "
                                     "NIR lowering (the torch model keeps slot state, not token state)")
        keep = cur[m[0][cur]]
    else:
        keep = cur[np.isin(cur, node.tokens)]
        lw.time_varying |= bool((m[:, keep] != m[:1, keep]).any())
    lw.pos[node.name] = keep
    lw.b.segments[sid] = dict(site=node.site, positions=keep.tolist(), schedule=m[:, keep].astype(int).tolist())
    lw.b.sites[str(node.site)] = sid
    D = lw.g.shapes[x][1]
    return [lw.b.token_select(node.name, lw.srcs(x), D, cur, keep, tokens=sid)]


def _rejoin(lw: _Lowering, node: Rejoin, x: str, y: str):
    """TP skip: the block output y = (its selected rows) + (the block's residual branches); the stream x with the
    selected rows replaced by y is x + the branches placed back at their rows (a zero pad / token matrix)."""
    sel = lw.g.schedules[y]
    inner, mine = lw.srcs(y), lw.srcs(sel)
    if inner[:len(mine)] != mine:
        raise UnsupportedOpError(f"{node.name}: the block output {y!r} is not its selected rows plus residual "
                                 "branches, which the NIR lowering of TP's skip needs")
    D = lw.g.shapes[x][1]
    place = lw.b.token_place(_sibling(node.name, "place"), inner[len(mine):], D, lw.pos[sel], lw.rows(x),
                             tokens=lw.seg(node.name))
    return lw.srcs(x) + [place]


def _kv_gate(lw: _Lowering, node: Product, k: str, v: str):
    """K ⊙ V of binary spikes: a memoryless gate on k + v (two edges) with threshold 1.5."""
    ins = lw.binary(node, 0) + lw.binary(node, 1)
    return [lw.b.lif(f"{node.name}_and", ins, lw.shape(node.name), GATE_TH, 1.0, role="gate", tokens=lw.seg(node.name))]


def _kv_sum(lw: _Lowering, node: Product, x: str):
    return [lw.b.token_sum(node.name, lw.srcs(x), lw.g.shapes[x][1], lw.tok(x))]


def _qkv_gate(lw: _Lowering, node: Product, q: str, g: str):
    """Q ⊙ G (G one row, on every token): G copied to every token by a depthwise conv, then a gate."""
    D, tok, seg = lw.g.shapes[q][1], lw.tok(q), lw.seg(node.name)
    lw.binary(node, 1)
    bc = lw.b.token_broadcast(_sibling(node.name, "kv_broadcast"), lw.srcs(g), D, tok,
                              tokens=seg if not tok.grid else None)
    return [lw.b.lif(_sibling(node.name, "qkv_and"), lw.binary(node, 0) + [bc], lw.shape(node.name), GATE_TH, 1.0,
                     role="gate", tokens=seg)]


# Product kind -> lowering: SDSA's products of binary spikes are standard (gates, sums); every other kind (qk, av,
# ktv, qktv, and any new one) is a host operation of that kind, which the reader executes (runtimes.nir_graph.
# HOST_KINDS) and refuses clearly when it does not know the kind
PRODUCTS = {"kv": _kv_gate, "kv_sum": _kv_sum, "qkv_gate": _qkv_gate}


def _product(lw: _Lowering, node: Product, *ins: str):
    return PRODUCTS.get(node.kind, _host_product)(lw, node, *ins)


def _head(lw: _Lowering, node: Head, x: str):
    """Mean over the image tokens kept per timestep + Linear: one conv whose kernel covers the tokens (zero at the
    anchor), output port ``logits``."""
    W = np.asarray(node.weight, np.float64)  # (classes, D)
    bias = np.asarray(node.bias, np.float64)
    k_img = lw.g.shapes[x][0] - node.n_fixed
    D = node.in_features
    if lw.grid:  # kernel (g, g) over the map
        g = lw.grid
        w = np.broadcast_to(W[:, :, None, None] / float(k_img), (W.shape[0], D, g, g))
        lw.b.conv(node.name, lw.srcs(x), (g, g), w, bias)
    else:  # a Conv1d with kernel n over the row, zero at the anchor's slot
        cur = lw.rows(x)
        w = np.zeros((W.shape[0], D, len(cur)))
        w[:, :, np.flatnonzero(cur >= node.n_fixed)] = W[:, :, None] / float(k_img)
        lw.b.conv1d(node.name, lw.srcs(x), len(cur), w, bias)
    shape = [W.shape[0], 1, 1] if lw.grid else [W.shape[0], 1]
    return [lw.b.add("logits", low.OutputPort(name="logits", shape=tuple(shape)), [node.name])]


# IR node type -> lowering ``f(lowering, node, *input names) -> NIR value``. A new attention kind built from
# existing node kinds needs nothing here; a new Product kind is a host operation by default (PRODUCTS: a standard
# lowering instead), a new Neuron kind one entry in NEURONS.
LOWER = {Input: _input, Conv: _conv, Neuron: _neuron, MaxPool: _max_pool, Add: _add, Tokens: _tokens,
         TokenLinear: _token_linear, Product: _product, Select: _select, Rejoin: _rejoin, Head: _head}


def lower_ir(g: Graph, grid: bool) -> tuple[_Builder, _Lowering]:
    """The NIR nodes of IR graph ``g`` (BatchNorm folded, static masks applied, never-kept tokens dropped)."""
    tokens = next(n for n in g.nodes if isinstance(n, Tokens))
    D, side, _ = g.shapes[g.inputs[tokens.name][0]]
    b = _Builder(g.T)
    order = np.arange(side * side) if grid else token_order(g)
    if not grid:
        b.order = order
    lw = _Lowering(g, b, side if grid else None, order)
    stem = True  # before the Tokens node, values are feature maps
    for node in g.nodes:
        fn = LOWER.get(type(node))
        if fn is None:
            raise UnsupportedOpError(f"IR node {node.name!r} ({type(node).__name__}) has no NIR lowering: add one to "
                                     "exporters.nir_exporter.LOWER")
        stem = stem and not isinstance(node, Tokens)
        ins = g.inputs[node.name]
        if stem:
            lw.maps.add(node.name)
        elif (node.kind in TOKEN_INDEPENDENT_PRODUCTS if isinstance(node, Product)
              else bool(ins) and all(i in lw.single for i in ins)):
            lw.single.add(node.name)
        lw.vals[node.name] = fn(lw, node, *g.inputs[node.name])
    return b, lw


def token_order(g: Graph) -> np.ndarray:
    """The order of the token row (positions in the full sequence): every pruning site then keeps a prefix, so that
    its selection is a crop. Drop mode (nested kept sets): the anchor, then the tokens kept (at any timestep) by the
    last site, then those kept by the site before, ... then the tokens no site keeps (each group ascending). Skip
    mode: the tokens of the first site, then the rest. No sites: ascending."""
    n = g.n_tokens
    n_fixed = next(t.n_fixed for t in g.nodes if isinstance(t, Tokens))
    pos = np.arange(n)
    sel = sorted((s for s in g.nodes if isinstance(s, Select)), key=lambda s: s.site)
    if not sel:
        return pos
    if sel[0].mode == "skip":
        level = sel[0].schedule[0].astype(int)
    else:
        level = sum(s.schedule.any(0).astype(int) for s in sel)
    level = np.where(pos < n_fixed, len(sel) + 1, level)
    return np.lexsort((pos, -level))


def _token_row(b: _Builder, srcs: list[str], D: int, g: int, anchor, n_fixed: int, order: np.ndarray) -> list[str]:
    """(D, g, g) map (sum of srcs) -> token row (D, n) holding the sequence positions ``order`` (graph order; the
    anchor is position 0, image token p = i*g + j of the map is position p + 1 with an anchor, p without).

    ``Flatten(-2, -1)`` gives the row in torch's flatten order (negative dims: per-sample and batched readings of
    the dims agree); any other order is one token matrix (four Conv1d with one-hot kernels), a shift by the anchor
    slot one window Conv1d. The anchor, a learned constant token, is a Conv1d with zero weights and the anchor as
    its bias ((D, 1): the same value at every timestep, whatever its input), placed at its slot by a one-hot window
    Conv1d (zero at the other tokens); every consumer sums the row and the placed anchor (two edges)."""
    N = g * g
    n = len(order)
    flat = b.add("tokens.flat", low.Flatten(name="tokens.flat", shape=(D, g * g), in_shape=(D, g, g), start_dim=-2,
                                            end_dim=-1), srcs, role="reindex")
    img = order[order >= n_fixed] - n_fixed  # image tokens (map order) in graph order
    slot = np.flatnonzero(order < n_fixed)
    if np.array_equal(img, np.arange(N)) and (not n_fixed or np.array_equal(slot, [0])):
        row = b.token_window("tokens.row", [flat], D, N, n, shift=-n_fixed) if n_fixed else flat
    else:
        mat = np.zeros((n, N))
        for a_, p in enumerate(order):
            if p >= n_fixed:
                mat[a_, int(p) - n_fixed] = 1.0
        row = b.token_matrix("tokens.row", [flat], D, N, mat)
    if anchor is None:
        return [row]
    const = b.conv1d("tokens.anchor", [flat], N, np.zeros((D, D, 1)), np.asarray(anchor, np.float64).reshape(-1),
                     stride=N, role="anchor")
    return [row, b.token_window("tokens.anchor.place", [const], D, 1, n, shift=-int(slot[0]), role="anchor")]


def _selection(cur: np.ndarray, keep_pos: np.ndarray) -> np.ndarray:
    """(len(keep_pos), len(cur)) 0/1 matrix picking positions keep_pos out of the current positions cur."""
    idx = {int(p): j for j, p in enumerate(cur)}
    mat = np.zeros((len(keep_pos), len(cur)))
    for a, p in enumerate(keep_pos):
        mat[a, idx[int(p)]] = 1.0
    return mat


def build_graph(model, masks: TokenMasks | None, weights_sha256: str | None = None):
    """Lower ``model`` (+ static masks) to (nir.NIRGraph, description dict): its IR (``build_ir``), BatchNorm
    folded, the masks applied and never-kept tokens dropped, then one function per IR node type (``LOWER``)."""
    from stata_deploy.config import ModelConfig
    from stata_deploy.ir import build_ir
    from stata_deploy.ir.passes import ApplyMasks, DropNeverKept, FoldBatchNorm

    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise StataError(f"not a stata-deploy model ({type(model).__name__}); export a run folder written by "
                         "`stata-deploy train`")
    model.eval()
    if masks is not None:
        masks.check_model(cfg)
    g = build_ir(model).transform(FoldBatchNorm())
    if masks is not None:
        g = g.transform(ApplyMasks(masks)).transform(DropNeverKept())
    dyn = next((n for n in g.nodes if isinstance(n, Select) and not n.static), None)
    if dyn is not None:
        raise UnsupportedOpError(
            f"dynamic top-k token selection (prune={dyn.method}, keep={dyn.keep}) has no NIR lowering: NIR needs a "
            "fixed topology; run `stata-deploy calibrate RUN` to freeze static masks and export with them")
    anchor = next(n for n in g.nodes if isinstance(n, Tokens)).anchor
    b, lw = lower_ir(g, grid=masks is None and not anchor)
    skip = masks is not None and masks.mode == "skip"
    desc = _describe(b, cfg, masks, weights_sha256, lw.time_varying, skip)
    graph = low.to_nir_graph(b.nodes, b.edges, {description.META_KEY: description.encode(desc)})
    return graph, desc


def _describe(b, cfg, masks, weights_sha256, time_varying, skip) -> dict:
    if b.host_ops:
        computes = ("the graph is NOT runnable without the host operations listed in 'host_ops': Q, K, V leave through "
                    "output ports and the attention result enters through input ports ('*.host.result'); a reader "
                    "that ignores metadata has no value for those inputs, so it cannot compute the model (use "
                    "--split for the standard segments between host operations)")
    else:
        computes = "the graph is a complete standard NIR network (no host operations)"
    if masks is None:
        mstate = "no token masks: every token is computed at every timestep"
        exact = not b.host_ops
    elif skip or not time_varying:
        mstate = ("the static token masks are fully structural (the same tokens at every timestep): a reader that "
                  "ignores metadata computes exactly the masked model")
        exact = not b.host_ops
    else:
        mstate = ("tokens never kept at any timestep are removed from the graph, but the per-timestep schedule "
                  "('token_segments') is in metadata only: a reader that ignores metadata computes every remaining "
                  "token at every timestep (tokens kept only at some timesteps are also computed at the others, and the "
                  "head divides by the per-timestep kept count), so its spikes and logits differ from the masked model")
        exact = False
    return description.describe(
        "stata-deploy-nir", cfg, masks, weights_sha256=weights_sha256,
        mask_source="static" if masks is not None else "none", **{
        "format_version": FORMAT_VERSION,
        "dt": NIR_DT,
        "input": "input",
        "logits": "logits",
        "readout": "logits = mean over the T timesteps of output port 'logits' ((classes, 1, 1) or (classes, 1))",
        "timing": "zero delay: every node is evaluated once per timestep in topological order",
        "neuron": "nir.LIF under forward Euler with step dt; spike at v > v_threshold (NIR's rule; v_threshold is the "
                  "float32 below the model's V_th, so this is the model's v >= V_th), hard reset",
        "layout": "token part: a (D, g, g) map without anchor and masks, else (D, n) rows, token axis last, in "
                  "the order 'token_order' (the positions in the full sequence of the row before the first site; "
                  "anchor = 0); each token segment lists its positions in graph order",
        "token_order": None if b.order is None else [int(p) for p in b.order],
        "host_ops": b.host_ops,
        "token_segments": b.segments,
        "sites": b.sites,
        "standard_reader_computes": computes + "; " + mstate,
        "exact_without_metadata": bool(exact),
        "not_standard": [f"{h['name']} ({h['kind']})" for h in b.host_ops]
        + (["per-timestep token schedule (token_segments)"] if (masks is not None and time_varying) else []),
    })


# ------------------------------------------------------------------------------------------------ split
def split_graph(graph, desc: dict) -> list[tuple]:
    """The standard segments between host operations, each a runnable nir.NIRGraph with its own ports.

    Segment j holds the nodes after j host-op boundaries. An edge from segment i to a later segment j becomes an
    Output port ``seg_out.<node>`` in i and an Input port ``seg_in.<node>`` in j."""
    import nir

    host_outs = {h["output"]: h for h in desc["host_ops"] if h.get("output")}
    ports = _host_ports(desc["host_ops"])  # host op -> the output ports it reads, directly or through host ops
    host_outs = {o: sorted(ports[h["name"]]) for o, h in host_outs.items()}
    level: dict[str, int] = {}
    preds: dict[str, list] = {n: [] for n in graph.nodes}
    for s, d in graph.edges:
        preds[d].append(s)
    order = _topo(graph.nodes, preds, host_outs)
    for name in order:
        if name in host_outs:
            level[name] = 1 + max(level[p] for p in host_outs[name])
        else:
            level[name] = max([level[p] for p in preds[name]], default=0)
    nseg = max(level.values()) + 1
    segs = []
    for j in range(nseg):
        nodes, edges, ports_in, ports_out = {}, [], [], []
        for name in order:
            if level[name] != j:
                continue
            node = graph.nodes[name]
            nodes[name] = node
        for s, d in graph.edges:
            if level[d] == j and level[s] == j:
                edges.append((s, d))
            elif level[d] == j and level[s] < j:
                pin = f"seg_in.{s}"
                if pin not in nodes:
                    nodes[pin] = nir.Input(input_type={"input": np.array(graph.nodes[s].output_type["output"])},
                                           metadata={"role": "seg_in"})
                    ports_in.append(pin)
                edges.append((pin, d))
            elif level[s] == j and level[d] > j:
                pout = f"seg_out.{s}"
                if pout not in nodes:
                    nodes[pout] = nir.Output(output_type={"output": np.array(graph.nodes[s].output_type["output"])},
                                             metadata={"role": "seg_out"})
                    ports_out.append(pout)
                    edges.append((s, pout))
        sdesc = {k: v for k, v in desc.items() if k not in ("host_ops",)}
        tv = any((np.asarray(v["schedule"]) != np.asarray(v["schedule"])[:1]).any()
                 for sid, v in desc["token_segments"].items()
                 if any(str((n.metadata or {}).get("tokens", "")) == sid for n in nodes.values()))
        host_in = [n for n in nodes if n in host_outs]
        sdesc.update(segment=j, segments=nseg, segment_inputs=ports_in + host_in, segment_outputs=ports_out,
                     host_ops=[], split_host_ops=desc["host_ops"], exact_without_metadata=not tv,
                     not_standard=["per-timestep token schedule (token_segments)"] if tv else [],
                     input="input" if "input" in nodes else None, logits="logits" if "logits" in nodes else None,
                     standard_reader_computes=f"segment {j} of {nseg}: a complete standard NIR graph; feed its inputs "
                     f"{(ports_in + host_in) or ['input']} (seg_in.X = output seg_out.X of an earlier segment, host results from "
                     "the host operations in split_host_ops)")
        segs.append((nir.NIRGraph(nodes=nodes, edges=edges, metadata={description.META_KEY: description.encode(sdesc)}), sdesc))
    return segs


def _host_ports(host_ops: list[dict]) -> dict[str, set]:
    out: dict[str, set] = {}
    for h in host_ops:  # in order: a host op reads ports or earlier host ops
        out[h["name"]] = set().union(*(out.get(p, {p}) for p in h["inputs"]))
    return out


def _topo(nodes, preds, host_outs):
    order, seen = [], set()

    def visit(n):
        if n in seen:
            return
        seen.add(n)
        for p in preds[n]:
            visit(p)
        if n in host_outs:
            for p in host_outs[n]:
                visit(p)
        order.append(n)

    for n in nodes:
        visit(n)
    return order


# ------------------------------------------------------------------------------------------------ writing
def summarize(graph) -> dict:
    """Node counts, neurons (LIF state elements) and synapses (nonzero weights) of a nir.NIRGraph."""
    import nir

    from stata_deploy.ir.geometry import conv_synapses

    counts: dict[str, int] = {}
    neurons = synapses = gates = 0
    for name, node in graph.nodes.items():
        t = type(node).__name__
        counts[t] = counts.get(t, 0) + 1
        md = getattr(node, "metadata", {}) or {}
        if isinstance(node, nir.LIF):
            if str(md.get("role", "")) in ("gate", "b'gate'") or (isinstance(md.get("role"), bytes) and md["role"] == b"gate"):
                gates += int(np.prod(node.tau.shape))
            else:
                neurons += int(np.prod(node.tau.shape))
        elif isinstance(node, (nir.Affine, nir.Linear)):
            synapses += int(np.count_nonzero(node.weight))
        elif isinstance(node, (nir.Conv1d, nir.Conv2d)):
            # synapses = nonzero weights x the output positions where they read an input (not padding)
            synapses += conv_synapses(node.weight, node.input_shape, node.stride, node.padding, node.dilation)
    return {"nodes": counts, "neurons": neurons, "gate_neurons": gates, "synapses": synapses}


class NirExporter(Exporter):
    name = "nir"
    suffix = ".nir"
    accepts = ("split",)

    def export(self, model, masks: TokenMasks | None, out: Path, **options) -> dict:
        out = Path(out)
        graph, desc = build_graph(model, masks, options.get("weights_sha256"))
        low.write_nir(graph, out)
        files = [str(out)]
        if options.get("split"):
            for j, (sg, _) in enumerate(split_graph(graph, desc)):
                p = out.with_name(f"{out.stem}.seg{j}{out.suffix}")
                low.write_nir(sg, p)
                files.append(str(p))
        summ = summarize(graph)
        notes = [desc["standard_reader_computes"]]
        return {
            "path": str(out),
            "files": files,
            "format": "NIR 1.0 (standard node types only)",
            "host_ops": [h["name"] for h in desc["host_ops"]],
            "exact_without_metadata": desc["exact_without_metadata"],
            "masks": None if masks is None else {"mode": masks.mode, "sites": {str(s): masks.kept(s) for s in masks.sites}},
            **summ,
            "notes": notes,
        }
