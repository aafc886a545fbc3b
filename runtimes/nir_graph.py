"""Our NIR reader: a ``.nir`` file -> the lowered IR (``stata_deploy.ir.lowered``) -> a numpy executor over T steps.

Used by the ``nir`` runtime (round trip torch -> .nir -> numpy) and by the Lava runtime (which lowers the same graph
onto Lava processes). numpy only (no torch): Lava process models must not call torch.

``read_graph(path) -> lowered.Graph``: one typed node per NIR node (``_READ``: nir type -> node), the node equations
in stata_deploy/ir/lowered.py; the executor applies them from a table (``APPLY``: node type -> function). Timing:
zero-delay. At each timestep t every node runs once, in ``Graph.ops`` order; host operations run as soon as all their
input ports have a value at t. There is no synaptic delay (a backend with one step of delay per synapse, e.g.
Lava's Dense, must delay-match residual branches and run T + depth steps).

``Graph.host_ops`` (format_version 2): the IR nodes NIR cannot express, one host operation per node, named after it,
whose ``node`` is that core IR node (``ir.nodes.Product`` or ``Neuron``, built from the description's kind and
attrs and checked like any IR node). Ports are token rows (D, n) or maps (D, g, g) (tokens = the flattened spatial
axes); head h is channels h*dh..(h+1)*dh:
  - ``qk``      (q, k)  -> A_h = Q_h K_h^T                   (H, n, n)   heads, scale   [Product.qk]
  - ``av``      (A, v)  -> Y_h = A_h V_h                      like v      heads, scale   [Product.av]
  - ``ktv``     (k, v)  -> M_h = K_h^T V_h                    (H, dh, dh) heads, scale   [Product.ktv]
  - ``qktv``    (q, M)  -> Y_h = Q_h M_h                      like q      heads, scale   [Product.qktv]
    (a Product's result is multiplied by ``scale``: SSA's av has 0.125)
  - ``relu``    (x)     -> max(x, 0)                          like x                     [Neuron.relu]
  - ``ternary`` (x)     -> the ternary neuron: H = V + (X - (V - v_reset)) / tau; +1 at H >= v_th, -1 at H <= -v_th,
                           hard reset, state per element   like x      tau, v_th, v_reset [Neuron.ternary]
A host operation on token rows belongs to token segment ``HostOp.tokens``: its token-row result is multiplied by
the schedule at t, and a neuron's masked tokens get no input. ``HostOp.layer`` (neurons): recorded under that
torch module name, like a LIF node's ``layer``. Files of format 1 (per-attention host ops ``ssa_product``,
``a2os2a_product``) are refused with the re-export command.

Token layout and masks: the transformer part of the graph carries tokens on the last axis, rows (D, n) (files of
earlier versions: (D, 1, n)), in the order ``Graph.row_positions`` (the description's ``token_order``: positions in
the full sequence, anchor at 0) before the first pruning site. A node with ``tokens = sid`` belongs to token
segment ``Graph.segments[sid]`` (the positions of its n tokens in the full sequence, in graph order, and the static
schedule (T, n) of which of them are kept at each timestep). Tokens never kept at any timestep are absent from the
graph (structural removal). At timestep t the executor multiplies such a node's output by ``schedule[t]`` along the
last axis, and a LIF / ternary neuron of a masked token receives zero input, so its membrane decays
(V <- v_reset + (V - v_reset)(1 - 1/tau_steps)) and it cannot spike: the token-state contract of
``stata_deploy.nn.neurons``.

Recording: nodes (and host operations) carrying ``layer`` (the torch module name, e.g. ``blocks.0.attn.q_lif``) are
recorded into ``RunResult.spikes`` in the torch slot layout: ``layout == "grid"``: (T, B, C, H, W);
``"tokens"``: (T, B, k, D) with the kept tokens at each timestep in ascending position order (re-ordered from the
graph's token order); ``"grid_tokens"``: a (D, g, g) token map -> (T, B, g*g, D); ``"single"``: (T, B, 1, D).

Token layouts: a model without anchor and masks keeps its tokens on the stem's (D, g, g) map (token p = i*g + j,
per-token Linear = 1x1 Conv2d, token sum / broadcast / head = Conv2d with (g, g) kernels): only Conv2d and LIF
nodes. Otherwise tokens are a row (D, n) of Conv1d nodes (re-ordering, anchor, crops at pruning sites: one-hot
kernels); both import in snntorch 1.0.0 (benchmarks/nir_peer_parity.py).

Public API: ``read_graph(path) -> Graph``; ``execute(graph, x) -> RunResult`` (x: (B, C, H, W) or
(T, B, C, H, W)); ``simulate(graph, feeds) -> (outputs, records)`` for segment files with several input ports.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from stata_deploy.errors import StataError, UnsupportedOpError
from stata_deploy.ir.lowered import (LIF, Affine, Conv1d, Conv2d, Flatten, Graph, HostOp, InputPort, Lowered,
                                     OutputPort, SumPool2d, TokenSegment, host_node, to_nir_graph,
                                     write_nir)
from stata_deploy.ir.nodes import IRError
from stata_deploy.ir.geometry import _span, conv_len, conv_synapses
from stata_deploy.results import RunResult

from stata_deploy.description import META_KEY, NIR_FORMAT_VERSION  # noqa: E402 - our JSON description
OLD_HOST_KINDS = ("ssa_product", "a2os2a_product")  # format 1 (refused: re-export)


class NirFormatError(StataError):
    """The file is not a NIR graph we can execute (unreadable, unknown node type, missing description)."""


# --------------------------------------------------------------------------------------------------- reading
def _tup(v, n=2):
    a = np.atleast_1d(np.asarray(v)).astype(int).tolist()
    return tuple(a * n if len(a) == 1 else a)


def _shape(types) -> tuple:
    v = list(types.values())[0] if types else None
    return tuple(int(s) for s in np.atleast_1d(v)) if v is not None else ()


def _meta_str(md, key):
    v = md.get(key) if md else None
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.ndarray):
        v = v.item() if v.shape == () else v.tolist()
    return str(v)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _one(v) -> int:
    return int(np.atleast_1d(np.asarray(v)).astype(int)[0])


def _no_string_padding(name: str, node) -> None:
    if isinstance(node.padding, str):
        raise UnsupportedOpError(f"{type(node).__name__} {name!r}: string padding {node.padding!r} is not supported "
                                 "by this reader")


def _read_conv2d(node, name, dt, common):
    _no_string_padding(name, node)
    return Conv2d(weight=_f64(node.weight), bias=_f64(node.bias), stride=_tup(node.stride), padding=_tup(node.padding),
                  dilation=_tup(node.dilation), groups=int(node.groups),
                  in_hw=None if node.input_shape is None else _tup(node.input_shape), **common)


def _read_conv1d(node, name, dt, common):
    _no_string_padding(name, node)
    return Conv1d(weight=_f64(node.weight), bias=_f64(node.bias), stride=_one(node.stride), padding=_one(node.padding),
                  dilation=_one(node.dilation), groups=int(node.groups), in_len=_one(node.input_shape), **common)


def _read_lif(node, name, dt, common):
    tau = _f64(node.tau)
    q = tau / dt
    q = np.where(np.isclose(q, np.round(q), rtol=1e-9, atol=0), np.round(q), q)
    return LIF(tau=tau, tau_steps=q, r=_f64(node.r), v_leak=_f64(node.v_leak), v_reset=_f64(node.v_reset),
               v_threshold=_f64(node.v_threshold), **dict(common, shape=tau.shape))


def _read_table() -> dict:
    """nir node type -> f(node, name, dt, common fields) -> a lowered node."""
    import nir

    out = lambda n: _shape(n.output_type)  # noqa: E731
    return {
        nir.Input: lambda n, name, dt, c: InputPort(**dict(c, shape=_shape(n.input_type))),
        nir.Output: lambda n, name, dt, c: OutputPort(**dict(c, shape=out(n))),
        nir.Affine: lambda n, name, dt, c: Affine(weight=_f64(n.weight), bias=_f64(n.bias), **dict(c, shape=out(n))),
        nir.Linear: lambda n, name, dt, c: Affine(weight=_f64(n.weight), bias=np.zeros(np.shape(n.weight)[:-1]),
                                                  **dict(c, shape=out(n))),
        nir.Conv2d: lambda n, name, dt, c: _read_conv2d(n, name, dt, dict(c, shape=out(n))),
        nir.Conv1d: lambda n, name, dt, c: _read_conv1d(n, name, dt, dict(c, shape=out(n))),
        nir.SumPool2d: lambda n, name, dt, c: SumPool2d(kernel=_tup(n.kernel_size), stride=_tup(n.stride),
                                                        padding=_tup(n.padding), **dict(c, shape=out(n))),
        nir.Flatten: lambda n, name, dt, c: Flatten(start_dim=int(n.start_dim), end_dim=int(n.end_dim),
                                                    in_shape=_shape(n.input_type), **dict(c, shape=out(n))),
        nir.LIF: _read_lif,
    }


SUPPORTED = "Input, Output, Affine, Linear, Conv1d, Conv2d, SumPool2d, Flatten, LIF"


def _read_node(table: dict, name: str, node, dt: float) -> Lowered:
    md = dict(getattr(node, "metadata", {}) or {})
    common = dict(name=name, layer=_meta_str(md, "layer"), layout=_meta_str(md, "layout"),
                  tokens=_meta_str(md, "tokens"), role=_meta_str(md, "role"))
    try:
        return table[type(node)](node, name, dt, common)
    except IRError as e:
        raise NirFormatError(f"NIR node {name!r}: {str(e).split(': ', 1)[-1]}") from None
    except (TypeError, ValueError) as e:
        raise NirFormatError(f"NIR node {name!r} has unreadable parameters ({e})") from None


def to_nir(graph: Graph):
    """The lowered graph as a nir.NIRGraph again (``lowered.to_nir_graph``: the exporter's own writers), the edges
    from ``graph.inputs``, the description as the graph's metadata. ``read_graph`` of it gives an equal graph."""
    from stata_deploy.description import encode

    edges = [(src, dst) for dst, srcs in graph.inputs.items() for src in srcs]
    return to_nir_graph(graph.ops, edges, {META_KEY: encode(graph.meta)} if graph.meta else {})


def write_graph(graph: Graph, path: str | Path) -> Path:
    """Write a lowered graph as a .nir file, atomically (``lowered.write_nir``)."""
    return write_nir(to_nir(graph), path)


def read_description(graph) -> dict:
    """The exporter's JSON description from a nir.NIRGraph's metadata ({} when absent)."""
    md = getattr(graph, "metadata", None) or {}
    raw = md.get(META_KEY)
    if raw is None:
        return {}
    if isinstance(raw, bytes):
        raw = raw.decode()
    if isinstance(raw, np.ndarray):
        raw = raw.item()
    try:
        desc = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise NirFormatError(f"graph metadata {META_KEY!r} is not valid JSON ({e})") from None
    if not isinstance(desc, dict):
        raise NirFormatError(f"graph metadata {META_KEY!r} must be a JSON object, got {type(desc).__name__}")
    return desc


def _host_op(h: dict) -> HostOp:
    """A host operation of the description as its core IR node (checked like any IR node)."""
    name, kind = h["name"], h["kind"]
    if kind not in HOST_KINDS:
        raise UnsupportedOpError(f"host operation {name!r} of kind {kind!r} is unknown to this reader "
                                 f"(known: {', '.join(HOST_KINDS)})")
    attrs = dict(h.get("attrs", {}))
    missing = [k for k in HOST_KINDS[kind][1] if k not in attrs]
    if missing:
        raise NirFormatError(f"host operation {name!r} ({kind}) lacks attrs {missing}")
    try:
        node = host_node(name, kind, attrs)
    except IRError as e:
        raise NirFormatError(f"host operation {name!r}: {str(e).split(': ', 1)[-1]}") from None
    return HostOp(node, tuple(h["inputs"]), h.get("output"), h.get("tokens"), h.get("layer"))


def _check_host_wiring(host_ops: list[HostOp], ops: dict) -> None:
    """Names unique among ops and host ops; inputs are output ports or earlier host ops (no cycles), with the
    kind's arity; results go to input ports no one else feeds; every host op's result is read."""
    seen: set[str] = set()
    read: set[str] = set()
    ports_written: set[str] = set()
    for h in host_ops:
        if h.name in ops or h.name in seen:
            raise NirFormatError(f"host operation {h.name!r}: its name is not unique in the graph")
        arity = HOST_KINDS[h.kind][0]
        if len(h.inputs) != arity:
            raise NirFormatError(f"host operation {h.name!r} ({h.kind}) takes {arity} input(s), got {len(h.inputs)}")
        for p in h.inputs:
            if p in seen:
                read.add(p)
            elif not isinstance(ops.get(p), OutputPort):
                raise NirFormatError(f"host operation {h.name!r} reads {p!r}, which is neither an output port of the "
                                     "graph nor an earlier host operation")
        if h.output is not None:
            if not isinstance(ops.get(h.output), InputPort) or h.output in ports_written:
                raise NirFormatError(f"host operation {h.name!r} writes {h.output!r}, which is not an input port of "
                                     "the graph (or another host operation writes it too)")
            ports_written.add(h.output)
        seen.add(h.name)
    unread = [h.name for h in host_ops if h.output is None and h.name not in read]
    if unread:
        raise NirFormatError(f"host operations {unread} have results that nothing reads")


def _check_dt(dt) -> float:
    from stata_deploy.config import is_number

    if not is_number(dt) or not np.isfinite(float(dt)) or float(dt) <= 0:
        raise NirFormatError(f"the Euler step dt must be a positive finite number, got {dt!r}")
    return float(dt)


def _check_T(desc: dict) -> int:
    """T from the description (top-level "T", else config.T, else 1), strictly an int in [1, MAX_T], and equal to
    the config's T when both are present; an invalid model config in the description is refused here too."""
    from stata_deploy.config import MAX_T, ModelConfig, is_int

    cfg_T = None
    if desc.get("config") is not None:
        try:
            cfg_T = ModelConfig.from_dict(desc["config"]).T
        except (TypeError, StataError) as e:
            raise NirFormatError(f"invalid model config in the file's stata-deploy description ({e})") from None
    T = desc.get("T", cfg_T if cfg_T is not None else 1)
    if not is_int(T) or not 1 <= T <= MAX_T:
        raise NirFormatError(f"the description's T must be an integer in [1, {MAX_T}] (timesteps), got {T!r}")
    if cfg_T is not None and T != cfg_T:
        raise NirFormatError(f"the description says T={T} but its model config says T={cfg_T}")
    return int(T)


def load_nir(path: str | Path):
    """nir.read with our errors."""
    import nir

    p = Path(path)
    if not p.is_file():
        raise NirFormatError(f"NIR file not found: {p}")
    try:
        return nir.read(str(p))
    except Exception as e:  # h5py/nir raise many kinds
        raise NirFormatError(f"{p} is not a readable NIR 1.0 file ({type(e).__name__}: {e})") from None


def from_nir(g, dt: float | None = None) -> Graph:
    """Build the IR from an in-memory nir.NIRGraph."""
    import nir

    desc = read_description(g)
    table = _read_table()
    for name, node in g.nodes.items():  # name an unsupported node before anything else goes wrong
        if isinstance(node, nir.NIRGraph):
            raise UnsupportedOpError(f"nested NIR subgraph {name!r} is not supported by this reader")
        if type(node) not in table:
            raise UnsupportedOpError(f"NIR node {name!r} of type {type(node).__name__} is not executable by this "
                                     f"reader (supported: {SUPPORTED})")
    if dt is None and "dt" not in desc:
        raise NirFormatError("this NIR file is not one exported by stata-deploy (no 'stata_deploy' description in its "
                             "metadata), so its Euler step dt is unknown; export it with `stata-deploy export --to nir`"
                             " (Python API: pass dt=)")
    dt = _check_dt(dt if dt is not None else desc["dt"])
    T = _check_T(desc)
    ops = {name: _read_node(table, name, node, dt) for name, node in g.nodes.items()}
    inputs: dict[str, list[str]] = {name: [] for name in ops}
    for src, dst in g.edges:
        if src not in ops or dst not in ops:
            raise NirFormatError(f"the graph has an edge {src!r} -> {dst!r} to a node that does not exist")
        inputs[dst].append(src)
    version = desc.get("format_version")
    old_kinds = sorted({str(h.get("kind")) for h in desc.get("host_ops", []) if isinstance(h, dict)}
                       & set(OLD_HOST_KINDS))
    if old_kinds or (isinstance(version, int) and version < NIR_FORMAT_VERSION and desc.get("host_ops")):
        raise NirFormatError(f"written by an older stata-deploy (NIR format {version}, host operations "
                             f"{old_kinds or 'per attention kind'}); re-export it: stata-deploy export RUN --to nir")
    if isinstance(version, int) and version > NIR_FORMAT_VERSION:
        raise NirFormatError(f"written by a newer stata-deploy (NIR format {version}; this reader knows "
                             f"{NIR_FORMAT_VERSION}): update stata-deploy")
    try:
        host_ops = [_host_op(h) for h in desc.get("host_ops", [])]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise NirFormatError(f"the file's description of its host operations is damaged ({type(e).__name__}: {e})") \
            from None
    _check_host_wiring(host_ops, ops)
    segments = {}
    try:
        for sid, s in desc.get("token_segments", {}).items():
            sched = np.asarray(s["schedule"], dtype=bool)
            pos = np.asarray(s["positions"], dtype=np.int64)
            if sched.shape != (T, len(pos)) or pos.ndim != 1:
                raise ValueError(f"segment {sid!r}: schedule of shape {sched.shape} for T={T} and {len(pos)} tokens")
            segments[sid] = TokenSegment(sid, s.get("site"), pos, sched)
        sites = {int(k): v for k, v in desc.get("sites", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise NirFormatError(f"the file's description of its token masks is damaged ({type(e).__name__}: {e})") \
            from None
    for site, sid in sites.items():
        if sid not in segments:
            raise NirFormatError(f"the description maps pruning site {site} to token segment {sid!r}, which it does "
                                 "not define")
    order = _toposort(inputs, host_ops)
    ops = {n: ops[n] for n in order}
    inputs = {n: tuple(inputs[n]) for n in order}
    try:
        order = desc.get("token_order")
        order = None if order is None else np.asarray(order, dtype=np.int64)
        if order is not None and (order.ndim != 1 or len(np.unique(order)) != len(order)):
            raise ValueError("token_order must list distinct positions")
    except (TypeError, ValueError) as e:
        raise NirFormatError(f"the file's description of its token order is damaged ({e})") from None
    image = desc.get("input")
    if image is None:
        ins = [o.name for o in ops.values() if isinstance(o, InputPort) and o.role is None]
        image = ins[0] if len(ins) == 1 else None
    return Graph(ops, inputs, tuple(host_ops), segments, T, dt, image, desc.get("logits"), desc, sites, order)


def read_graph(path: str | Path, dt: float | None = None) -> Graph:
    """Read a .nir file into the executable IR (see module doc). Refused (NirFormatError naming the file): non-finite
    node parameters, a non-positive or non-finite dt, T outside [1, MAX_T] or disagreeing with the description's
    model config, an invalid model config, damaged host-op / token-mask descriptions."""
    g = load_nir(path)
    try:
        return from_nir(g, dt)
    except NirFormatError as e:
        raise NirFormatError(f"{path}: {e}") from None


def host_ports(host_ops: list[HostOp]) -> dict[str, set[str]]:
    """Host op name -> the output ports it reads, directly or through earlier host ops."""
    out: dict[str, set[str]] = {}
    for h in host_ops:  # inputs are earlier host ops (checked) or ports
        out[h.name] = set().union(*(out.get(p, {p}) for p in h.inputs))
    return out


def _toposort(inputs: dict[str, list[str]], host_ops: list[HostOp]) -> list[str]:
    deps = {n: set(ins) for n, ins in inputs.items()}
    ports = host_ports(host_ops)
    for h in host_ops:
        if h.output is not None:
            deps[h.output] |= ports[h.name]  # the result port waits for the ports its host ops read
    order, seen, temp = [], set(), set()

    def visit(n):
        if n in seen:
            return
        if n in temp:
            raise NirFormatError(f"the graph has a cycle through {n!r}; this reader executes acyclic graphs only")
        temp.add(n)
        for d in sorted(deps[n]):
            visit(d)
        temp.discard(n)
        seen.add(n)
        order.append(n)

    import sys

    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    for n in inputs:
        visit(n)
    return order


# ------------------------------------------------------------------------------------------------- numerics
def conv2d(x: np.ndarray, w: np.ndarray, b, stride, padding, dilation, groups) -> np.ndarray:
    """x (B, Ci, H, W) -> (B, Co, H', W'), cross-correlation like torch.nn.functional.conv2d (zero padding).

    One (Co, Ci/groups) matrix product per kernel tap that has a nonzero weight, over the output positions whose
    input lies inside the image (no padded copy): the one-hot re-indexing kernels of the exporter (large kernels
    and paddings, a few nonzero taps) cost what they touch."""
    B, Ci, H, W = x.shape
    Co, cig, kh, kw = w.shape
    (ph, pw), (sh, sw), (dh, dw) = padding, stride, dilation
    Ho, Wo = conv_len(H, kh, sh, ph, dh), conv_len(W, kw, sw, pw, dw)
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros((B, Co, Ho, Wo))
    cog = Co // groups

    span = _span
    taps = np.argwhere(np.any(w != 0, axis=(0, 1)))
    for i, j in taps:
        y0, y1 = span(H, Ho, sh, ph, dh, i)
        x0, x1 = span(W, Wo, sw, pw, dw, j)
        if y0 >= y1 or x0 >= x1:
            continue
        iy, ix = y0 * sh - ph + i * dh, x0 * sw - pw + j * dw
        xs = x[:, :, iy:iy + sh * (y1 - y0 - 1) + 1:sh, ix:ix + sw * (x1 - x0 - 1) + 1:sw]  # (B, Ci, ny, nx)
        wt = w[:, :, i, j]
        if groups == 1:
            out[:, :, y0:y1, x0:x1] += np.tensordot(wt, xs, axes=([1], [1])).transpose(1, 0, 2, 3)
        else:
            for gi in range(groups):
                out[:, gi * cog:(gi + 1) * cog, y0:y1, x0:x1] += np.tensordot(
                    wt[gi * cog:(gi + 1) * cog], xs[:, gi * cig:(gi + 1) * cig], axes=([1], [1])).transpose(1, 0, 2, 3)
    if b is not None:
        out += np.asarray(b).reshape(1, Co, 1, 1)
    return out


def conv1d(x: np.ndarray, w: np.ndarray, b, stride: int, padding: int, dilation: int, groups: int) -> np.ndarray:
    """x (B, Ci, L) -> (B, Co, L'), torch.nn.functional.conv1d semantics (a conv2d over a height-1 image)."""
    y = conv2d(x[:, :, None, :], w[:, :, None, :], b, (1, stride), (0, padding), (1, dilation), groups)
    return y[:, :, 0, :]


def sumpool2d(x: np.ndarray, kernel, stride, padding) -> np.ndarray:
    B, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    xp = np.zeros((B, C, H + 2 * ph, W + 2 * pw))
    xp[:, :, ph:ph + H, pw:pw + W] = x
    out = np.zeros((B, C, Ho, Wo))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, :, i:i + sh * (Ho - 1) + 1:sh, j:j + sw * (Wo - 1) + 1:sw]
    return out


def _fire(h, v_th, ternary=False, strict=False):
    """Spike where h >= v_th (our tie rule, SpikingJelly's); ``strict``: h > v_th (snntorch's / norse's)."""
    s = ((h > v_th) if strict else (h >= v_th)).astype(np.float64)
    if ternary:
        s = s - ((h < -v_th) if strict else (h <= -v_th)).astype(np.float64)
    return s


def _heads(a: np.ndarray, heads: int) -> np.ndarray:
    """(B, D, h, w) token map/row (tokens = flattened h, w) -> (B, H, n, dh)."""
    B, D = a.shape[:2]
    return a.reshape(B, heads, D // heads, -1).transpose(0, 1, 3, 2)


def _unheads(y: np.ndarray, shape) -> np.ndarray:
    """(B, H, n, dh) -> (B, *shape)."""
    B, H, n, dh = y.shape
    return y.transpose(0, 1, 3, 2).reshape(B, *shape)


# ------------------------------------------------------------------------------------------------ execution
class _State:
    def __init__(self, strict: bool = False):
        self.v: dict[str, np.ndarray] = {}
        self.strict = strict


# ------------------------------------------------------------------------- host operations, one per IR node kind
# f(h, st, mask, *inputs) -> result; inputs (B, ...) arrays; mask: the (n,) schedule of h.tokens at t, or None.
def _scaled(h, y):
    """A Product's output times its ``scale``."""
    s = float(h.node.scale)
    return y if s == 1.0 else y * s


def _h_qk(h, st, mask, q, k):
    H = h.node.heads
    return _scaled(h, _heads(q, H) @ _heads(k, H).transpose(0, 1, 3, 2))


def _h_av(h, st, mask, a, v):
    y = _unheads(_scaled(h, a @ _heads(v, h.node.heads)), v.shape[1:])
    return y if mask is None else y * mask


def _h_ktv(h, st, mask, k, v):
    H = h.node.heads
    return _scaled(h, _heads(k, H).transpose(0, 1, 3, 2) @ _heads(v, H))


def _h_qktv(h, st, mask, q, m):
    y = _unheads(_scaled(h, _heads(q, h.node.heads) @ m), q.shape[1:])
    return y if mask is None else y * mask


def _h_relu(h, st, mask, x):
    y = np.maximum(x, 0.0)
    return y if mask is None else y * mask


def _h_ternary(h, st, mask, x):
    if mask is not None:
        x = x * mask  # a masked token's neuron gets no input
    tau, vth, vr = float(h.node.tau), float(h.node.v_th), float(h.node.v_reset)
    V = st.v.get(h.name)
    if V is None:
        V = np.full_like(x, vr)
    H = V + (x - (V - vr)) / tau
    s = _fire(H, vth, ternary=True, strict=st.strict)
    st.v[h.name] = np.where(s != 0, vr, H)
    return s if mask is None else s * mask


# IR node kind -> (inputs, attrs the description must give, function). A new host kind (a new IR Product or Neuron
# kind) is one entry here.
HOST_KINDS: dict[str, tuple] = {
    "qk": (2, ("heads",), _h_qk),
    "av": (2, ("heads",), _h_av),
    "ktv": (2, ("heads",), _h_ktv),
    "qktv": (2, ("heads",), _h_qktv),
    "relu": (1, (), _h_relu),
    "ternary": (1, ("tau", "v_th", "v_reset"), _h_ternary),
}


def _run_host(h: HostOp, vals: dict, hvals: dict, by_name: dict, st: _State, masks_t: dict, records: dict,
              record: bool):
    """h's result at this timestep (its host inputs first, each once per timestep: ``hvals``)."""
    if h.name in hvals:
        return hvals[h.name]
    ins = [_run_host(by_name[p], vals, hvals, by_name, st, masks_t, records, record) if p in by_name else vals[p]
           for p in h.inputs]
    y = HOST_KINDS[h.kind][2](h, st, masks_t.get(h.tokens) if h.tokens else None, *ins)
    hvals[h.name] = y
    if record and h.layer:
        records.setdefault(h.layer, []).append(y)
    return y


def simulate(graph: Graph, feeds: dict[str, np.ndarray], record: bool = True, strict_ties: bool = False):
    """Run the graph over T timesteps. feeds: input-port name -> (T, B, *shape). Returns (outputs, records):
    outputs: output-port name -> (T, B, *shape); records: op/host-record name -> list over t of (B, *shape).
    ``strict_ties``: the host operations' ternary neurons (described in our metadata, ``>=``) fire at ``>`` too
    (nir.LIF nodes always follow NIR's ``v > v_threshold``)."""
    T = graph.T
    first = next(iter(feeds.values()))
    B = first.shape[1]
    host_by_out = {h.output: h for h in graph.host_ops if h.output is not None}
    by_name = {h.name: h for h in graph.host_ops}
    for name, op in graph.ops.items():
        if isinstance(op, InputPort) and name not in host_by_out and name not in feeds:
            raise StataError(f"no value fed to input port {name!r} (a host-operation result or a segment input)")
    st = _State(strict_ties)
    outputs: dict[str, list] = {}
    records: dict[str, list] = {}
    masks_t = {}
    for t in range(T):
        masks_t = {sid: s.schedule[t].astype(np.float64) for sid, s in graph.segments.items()}
        vals: dict[str, np.ndarray] = {}
        hvals: dict[str, np.ndarray] = {}
        for name, op in graph.ops.items():
            m = masks_t.get(op.tokens) if op.tokens else None
            if isinstance(op, InputPort):
                if name in host_by_out:
                    y = _run_host(host_by_out[name], vals, hvals, by_name, st, masks_t, records, record)
                else:
                    y = np.asarray(feeds[name][t], dtype=np.float64)
            else:
                ins = graph.inputs[name]
                if ins:
                    x = vals[ins[0]]
                    for s in ins[1:]:
                        x = x + vals[s]
                else:
                    x = np.zeros((B, *op.shape))
                y = APPLY[type(op)](op, x, st, m)
            if m is not None:
                y = y * m
            vals[name] = y
            if isinstance(op, OutputPort):
                outputs.setdefault(name, []).append(y)
            if record and op.layer:
                records.setdefault(name, []).append(y)
    outs = {k: np.stack(v) for k, v in outputs.items()}
    return outs, records


# ------------------------------------------------------------------------- lowered nodes, one function per type
# f(node, x, state, mask) -> output; x: the sum of the node's inputs (B, *in_shape); mask: its schedule at t or None.
def _x_lif(op: LIF, x, st, mask):
    if mask is not None:
        x = x * mask  # a masked token receives no input: its membrane decays
    V = st.v.get(op.name)
    if V is None:
        V = np.broadcast_to(op.v_reset, x.shape).astype(np.float64)
    H = V + (op.r * x - (V - op.v_leak)) / op.tau_steps
    s = (H.astype(np.float32) > op.v_threshold32).astype(np.float64)  # NIR's v > v_threshold, in float32
    st.v[op.name] = np.where(s != 0, op.v_reset, H)
    return s


APPLY: dict[type, object] = {  # lowered node type -> f(node, x, state, mask); InputPort is fed, not applied
    OutputPort: lambda op, x, st, m: x,
    Affine: lambda op, x, st, m: np.einsum("...oi,b...i->b...o", op.weight, x, optimize=True) + op.bias,
    Conv2d: lambda op, x, st, m: conv2d(x, op.weight, op.bias, op.stride, op.padding, op.dilation, op.groups),
    Conv1d: lambda op, x, st, m: conv1d(x, op.weight, op.bias, op.stride, op.padding, op.dilation, op.groups),
    SumPool2d: lambda op, x, st, m: sumpool2d(x, op.kernel, op.stride, op.padding),
    Flatten: lambda op, x, st, m: x.reshape(x.shape[0], *op.shape),
    LIF: _x_lif,
}


def _ascending(pos: np.ndarray) -> np.ndarray:
    return np.argsort(pos, kind="stable")


def _to_torch_layout(graph: Graph, layout: str | None, tokens: str | None, arr: np.ndarray) -> np.ndarray:
    """arr (T, B, *shape) -> the torch slot layout of RunResult.spikes (tokens in ascending position order)."""
    if layout == "single":  # (T, B, D, 1[, 1]) -> (T, B, 1, D)
        T, B = arr.shape[:2]
        return arr.reshape(T, B, -1)[:, :, None, :]
    if layout == "grid_tokens":  # (T, B, D, g, g) -> (T, B, N, D)
        T, B, D = arr.shape[:3]
        return arr.reshape(T, B, D, -1).transpose(0, 1, 3, 2)
    if layout == "tokens":  # (T, B, D, n) [or (T, B, D, 1, n)] -> (T, B, k, D): kept tokens at each t, ascending
        a = (arr[:, :, :, 0, :] if arr.ndim == 5 else arr).transpose(0, 1, 3, 2)  # (T, B, n, D), graph order
        if tokens and tokens in graph.segments:
            seg = graph.segments[tokens]
            out = []
            for t in range(a.shape[0]):
                idx = np.flatnonzero(seg.schedule[t])
                out.append(a[t][:, idx[_ascending(seg.positions[idx])]])
            return np.stack(out)
        if graph.row_positions is not None and len(graph.row_positions) == a.shape[2]:
            return a[:, :, _ascending(graph.row_positions)]
        return a
    return arr


def encode(x: np.ndarray, T: int) -> np.ndarray:
    """Direct encoding: (B, C, H, W) repeated over T; (T, B, C, H, W) passes."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 4:
        return np.broadcast_to(x, (T, *x.shape))
    if x.ndim == 5:
        return x
    raise StataError(f"input must be (B, C, H, W) or (T, B, C, H, W), got shape {x.shape}")


def execute(graph: Graph, x: np.ndarray, record: bool = True, strict_ties: bool = False) -> RunResult:
    """Run a complete model graph (one image input port, host ops resolved) on x; torch-comparable RunResult."""
    if graph.input is None or graph.logits is None:
        raise StataError("this NIR file is not a complete stata-deploy model graph (a --split segment?); "
                         "use simulate() with one array per input port")
    xs = encode(x, graph.T)
    if xs.shape[0] != graph.T:
        raise StataError(f"input has {xs.shape[0]} timesteps, the model expects T={graph.T}")
    want = graph.ops[graph.input].shape
    if tuple(xs.shape[2:]) != tuple(want):
        raise StataError(f"input samples have shape {tuple(xs.shape[2:])}, the model expects {tuple(want)}")
    t0 = time.perf_counter()
    outs, recs = simulate(graph, {graph.input: xs}, record, strict_ties)
    seconds = time.perf_counter() - t0
    logits_t = outs[graph.logits].reshape(graph.T, xs.shape[1], -1)
    spikes = {}
    if record:
        for name, op in graph.ops.items():
            if op.layer and name in recs:
                spikes[op.layer] = _to_torch_layout(graph, op.layout, op.tokens, np.stack(recs[name]))
        for h in graph.host_ops:
            if h.layer and h.layer in recs:
                arr = np.stack(recs[h.layer])
                lay = "grid_tokens" if (arr.ndim == 5 and arr.shape[3] != 1) else "tokens"
                spikes[h.layer] = _to_torch_layout(graph, lay, h.tokens, arr)
    kept = {}
    B = xs.shape[1]
    for site, sid in graph.sites.items():
        pos = np.stack([graph.kept_positions(sid, t) for t in range(graph.T)])  # (T, k)
        kept[int(site)] = np.broadcast_to(pos[:, None, :], (graph.T, B, pos.shape[1])).copy()
    return RunResult(logits_t.astype(np.float32), spikes, np.asarray(xs, dtype=np.float32), seconds, kept)


# ------------------------------------------------------------------------------------------ checks / summary
def verify_lossless(path: str | Path) -> list[str]:
    """nir.read(f), nir.write to a temp file, nir.read again: returns the differences (empty list = lossless).
    Compares node types, every field (arrays by dtype, shape and value), node metadata, edges, graph metadata."""
    import os
    import tempfile

    import nir

    g1 = load_nir(path)
    fd, tmp = tempfile.mkstemp(suffix=".nir")
    os.close(fd)
    try:
        nir.write(tmp, g1)
        g2 = nir.read(tmp)
    finally:
        os.unlink(tmp)
    return nir_differences(g1, g2)


def nir_differences(g1, g2) -> list[str]:
    """What differs between two nir.NIRGraphs (empty list: the same): node types, every field (arrays by dtype,
    shape and value), node metadata, edges (as a set), graph metadata."""
    diffs: list[str] = []

    def same(a, b):
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (np.ndarray, np.generic)) or isinstance(b, (np.ndarray, np.generic)):
            a2, b2 = np.asarray(a), np.asarray(b)
            return a2.dtype == b2.dtype and a2.shape == b2.shape and np.array_equal(a2, b2)
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    if set(g1.nodes) != set(g2.nodes):
        diffs.append(f"node names differ: {sorted(set(g1.nodes) ^ set(g2.nodes))}")
    for name in set(g1.nodes) & set(g2.nodes):
        a, b = g1.nodes[name], g2.nodes[name]
        if type(a) is not type(b):
            diffs.append(f"{name}: type {type(a).__name__} -> {type(b).__name__}")
            continue
        da, db = a.to_dict(), b.to_dict()
        for k in set(da) | set(db):
            if not same(da.get(k), db.get(k)):
                diffs.append(f"{name}.{k} changed")
    if sorted(map(tuple, g1.edges)) != sorted(map(tuple, g2.edges)):
        diffs.append("edges differ")
    if not same(dict(g1.metadata or {}), dict(g2.metadata or {})):
        diffs.append("graph metadata differs")
    return diffs


def inspect_graph(graph: Graph) -> dict:
    """Node counts, neurons, synapses, masks, ports, host ops and what is not standard."""
    kinds: dict[str, int] = {}
    neurons = gates = 0
    synapses = 0
    syn_role: dict[str, int] = {}
    for op in graph.ops.values():
        kinds[op.kind] = kinds.get(op.kind, 0) + 1
        n_syn = 0
        if isinstance(op, LIF):
            if op.role == "gate":
                gates += int(np.prod(op.shape))
            else:
                neurons += int(np.prod(op.shape))
        elif isinstance(op, Affine):
            n_syn = int(np.count_nonzero(op.weight))
        elif isinstance(op, (Conv1d, Conv2d)):
            in_hw = op.in_len if isinstance(op, Conv1d) else op.in_hw
            ins = graph.inputs[op.name]
            if in_hw is None:  # no input_shape in the file: the predecessor's output
                in_hw = graph.ops[ins[0]].shape[1:] if ins else op.shape[1:]
            n_syn = conv_synapses(op.weight, in_hw, op.stride, op.padding, op.dilation)
        if n_syn:
            synapses += n_syn
            syn_role[op.role or "weights"] = syn_role.get(op.role or "weights", 0) + n_syn
    host_neurons = 0
    by_name = {h.name: h for h in graph.host_ops}
    for h in graph.host_ops:
        if h.kind == "ternary":  # stateful neurons, one per element of its input (elementwise host ops keep shapes)
            p = h.inputs[0]
            while p in by_name:
                p = by_name[p].inputs[0]
            host_neurons += int(np.prod(graph.ops[p].shape))
    ports_in = [dict(name=o.name, shape=list(o.shape), role=o.role or "image") for o in graph.ops.values()
                if isinstance(o, InputPort)]
    ports_out = [dict(name=o.name, shape=list(o.shape), role=o.role or ("logits" if o.name == graph.logits else None))
                 for o in graph.ops.values() if isinstance(o, OutputPort)]
    segs = {}
    for sid, s in graph.segments.items():
        segs[sid] = dict(site=s.site, tokens_in_graph=int(len(s.positions)), kept_per_timestep=s.schedule.sum(1).tolist(),
                         time_varying=bool((s.schedule != s.schedule[:1]).any()))
    masks = graph.meta.get("masks")
    return {
        "nodes": kinds,
        "neurons": neurons,
        "gate_neurons": gates,
        "host_neurons": host_neurons,
        "synapses": synapses,
        "synapses_by_role": syn_role,
        "inputs": ports_in,
        "outputs": ports_out,
        "host_ops": [dict(name=h.name, kind=h.kind, inputs=h.inputs, output=h.output or "host ops only")
                     for h in graph.host_ops],
        "masks": None if not masks else dict(mode=masks.get("mode"), n_full=masks.get("n_full"), T=masks.get("T"),
                                            segments=segs),
        "not_standard": graph.meta.get("not_standard", []),
        "standard_reader_computes": graph.meta.get("standard_reader_computes"),
        "exact_without_metadata": graph.meta.get("exact_without_metadata"),
        "T": graph.T,
        "dt": graph.dt,
    }
