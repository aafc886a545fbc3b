"""The SOP counter as a lowering of the IR: ``count(graph, result) -> OpsReport``.

The counting conventions are in stata_deploy/energy/counter.py's module doc. The graph is walked once in order; one
small function per node type (``COUNTS``) computes that node's value in the counter's layout from its inputs' values and
adds its LayerOps. Neuron outputs are not computed but read from the run (``RunResult.spikes``, key = node name),
the kept tokens of each pruning site from ``RunResult.kept``. Values are torch tensors (T, B, ...):

* feature maps (T, B, C, H, W), token rows (T, B, n, D), head-split products (T, B, H, a, b);
* None for the input currents of neurons (Conv, TokenLinear, BatchNorm outputs, products read only by a neuron),
  which counting never needs;
* token rows that hold real values (the anchor) keep only their integer part (0) in the value and are marked in
  ``real`` (T, B, n): their synaptic ops are MACs over all D entries.

A Neuron's updates and spikes are added to the layer of the op that drives it (through a BatchNorm, if not folded).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..results import RunResult
from ..nn.attention import _heads, _merge  # (T, B, N, D) <-> (T, B, H, N, dh): the model's own head split
from .report import CountError, LayerOps, OpsReport
from .nodes import (Add, BatchNorm, Conv, Graph, Head, Input, MaxPool, Neuron, Node, Product, Rejoin, Scorer, Select,
                    TokenLinear, Tokens)


# ------------------------------------------------------------------------------------------------ helpers
def _t(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    return torch.from_numpy(np.asarray(a))


def _per_t(x: torch.Tensor) -> torch.Tensor:
    """Sum everything but dim 0 -> (T,) float64. Bool tensors are counted in int64; float tensors (integer-valued
    counts) are summed per (t, b) in their own dtype (exact below 2**24 per sample) and then in float64."""
    if x.dtype == torch.bool:
        return x.reshape(x.shape[0], -1).sum(1).to(torch.float64)
    if x.dim() < 2:
        return x.to(torch.float64)
    return x.reshape(x.shape[0], x.shape[1], -1).sum(-1).to(torch.float64).sum(1)


def _nz(x: torch.Tensor) -> torch.Tensor:
    return (x != 0).to(torch.float32)


def _fanout_map(h: int, w: int, k: int = 3, stride: int = 1, pad: int = 1) -> torch.Tensor:
    """(H, W): how many output positions of a k x k conv each input pixel reaches (border pixels reach fewer)."""

    def valid(n):  # output o reads input i = o * stride - pad + d, kernel offset d in [0, k)
        n_out = (n + 2 * pad - k) // stride + 1
        return torch.tensor([sum(1 for o in range(n_out) for d in range(k) if o * stride - pad + d == i)
                             for i in range(n)], dtype=torch.float64)

    return valid(h)[:, None] * valid(w)[None, :]


def _window_inputs(n: int, k: int, stride: int, pad: int) -> torch.Tensor:
    """(n_out,): how many real (non-padding) inputs each output window of a k-wide pooling along one axis covers."""
    n_out = (n + 2 * pad - k) // stride + 1
    return torch.tensor([sum(1 for d in range(k) if 0 <= o * stride - pad + d < n) for o in range(n_out)],
                        dtype=torch.float64)


def _matmul_pairs(a_nz: torch.Tensor, b_nz: torch.Tensor) -> torch.Tensor:
    """Number of (i, k, j) with a[..., i, k] != 0 and b[..., k, j] != 0, per timestep: sum_k colnz(a)_k rownz(b)_k."""
    ca = a_nz.sum(-2, dtype=torch.float64)  # (..., K)
    rb = b_nz.sum(-1, dtype=torch.float64)  # (..., K)
    return _per_t(ca * rb)


def _topk_compares(n: int, k: int) -> float:
    """A heap-selection estimate of top-k among n: n x ceil(log2(k + 1)) compares (none when all are kept)."""
    return float(n * max(1, math.ceil(math.log2(k + 1)))) if k < n else 0.0


# ------------------------------------------------------------------------------------------- the walk
class _Count:
    """State of one counting walk: values, real rows, layers, and kept positions per Select."""

    def __init__(self, graph: Graph, result: RunResult, B: int):
        self.graph, self.result, self.B, self.T = graph, result, B, graph.T
        self.values: dict[str, torch.Tensor | None] = {}
        self.real: dict[str, torch.Tensor | None] = {}  # (T, B, n) rows holding real values (the anchor)
        self.layer_of: dict[str, LayerOps] = {}  # node name -> the LayerOps its neuron's counts go to
        self.layers: list[LayerOps] = []
        self.pos: dict[str, torch.Tensor] = {}  # Select name -> (T, B, k) global positions of its rows
        self.local: dict[int, torch.Tensor] = {}  # site -> (T, B, k) the rows its Select took from its input
        self.kept = {int(s): _t(g).long() for s, g in result.kept.items()}
        self._idle: dict[str, torch.Tensor | None] = {}  # Select name -> idle_tokens
        self._row_sums: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def src(self, node: Node, i: int = 0) -> str:
        return self.graph.inputs[node.name][i]

    def spikes(self, name: str) -> torch.Tensor:
        s = self.result.spikes.get(name)
        if s is None:
            raise CountError(f"the run result has no output for neuron layer {name!r} (was it recorded?)")
        return _t(s)

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.T, dtype=torch.float64)

    def add(self, name, kind, fan_out=0, events=None, **counts) -> LayerOps:
        """A new layer; counts are summed over the batch here and stored per inference (divided by B)."""
        ev = events.to(torch.float64).numpy() / self.B if events is not None else None
        lo = LayerOps(name, kind, None, fan_out, {}, ev)
        self.extend(lo, **counts)
        self.layers.append(lo)
        return lo

    def extend(self, lo: LayerOps, **counts) -> None:
        """Add counts (per timestep, summed over the batch) to layer ``lo``: a kind it already has accumulates."""
        for f, v in counts.items():
            if v is not None:
                v = v.to(torch.float64).numpy() / self.B
                lo.counts_t[f] = lo.counts_t[f] + v if f in lo.counts_t else v

    def needed(self, node: Node) -> bool:
        """Whether some reader of ``node`` needs its value (neurons read only currents, and those come recorded)."""
        return any(not isinstance(self.graph.node(r), Neuron) for r in self.graph.readers(node.name))

    def positions(self, value: str) -> torch.Tensor:
        """(T, B, n) global token positions of the rows of ``value``."""
        s = self.graph.schedules[value]
        if s is not None:
            return self.pos[s]
        n = self.graph.shapes[value][0]
        return torch.arange(n).expand(self.T, self.B, n)

    def idle_tokens(self, select: str) -> torch.Tensor | None:
        """(T,) token-slots whose membranes decay after drop Select ``select`` (summed over the batch): tokens whose
        neurons exist but that are not kept at that timestep. None when there are none. Once per Select."""
        if select in self._idle:
            return self._idle[select]
        sel = self.graph.node(select)
        pos = self.pos[select]  # (T, B, k)
        if sel.mode != "drop":
            idle = None
        else:
            if sel.static:  # the neurons after the site: its schedule's tokens (DropNeverKept), else its input's
                union = torch.tensor(float(self.graph.population(select) * self.B), dtype=torch.float64)
            else:  # known at run time only: the tokens this run kept at some timestep
                present = torch.zeros(self.B, self.graph.n_tokens, dtype=torch.bool)
                for t in range(self.T):
                    present.scatter_(1, pos[t], True)
                union = present.sum(1, dtype=torch.float64).sum()
            idle = (union - float(self.B * pos.shape[-1])).expand(self.T).clone()
            idle = None if float(idle.abs().sum()) == 0 else idle
        self._idle[select] = idle
        return idle


@torch.no_grad()
def count(graph: Graph, result: RunResult) -> OpsReport:
    """Count the operations of one batch run (``result``) of the network ``graph`` describes (see counter.py)."""
    if result.inputs is None:
        raise CountError("the run result has no encoded input (RunResult.inputs): cannot count the first layer")
    x = _t(result.inputs)
    if x.dim() != 5:
        raise CountError(f"RunResult.inputs must be (T, B, C, H, W), got shape {tuple(x.shape)}")
    T, B = x.shape[:2]
    if T != graph.T:
        raise CountError(f"the run result has T={T}, the model T={graph.T}")
    c = _Count(graph, result, B)
    for node in graph.nodes:
        fn = COUNTS.get(type(node))
        if fn is None:
            raise CountError(f"no op counting for IR node type {type(node).__name__} ({node.name!r})")
        c.values[node.name] = fn(c, node, *(c.values[i] for i in graph.inputs[node.name]))
    return OpsReport(c.layers, B, T)


# ---------------------------------------------------------------------------------- one function per node
def _input(c: _Count, node: Input):
    return _t(c.result.inputs)


def _conv(c: _Count, node: Conv, x):
    """Value-weighted ACs on integer inputs (per sample and timestep), MACs on real-valued ones."""
    fmap = _fanout_map(x.shape[-2], x.shape[-1], node.kernel, node.stride, node.padding)
    fmap = fmap.to(x.dtype if x.is_floating_point() else torch.float64)
    integer = (x == x.round()).flatten(2).all(-1)  # (T, B): this sample's input is integer-valued
    cout = node.out_channels
    wabs = (x.abs() * fmap).flatten(2).sum(-1).to(torch.float64) * cout  # (T, B)
    wnz = (_nz(x) * fmap).flatten(2).sum(-1).to(torch.float64) * cout
    c.layer_of[node.name] = c.add(node.name, "conv", cout * node.kernel**2, events=wnz.sum(1),
                                  macs=(wnz * ~integer).sum(1), acs=(wabs * integer).sum(1))


def _token_linear(c: _Count, node: TokenLinear, x):
    """ACs = sum |x| x fan-out over integer rows; a real row (the anchor) costs D_in MACs x fan-out."""
    src = c.src(node)
    if c._row_sums is not None and c._row_sums[0] == src:  # q, k, v read the same rows: reduce them once
        absx, nzx = c._row_sums[1:]
    else:
        absx = x.abs().sum(-1).to(torch.float64)  # (T, B, n), row sums are exact in float32
        nzx = (x != 0).sum(-1).to(torch.float64)
        c._row_sums = (src, absx, nzx)
    real, fo, din = c.real.get(src), node.out_features, node.in_features
    if real is not None and bool(real.any()):
        r = real.to(torch.float64)
        acs = (absx * (1 - r)).flatten(1).sum(1) * fo
        macs = (r * din).flatten(1).sum(1) * fo
        events = ((nzx * (1 - r)) + r * din).flatten(1).sum(1) * fo
    else:
        acs = absx.flatten(1).sum(1) * fo
        macs = c.zeros()
        events = nzx.flatten(1).sum(1) * fo
    c.layer_of[node.name] = c.add(node.name, "linear", fo, events=events, macs=macs, acs=acs)


def _batchnorm(c: _Count, node: BatchNorm, x):
    c.layer_of[node.name] = c.layer_of[c.src(node)]  # part of the neuron update, not a synaptic op


def _neuron(c: _Count, node: Neuron, x):
    """Updates of every neuron of every row present; idle updates of decaying ones; spikes = non-zero outputs."""
    s = c.spikes(node.name)  # (T, B, ...)
    lo = c.layer_of.get(c.src(node))
    if lo is None:
        raise CountError(f"neuron {node.name!r} is not driven by a counted op")
    per = s[0, 0].numel()  # neurons per sample per timestep
    sel = c.graph.schedules[node.name]
    idle = c.idle_tokens(sel) if (sel is not None and node.stateful) else None
    feat = per // s.shape[2] if s.dim() > 2 else per
    lo.neuron = node.name
    c.extend(lo, neuron_updates=torch.full((c.T,), float(per * c.B), dtype=torch.float64), spikes=_per_t(s != 0),
             idle_neuron_updates=idle * feat if idle is not None else None)
    return s.float()


def _max_pool(c: _Count, node: MaxPool, x):
    """Pooling spikes is an OR: (real inputs of its window - 1) compares per output; padding is never compared, so a
    border window of a padded pool costs fewer (3x3 / padding 1: 3 at a corner, 5 on an edge, 8 inside)."""
    y = F.max_pool2d(x.flatten(0, 1).float(), node.kernel, node.stride, node.padding)
    y = y.reshape(c.T, c.B, *y.shape[1:])
    wh = _window_inputs(x.shape[-2], node.kernel, node.stride, node.padding)
    ww = _window_inputs(x.shape[-1], node.kernel, node.stride, node.padding)
    per_channel = float((wh[:, None] * ww[None, :] - 1).sum())  # compares over one output map
    c.add(node.name, "pool", compares=c.zeros() + per_channel * y.shape[2] * c.B)
    return y


def _add(c: _Count, node: Add, a, b):
    reals = [r for r in (c.real.get(c.src(node, 0)), c.real.get(c.src(node, 1))) if r is not None]
    c.real[node.name] = reals[0] if len(reals) == 1 else (reals[0] | reals[1] if reals else None)
    return a + b


def _tokens(c: _Count, node: Tokens, x):
    x = x.flatten(3).transpose(2, 3).to(torch.float32)  # (T, B, N, D), values in {0, 1, 2}
    if node.anchor:
        T, B, _, D = x.shape
        x = torch.cat([x.new_zeros(T, B, 1, D), x], 2)  # the anchor row's integer part (its real part is implicit)
        real = torch.zeros(T, B, x.shape[2], dtype=torch.bool)
        real[:, :, :1] = True
        c.real[node.name] = real
    return x


def _kept(c: _Count, site: int) -> torch.Tensor:
    if site not in c.kept:
        raise CountError(f"the run result has no kept tokens for pruning site {site}")
    g = c.kept[site]
    if g.dim() != 3 or g.shape[0] != c.T or g.shape[1] != c.B:
        raise CountError(f"kept tokens of site {site} must be (T={c.T}, B={c.B}, k), got {tuple(g.shape)}")
    return g


def _check_schedule(c: _Count, node: Select, g: torch.Tensor) -> None:
    """A static Select: the run must have kept exactly its schedule's positions at every timestep (ascending)."""
    want = [np.flatnonzero(node.schedule[t]) for t in range(c.T)]
    for t in range(c.T):
        if g.shape[-1] != len(want[t]):
            raise CountError(f"site {node.site}: the run kept {g.shape[-1]} tokens per timestep, its static mask "
                             f"keeps {len(want[t])}: the run did not use the masks it is counted with")
        bad = (g[t] != torch.from_numpy(want[t]).to(g.dtype)).any(-1)  # (B,)
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise CountError(f"site {node.site}: the run kept tokens {g[t, b].tolist()} at timestep {t} (sample {b}), "
                             f"its static mask keeps {want[t].tolist()}: the run did not use the masks it is counted "
                             "with")


def _select(c: _Count, node: Select, x, scores=None):
    """Gather the kept rows (RunResult.kept, checked against a static Select's schedule); a dynamic selection's top-k
    compares go on its scorer's layer."""
    g = _kept(c, node.site)  # (T, B, k) global positions
    if node.static:
        _check_schedule(c, node, g)
    src = c.src(node)
    pos = c.positions(src)
    inv = torch.full((c.T, c.B, c.graph.n_tokens), -1, dtype=torch.long)
    inv.scatter_(2, pos, torch.arange(pos.shape[-1]).expand_as(pos).contiguous())
    local = torch.gather(inv, 2, g)
    if bool((local < 0).any()):
        raise CountError(f"site {node.site} keeps tokens that an earlier site dropped: the run result is inconsistent")
    c.pos[node.name], c.local[node.site] = g, local
    if c.real.get(src) is not None:
        c.real[node.name] = torch.gather(c.real[src], 2, local)
    if not node.static:
        n_img, k_img = x.shape[2] - node.n_fixed, g.shape[-1] - node.n_fixed
        compares = c.zeros()
        if node.timestep_wise:
            compares += _topk_compares(n_img, k_img) * c.B
        else:
            compares[-1] += _topk_compares(n_img, k_img) * c.B
        c.extend(c.layer_of[c.src(node, 1)], compares=compares)
    return torch.gather(x, 2, local.unsqueeze(-1).expand(*local.shape, x.shape[-1]))


def _rejoin(c: _Count, node: Rejoin, x, y):
    """Skip mode: the block's rows go back to their positions; the other tokens keep their input."""
    local = c.local[node.site]
    c.real[node.name] = c.real.get(c.src(node))
    return x.scatter(2, local.unsqueeze(-1).expand(*local.shape, x.shape[-1]), y)


def _head(c: _Count, node: Head, x):
    """The token mean (one AC per non-zero term; its 1/n folds into the weights), then MACs on its non-zeros."""
    img = x[:, :, node.n_fixed:]
    c.add(f"{node.name}.pool", "pool", acs=_per_t(_nz(img)))
    nz = _per_t(_nz(img.sum(2))) * node.out_features
    c.add(node.name, "head", node.out_features, events=nz, macs=nz)


# ------------------------------------------------------------------------------------- attention products
def _qk(c, p, a, b):
    q, k = _heads(a, p.heads), _heads(b, p.heads)
    return _matmul_pairs(_nz(q), _nz(k).transpose(-1, -2)), q @ k.transpose(-1, -2) * p.scale


def _av(c, p, a, b):
    v = _heads(b, p.heads)
    return _matmul_pairs(_nz(a), _nz(v)), (lambda: _merge(a @ v) * p.scale)


def _kv(c, p, a, b):
    both = _nz(a) * _nz(b)
    return _per_t(both), (lambda: a * b * p.scale)


def _kv_sum(c, p, a):
    return _per_t(_nz(a)), (lambda: a.sum(2, keepdim=True) * p.scale)


def _qkv_gate(c, p, a, g):
    y = a * g * p.scale  # (T, B, n, D) x (T, B, 1, D)
    return _per_t(_nz(y)), y


def _ktv(c, p, a, b):
    kt, v = _heads(a, p.heads).transpose(-1, -2), _heads(b, p.heads)
    return _matmul_pairs(_nz(kt), _nz(v)), kt @ v * p.scale


def _qktv(c, p, a, m):
    q = _heads(a, p.heads)
    return _matmul_pairs(_nz(q), _nz(m)), (lambda: _merge(q @ m) * p.scale)


# kind -> (c, node, *inputs) -> (attention ACs per timestep, value or a function computing it when needed)
PRODUCTS: dict[str, Callable] = {"qk": _qk, "av": _av, "kv": _kv, "kv_sum": _kv_sum, "qkv_gate": _qkv_gate,
                                 "ktv": _ktv, "qktv": _qktv}


def _product(c: _Count, node: Product, *ins):
    """Pairs of non-zero operands (see sops.py); every product here has a {-1, 0, 1} operand: an accumulate."""
    fn = PRODUCTS.get(node.kind)
    if fn is None:
        raise CountError(f"no op counting for attention product {node.kind!r} ({node.name})")
    acs, value = fn(c, node, *ins)
    c.layer_of[node.name] = c.add(node.name, "attention", attention_acs=acs)
    if callable(value):
        return value() if c.needed(node) else None
    return value


# ------------------------------------------------------------------------------------------------ scorers
def _row_terms(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """(T, B, n) terms of each row's channel sum ``|x|.sum(-1)``: one AC per non-zero entry; a real row (the
    anchor, marked in ``real``) has all D entries non-zero."""
    terms = (x != 0).sum(-1).to(torch.float64)
    return terms if real is None else torch.where(real, float(x.shape[-1]), terms)


def _activity(c: _Count, node: Scorer, x) -> torch.Tensor:
    """(T,) ACs of the token activity over every row, the anchor's too (the model scores all rows; top-k then
    skips the fixed ones)."""
    return _per_t(_row_terms(x, c.real.get(c.src(node))))


def _score_anchor_row(c, node, x, q, k, over_time: bool):
    """STATA / AT: the anchor row Q_0 K^T per head, mean over heads, the activity tie-break over every row (anchor
    included: the model scores all rows, then top-k skips the fixed ones). STATA per timestep; AT: the score's mean
    over T, the activity of the time-mean x̄ (accumulating x over T, then |x̄| over channels, at the last step).
    The tie-break ``act / (amax(act) + 1) * c + score`` (``pruning.scorers._tie_break``): n - 1 compares for the
    amax, one add for + 1, and per row a divide, a scale and an add (3 n ACs)."""
    B = c.B
    H, n = q.shape[2], q.shape[3]
    att = _matmul_pairs(_nz(q[:, :, :, :1]), _nz(k).transpose(-1, -2))  # Q_0 K^T per head
    acs = c.zeros() + float(B * H * n)  # mean over heads
    tie_acs, tie_compares = float(B * (3 * n + 1)), float(B * (n - 1))
    compares = c.zeros()
    if not over_time:
        acs += _activity(c, node, x) + tie_acs  # tie-break: |x| over channels, per timestep
        return acs, c.zeros(), att, compares + tie_compares
    acs += float(B * n)  # the score's mean over timesteps
    acs += _activity(c, node, x)  # x̄ = mean over t: one AC per non-zero term
    real = c.real.get(c.src(node))
    xbar = _row_terms(x.sum(0, keepdim=True), None if real is None else real.any(0, keepdim=True))  # (1, B, n)
    acs[-1] += float(xbar.sum()) + tie_acs  # tie-break on |x̄| over channels, once
    compares[-1] += tie_compares
    return acs, c.zeros(), att, compares


def _score_ssa(c, node, x, q, k):
    """SSA-average: the attention each token receives, mean over queries, heads and timesteps."""
    B = c.B
    H, n = q.shape[2], q.shape[3]
    acs = c.zeros() + _per_t(_nz(q))  # sum over queries
    att = _matmul_pairs(_nz(q.sum(3, keepdim=True)), _nz(k).transpose(-1, -2))
    acs += float(B * H * n) + float(B * n)  # mean over heads, over timesteps
    return acs, c.zeros(), att


def _score_l1(c, node, x, q, k):
    """|x| over channels of every row (the anchor's too), then the mean over T."""
    return c.zeros() + _activity(c, node, x) + float(c.B * x.shape[2]), c.zeros(), c.zeros()


def _score_random(c, node, x, q, k):
    return c.zeros(), c.zeros(), c.zeros()


def _score_tp(c, node, x, q, k):
    """TP on the image rows: channel and time means, temporal difference, channel sum + box filter (ACs); the
    norms, cosine and the two softmaxes (MACs: one per multiply, divide, square root or exp)."""
    B, T = c.B, c.T
    x = x[:, :, node.n_fixed:]
    n_img, C = x.shape[2], x.shape[3]
    acs, macs = c.zeros(), c.zeros()
    nzx = _per_t(_nz(x))
    acs += nzx  # channel mean per timestep
    if T > 1:
        acs[1:] += float(2 * B * n_img)  # |m_t - m_{t-1}| and its mean over t
    acs += nzx  # mean over t
    box = float(_fanout_map(node.grid, node.grid).sum()) * B  # 3x3 box filter (count_include_pad=False)
    acs[-1] += float(_nz(x.sum(0)).sum()) + box  # channel sum of the time mean, then one add per window element
    macs[-1] += float(B * n_img * C) + float(B * n_img * 5)  # norm squares; cos: ctx*s, |ctx|, sqrt, prod, div
    macs[-1] += float(B * n_img * 3 * 2) + float(B * n_img)  # two softmaxes (exp, add, div) and their sum
    return acs, macs, c.zeros()


# pruning method -> (c, node, x, q, k) -> (acs, macs, attention_acs[, compares]) per timestep. A new scorer = one entry.
SCORER_COUNTS: dict[str, Callable] = {
    "stata": lambda c, n, x, q, k: _score_anchor_row(c, n, x, q, k, over_time=False),
    "anchor": lambda c, n, x, q, k: _score_anchor_row(c, n, x, q, k, over_time=True),
    "ssa": _score_ssa,
    "l1": _score_l1,
    "random": _score_random,
    "tp": _score_tp,
}


def _scorer(c: _Count, node: Scorer, x, q=None, k=None):
    fn = SCORER_COUNTS.get(node.method)
    if fn is None:
        raise CountError(f"no op counting for pruning method {node.method!r}")
    if q is not None:
        q, k = _heads(q, node.heads), _heads(k, node.heads)
    acs, macs, att, *compares = fn(c, node, x, q, k)
    c.layer_of[node.name] = c.add(node.name, "scorer", acs=acs, macs=macs, attention_acs=att,
                                  compares=compares[0] if compares else None)


# node type -> count function (c, node, *input values) -> the node's value. A new node type = one entry.
COUNTS: dict[type, Callable] = {
    Input: _input,
    Conv: _conv,
    TokenLinear: _token_linear,
    BatchNorm: _batchnorm,
    Neuron: _neuron,
    MaxPool: _max_pool,
    Add: _add,
    Tokens: _tokens,
    Product: _product,
    Select: _select,
    Scorer: _scorer,
    Rejoin: _rejoin,
    Head: _head,
}


def count_ops(cfg, result: RunResult, masks=None) -> OpsReport:
    """Count the operations of one batch run of the model described by ``cfg`` (see the module doc).

    ``masks``: the static masks the run used (None: dynamic pruning as configured in cfg, scorer included).
    ``count`` on the IR of ``cfg`` (its structure, no weights), with static masks applied as passes.
    """
    from .build import structure_ir
    from .passes import ApplyMasks, DropNeverKept

    graph = structure_ir(cfg)
    if masks is not None:
        masks.check_model(cfg)
        graph = graph.transform(ApplyMasks(masks)).transform(DropNeverKept())
    return count(graph, result)
