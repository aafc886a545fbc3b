"""The network as a small typed graph: one frozen dataclass per operation, and the ``Graph`` that wires them.

Read this file first, then build.py (torch model -> Graph), passes.py (Graph -> new Graph), count.py (a lowering).

Shapes are per sample and per timestep: a feature map is (C, H, W), token rows are (n, D) (the n tokens present at
that timestep), a head-split tensor is (H, a, b). Weights are read-only numpy arrays; they are None in a
structure-only graph (``build_ir(model, weights=False)``), which is all op counting needs.

Node names are the torch module paths of what they compute: ``blocks.0.attn.q`` is the LinearBN module (its
Linear becomes a TokenLinear node of that name, its BatchNorm the node ``blocks.0.attn.q.bn``), a Neuron node's name
is its module path, i.e. its key in ``RunResult.spikes``. Nodes without a module of their own (residual sums, token
rows, pruning) get a path-like name inside the block they belong to (``blocks.1.select``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable

import numpy as np

from ..errors import StataError
from ..pruning.scorers import num_keep

Shape = tuple[int, ...]


class IRError(StataError):
    """An IR node or graph is malformed: a field out of range, or inputs whose shapes do not fit."""


def _readonly(a) -> np.ndarray:
    a = np.array(a)  # a copy: the node owns it
    a.setflags(write=False)
    return a


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


@dataclass(frozen=True, eq=False, kw_only=True)
class Node:
    """Base of every node. Nodes are immutable (arrays are read-only copies): passes build new ones."""

    name: str  # unique in a graph (see the module doc)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise IRError(f"an IR node needs a name, got {self.name!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                object.__setattr__(self, f.name, _readonly(v))
        self.check()

    def fail(self, msg: str):
        raise IRError(f"IR node {self.name!r} ({type(self).__name__}): {msg}")

    def check(self) -> None:
        """Validate the fields (raise IRError via ``fail``)."""

    def out_shape(self, *ins: Shape) -> Shape:
        """The output shape for input shapes ``ins`` (raise IRError when they do not fit)."""
        raise NotImplementedError

    def follows(self, schedules: list[str | None]) -> str | None:
        """Which Select's token schedule this node's rows follow, given its inputs' (None: all tokens)."""
        return next((s for s in schedules if s is not None), None)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and all(_same(getattr(self, f.name), getattr(other, f.name))
                                                  for f in fields(self))

    __hash__ = None  # mutable-looking numpy fields: compare with ==, do not hash


def _positive(node: Node, **values) -> None:
    for k, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            node.fail(f"{k} must be a positive integer, got {v!r}")


def _array(node: Node, what: str, a, shape: Shape) -> None:
    if a is not None and a.shape != shape:
        node.fail(f"{what} has shape {a.shape}, expected {shape}")


def _rows(node: Node, x: Shape, what: str = "input") -> tuple[int, int]:
    if len(x) != 2:
        node.fail(f"{what} must be token rows (n, D), got shape {x}")
    return x


def _chw(node: Node, x: Shape) -> tuple[int, int, int]:
    if len(x) != 3:
        node.fail(f"input must be a feature map (C, H, W), got shape {x}")
    return x


# ------------------------------------------------------------------------------------------------- the nodes
@dataclass(frozen=True, eq=False, kw_only=True)
class Input(Node):
    """The encoded input x[t], t = 0..T-1: an image repeated over T timesteps, or T event frames."""

    channels: int  # C
    height: int  # H, pixels
    width: int  # W, pixels
    T: int  # timesteps

    def check(self):
        _positive(self, channels=self.channels, height=self.height, width=self.width, T=self.T)

    def out_shape(self) -> Shape:
        return (self.channels, self.height, self.width)


@dataclass(frozen=True, eq=False, kw_only=True)
class Conv(Node):
    """y[t] = conv2d(x[t], weight, stride, padding) + bias: a stem conv or the relative-position conv.

    (C_in, H, W) -> (C_out, H', W') with H' = (H + 2 padding - kernel) // stride + 1.
    """

    in_channels: int  # C_in
    out_channels: int  # C_out
    kernel: int  # side of the square kernel, pixels
    stride: int  # pixels
    padding: int  # zeros added on every border, pixels
    weight: np.ndarray | None = None  # (C_out, C_in, kernel, kernel); None in a structure-only graph
    bias: np.ndarray | None = None  # (C_out,); None: no bias (or a structure-only graph)

    def check(self):
        _positive(self, in_channels=self.in_channels, out_channels=self.out_channels, kernel=self.kernel,
                  stride=self.stride)
        if not isinstance(self.padding, int) or self.padding < 0:
            self.fail(f"padding must be a non-negative integer, got {self.padding!r}")
        _array(self, "weight", self.weight, (self.out_channels, self.in_channels, self.kernel, self.kernel))
        _array(self, "bias", self.bias, (self.out_channels,))

    def out_shape(self, x: Shape) -> Shape:
        c, h, w = _chw(self, x)
        if c != self.in_channels:
            self.fail(f"input has {c} channels, the conv expects {self.in_channels}")
        side = lambda n: (n + 2 * self.padding - self.kernel) // self.stride + 1
        if side(h) < 1 or side(w) < 1:
            self.fail(f"input {h}x{w} is smaller than the kernel")
        return (self.out_channels, side(h), side(w))


@dataclass(frozen=True, eq=False, kw_only=True)
class TokenLinear(Node):
    """y[t, n] = weight @ x[t, n] + bias for every token row n: (n, in_features) -> (n, out_features)."""

    in_features: int  # D_in
    out_features: int  # D_out
    weight: np.ndarray | None = None  # (D_out, D_in); None in a structure-only graph
    bias: np.ndarray | None = None  # (D_out,); None: no bias (or a structure-only graph)

    def check(self):
        _positive(self, in_features=self.in_features, out_features=self.out_features)
        _array(self, "weight", self.weight, (self.out_features, self.in_features))
        _array(self, "bias", self.bias, (self.out_features,))

    def out_shape(self, x: Shape) -> Shape:
        n, d = _rows(self, x)
        if d != self.in_features:
            self.fail(f"input rows have {d} features, the layer expects {self.in_features}")
        return (n, self.out_features)


@dataclass(frozen=True, eq=False, kw_only=True)
class BatchNorm(Node):
    """Inference BatchNorm per channel c: y = (x - mean[c]) / sqrt(var[c] + eps) * gamma[c] + beta[c].

    Channels are dim 0 of a feature map and the last dim of token rows. ``FoldBatchNorm`` folds it into the
    Conv / TokenLinear before it.
    """

    features: int  # channels
    eps: float  # added to the variance
    mean: np.ndarray | None = None  # (features,) running mean
    var: np.ndarray | None = None  # (features,) running variance
    gamma: np.ndarray | None = None  # (features,) scale
    beta: np.ndarray | None = None  # (features,) shift

    def check(self):
        _positive(self, features=self.features)
        if not self.eps > 0:
            self.fail(f"eps must be positive, got {self.eps!r}")
        for what in ("mean", "var", "gamma", "beta"):
            _array(self, what, getattr(self, what), (self.features,))

    def out_shape(self, x: Shape) -> Shape:
        c = x[0] if len(x) == 3 else _rows(self, x)[1]
        if c != self.features:
            self.fail(f"input has {c} channels, the BatchNorm has {self.features}")
        return x


NEURON_KINDS = ("lif", "ternary", "relu")


@dataclass(frozen=True, eq=False, kw_only=True)
class Neuron(Node):
    """A multi-step neuron per element (stata_deploy/neurons.py), over t = 0..T-1:

        H[t] = V[t-1] + (X[t] - (V[t-1] - v_reset)) / tau
        lif:     S[t] = H[t] >= v_th                     ternary: S[t] = sign(H[t]) * (|H[t]| >= v_th)
        V[t] = v_reset where S[t] != 0, else H[t]        (hard reset)
        relu:    S[t] = max(X[t], 0), stateless (A²OS²A's K; tau, v_th, v_reset are None)

    The name is the torch module path, i.e. the key of this layer's output in ``RunResult.spikes``.
    """

    kind: str  # lif | ternary | relu
    tau: float | None = None  # membrane time constant, timesteps
    v_th: float | None = None  # firing threshold
    v_reset: float | None = None  # reset (and resting) potential

    def check(self):
        if self.kind not in NEURON_KINDS:
            self.fail(f"kind must be one of {', '.join(NEURON_KINDS)}, got {self.kind!r}")
        if self.stateful:
            if self.tau is None or not self.tau >= 1:
                self.fail(f"tau must be >= 1 timestep, got {self.tau!r}")
            if self.v_th is None or self.v_reset is None or not self.v_th > self.v_reset:
                self.fail(f"needs v_th > v_reset, got v_th={self.v_th!r}, v_reset={self.v_reset!r}")

    @property
    def stateful(self) -> bool:
        """Whether the neuron has a membrane (a token not kept at a timestep then keeps a decaying state)."""
        return self.kind != "relu"

    def out_shape(self, x: Shape) -> Shape:
        return x


@dataclass(frozen=True, eq=False, kw_only=True)
class MaxPool(Node):
    """y[t, c] = max over each kernel x kernel window of x[t, c] (of binary spikes: an OR), (C, H, W) -> (C, H', W')."""

    kernel: int  # window side, pixels
    stride: int  # pixels
    padding: int  # pixels (padding never wins the max)

    def check(self):
        _positive(self, kernel=self.kernel, stride=self.stride)
        if not isinstance(self.padding, int) or not 0 <= self.padding <= self.kernel // 2:
            self.fail(f"padding must be in [0, kernel // 2], got {self.padding!r}")

    def out_shape(self, x: Shape) -> Shape:
        c, h, w = _chw(self, x)
        side = lambda n: (n + 2 * self.padding - self.kernel) // self.stride + 1
        return (c, side(h), side(w))


@dataclass(frozen=True, eq=False, kw_only=True)
class Tokens(Node):
    """Feature map -> token rows: x (D, H, W) -> (H W, D), row n = pixel (n // W, n % W); with an anchor token a
    learnt row is prepended at row 0: (1 + H W, D). The anchor is real-valued and never pruned."""

    anchor: bool = False  # prepend the anchor token
    anchor_value: np.ndarray | None = None  # (D,) the learnt anchor; None in a structure-only graph

    def check(self):
        if self.anchor_value is not None and (not self.anchor or self.anchor_value.ndim != 1):
            self.fail("anchor_value must be a (D,) vector, given only with anchor=True")

    @property
    def n_fixed(self) -> int:
        """Leading rows that pruning always keeps."""
        return 1 if self.anchor else 0

    def out_shape(self, x: Shape) -> Shape:
        d, h, w = _chw(self, x)
        _array(self, "anchor_value", self.anchor_value, (d,))
        return (h * w + self.n_fixed, d)


@dataclass(frozen=True, eq=False, kw_only=True)
class Add(Node):
    """y = a + b (a residual sum; equal shapes). Sums of spikes are small integers 0, 1, 2, ..."""

    def out_shape(self, a: Shape, b: Shape) -> Shape:
        if a != b:
            self.fail(f"cannot add shapes {a} and {b}")
        return a


def _heads_of(node: "Product", x: Shape) -> tuple[int, int, int]:
    n, d = _rows(node, x)
    if d % node.heads:
        node.fail(f"{d} features do not split into {node.heads} heads")
    return n, d, d // node.heads


def _same_rows(node: "Product", a: Shape, b: Shape) -> Shape:
    if _rows(node, a) != _rows(node, b, "second input"):
        node.fail(f"operands {a} and {b} differ")
    return a


def _shape_qk(p, q, k):
    n, _, _ = _heads_of(p, _same_rows(p, q, k))
    return (p.heads, n, n)


def _shape_av(p, a, v):
    n, d, _ = _heads_of(p, v)
    if a != (p.heads, n, n):
        p.fail(f"attention map {a} does not fit values {v} with {p.heads} heads")
    return (n, d)


def _shape_gate(p, q, g):
    if _rows(p, g, "gate") != (1, _rows(p, q)[1]):
        p.fail(f"gate {g} must be one row of the {q[1]} features of {q}")
    return q


def _shape_ktv(p, k, v):
    _, _, dh = _heads_of(p, _same_rows(p, k, v))
    return (p.heads, dh, dh)


def _shape_qktv(p, q, m):
    n, d, dh = _heads_of(p, q)
    if m != (p.heads, dh, dh):
        p.fail(f"K^T V {m} does not fit queries {q} with {p.heads} heads")
    return (n, d)


# kind -> shape rule (the equation is in Product's docstring). A new attention product = one entry here.
PRODUCT_SHAPES: dict[str, Callable[..., Shape]] = {
    "qk": _shape_qk,
    "av": _shape_av,
    "kv": _same_rows,
    "kv_sum": lambda p, x: (1, _rows(p, x)[1]),
    "qkv_gate": _shape_gate,
    "ktv": _shape_ktv,
    "qktv": _shape_qktv,
}
TOKEN_INDEPENDENT_PRODUCTS = ("kv_sum", "ktv")  # outputs with no token rows (they follow no schedule)


@dataclass(frozen=True, eq=False, kw_only=True)
class Product(Node):
    """A product of two activations (or a token sum) in spiking attention; per head h, D = heads x dh:

        qk        A_h = Q_h K_h^T                 (n, D), (n, D)        -> (H, n, n)    SSA
        av        Y = merge_h(A_h V_h) * scale    (H, n, n), (n, D)     -> (n, D)       SSA
        kv        Y = K ⊙ V                       (n, D), (n, D)        -> (n, D)       SDSA
        kv_sum    Y = sum_n X[n]                  (n, D)                -> (1, D)       SDSA
        qkv_gate  Y = Q ⊙ G  (G on every row)     (n, D), (1, D)        -> (n, D)       SDSA
        ktv       M_h = K_h^T V_h                 (n, D), (n, D)        -> (H, dh, dh)  A²OS²A
        qktv      Y = merge_h(Q_h M_h)            (n, D), (H, dh, dh)   -> (n, D)       A²OS²A
    """

    kind: str  # one of PRODUCT_SHAPES
    heads: int = 1  # H
    scale: float = 1.0  # constant factor on the output (SSA's 0.125); folds into the next threshold

    def check(self):
        if self.kind not in PRODUCT_SHAPES:
            self.fail(f"kind must be one of {', '.join(PRODUCT_SHAPES)}, got {self.kind!r}")
        _positive(self, heads=self.heads)
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale != 0):
            self.fail(f"scale must be a finite non-zero number, got {self.scale!r}")

    def out_shape(self, *ins: Shape) -> Shape:
        want = 1 if self.kind == "kv_sum" else 2
        if len(ins) != want:
            self.fail(f"{self.kind} takes {want} input(s), got {len(ins)}")
        return PRODUCT_SHAPES[self.kind](self, *ins)

    def follows(self, schedules):
        return None if self.kind in TOKEN_INDEPENDENT_PRODUCTS else super().follows(schedules)


SELECT_MODES = ("drop", "skip")


@dataclass(frozen=True, eq=False, kw_only=True)
class Select(Node):
    """A pruning site before block ``site``: keep k of the n token rows at each timestep, (n, D) -> (k, D).

    Kept rows stay in ascending position order; the ``n_fixed`` leading rows (the anchor) are always kept.
    drop: the other tokens leave the network. skip (TP): they bypass the block and rejoin after it (``Rejoin``).
    Dynamic (``schedule`` None): a Scorer (second input) ranks the rows and the top ceil(keep x n_img) image rows
    are kept, chosen at run time. Static (after ``ApplyMasks``): ``schedule[t]`` marks the kept token positions at
    timestep t in the full token sequence (the TokenMasks format). A token not kept at t gets no input at t and its
    membranes decay; ``tokens`` (after ``DropNeverKept``) lists the positions whose neurons exist after this site.
    """

    site: int  # block index
    mode: str  # drop | skip
    method: str  # the scorer (dynamic), or "static"
    n_fixed: int = 0  # leading rows always kept (1 with an anchor token)
    keep: float | None = None  # fraction of image rows kept (dynamic); None when static
    timestep_wise: bool = False  # the kept set may differ between timesteps
    schedule: np.ndarray | None = None  # (T, n_full) bool: kept token positions per timestep (static)
    tokens: np.ndarray | None = None  # (U,) ascending positions whose neurons exist after this site; None: all

    def check(self):
        if self.mode not in SELECT_MODES:
            self.fail(f"mode must be 'drop' or 'skip', got {self.mode!r}")
        if not isinstance(self.site, int) or self.site < 0 or not isinstance(self.n_fixed, int) or self.n_fixed < 0:
            self.fail(f"site and n_fixed must be non-negative integers, got {self.site!r}, {self.n_fixed!r}")
        if self.schedule is None:
            keep_ok = isinstance(self.keep, (int, float)) and not isinstance(self.keep, bool) and 0 < self.keep <= 1
            if self.method == "static" or not keep_ok:
                self.fail(f"a dynamic selection needs a scorer method and keep in (0, 1], got {self.method!r}, "
                          f"{self.keep!r}")
            if self.tokens is not None:
                self.fail("only a static schedule can name the tokens that exist after it")
            return
        s = self.schedule
        if self.method != "static" or self.keep is not None:
            self.fail("a static schedule has method 'static' and no keep ratio")
        if s.dtype != bool or s.ndim != 2 or len(set(s.sum(1).tolist())) != 1 or not s[0].any():
            self.fail("schedule must be a (T, n_full) bool array keeping the same non-zero number of tokens per "
                      "timestep")
        if self.n_fixed and not s[:, : self.n_fixed].all():
            self.fail("schedule drops a fixed (anchor) row")
        if self.timestep_wise != bool((s != s[:1]).any()):
            self.fail("timestep_wise must say whether the schedule differs between timesteps")
        if self.tokens is not None:
            t = self.tokens
            if t.ndim != 1 or not np.issubdtype(t.dtype, np.integer) or (np.diff(t) <= 0).any() \
                    or not np.isin(np.flatnonzero(s.any(0)), t).all():
                self.fail("tokens must be ascending positions including every token the schedule keeps")

    @property
    def static(self) -> bool:
        return self.schedule is not None

    @property
    def positions(self) -> np.ndarray | None:
        """(T, k) kept positions per timestep (static), ascending."""
        return None if self.schedule is None else np.stack([np.flatnonzero(m) for m in self.schedule])

    def out_shape(self, x: Shape, *scores: Shape) -> Shape:
        n, d = _rows(self, x)
        if len(scores) != (0 if self.static else 1):
            self.fail("a dynamic selection reads the rows and a Scorer; a static one only the rows")
        k = int(self.schedule[0].sum()) if self.static else self.n_fixed + num_keep(n - self.n_fixed, self.keep)
        if not self.n_fixed < k <= n:
            self.fail(f"keeps {k} of {n} rows")
        return (k, d)

    def follows(self, schedules):
        return self.name


SCORER_METHODS_WITH_ATTENTION = ("stata", "anchor", "ssa")  # read the previous block's Q and K spikes


@dataclass(frozen=True, eq=False, kw_only=True)
class Scorer(Node):
    """Token importance at a dynamic pruning site, ``pruning.SCORERS[method]``: one score per row (per timestep
    for a timestep-wise scorer), read by the Select. Inputs: the token rows x (n, D); the stata, anchor and ssa
    scorers also read the previous block's Q and K spikes (n, D) (``AttnInfo``)."""

    method: str  # a pruning.SCORERS name
    n_fixed: int = 0  # leading (anchor) rows, never scored for removal
    heads: int  # heads of the attention whose Q, K are read
    grid: int  # the image tokens form a grid x grid map (TP's spatial context)

    def check(self):
        _positive(self, heads=self.heads, grid=self.grid)
        if not isinstance(self.method, str) or not self.method:
            self.fail(f"needs a scorer method, got {self.method!r}")

    def out_shape(self, x: Shape, *qk: Shape) -> Shape:
        n, _ = _rows(self, x)
        if len(qk) != (2 if self.method in SCORER_METHODS_WITH_ATTENTION else 0):
            self.fail(f"scorer {self.method!r} got {1 + len(qk)} inputs")
        return (n,)


@dataclass(frozen=True, eq=False, kw_only=True)
class Rejoin(Node):
    """TP skip mode, after block ``site``: y = x with the rows its Select chose replaced by the block output b.

    x (n, D), b (k, D) -> (n, D): the unselected tokens keep their input (block-level early stopping).
    """

    site: int  # the block (and its Select's site)

    def out_shape(self, x: Shape, b: Shape) -> Shape:
        if _rows(self, x)[1] != _rows(self, b, "block output")[1] or b[0] > x[0]:
            self.fail(f"block output {b} does not fit the stream {x}")
        return x

    def follows(self, schedules):
        return schedules[0]


@dataclass(frozen=True, eq=False, kw_only=True)
class Head(Node):
    """Classifier per timestep: logits[t] = weight @ mean_n x[t, n] + bias over the image rows n >= n_fixed
    (the anchor is excluded); (n, D) -> (classes,). The model's prediction is the mean of logits[t] over t."""

    in_features: int  # D
    out_features: int  # classes
    n_fixed: int = 0  # leading (anchor) rows left out of the mean
    weight: np.ndarray | None = None  # (classes, D); None in a structure-only graph
    bias: np.ndarray | None = None  # (classes,)

    def check(self):
        _positive(self, in_features=self.in_features, out_features=self.out_features)
        _array(self, "weight", self.weight, (self.out_features, self.in_features))
        _array(self, "bias", self.bias, (self.out_features,))

    def out_shape(self, x: Shape) -> Shape:
        n, d = _rows(self, x)
        if d != self.in_features or n <= self.n_fixed:
            self.fail(f"input {x} does not fit a head on {self.in_features} features after {self.n_fixed} rows")
        return (self.out_features,)

    def follows(self, schedules):
        return None


# ------------------------------------------------------------------------------------------------- the graph
@dataclass(frozen=True, eq=False)
class Graph:
    """A network: nodes in topological order, each reading the outputs of earlier nodes.

    ``shapes`` and ``schedules`` are derived from the nodes and their inputs (and checked) when a graph is made.
    A graph is immutable: passes (``graph.transform(p)``) return new graphs, so a graph can be shared and cached.
    """

    nodes: tuple[Node, ...]  # topological order; the first is the Input
    inputs: dict[str, tuple[str, ...]]  # node name -> the names of the nodes it reads, in argument order
    blocks: tuple[tuple[str, str], ...]  # per transformer block: (the value its layers read, its last residual sum)
    shapes: dict[str, Shape] = field(init=False)  # node name -> output shape per sample and timestep
    schedules: dict[str, str | None] = field(init=False)  # node name -> the Select whose per-timestep token
    #                                                        schedule its rows follow (None: every token, or no rows)

    def __post_init__(self):
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "inputs", {k: tuple(v) for k, v in self.inputs.items()})
        object.__setattr__(self, "blocks", tuple(tuple(b) for b in self.blocks))
        if not self.nodes or not isinstance(self.nodes[0], Input) or sum(isinstance(n, Input) for n in self.nodes) != 1:
            raise IRError("a graph starts with its one Input node")
        shapes: dict[str, Shape] = {}
        schedules: dict[str, str | None] = {}
        for node in self.nodes:
            if node.name in shapes:
                raise IRError(f"two IR nodes are named {node.name!r}")
            ins = self.inputs.get(node.name)
            if ins is None:
                raise IRError(f"IR node {node.name!r} has no inputs entry")
            for i in ins:
                if i not in shapes:
                    raise IRError(f"IR node {node.name!r} reads {i!r}, which is not an earlier node")
            shapes[node.name] = node.out_shape(*(shapes[i] for i in ins))
            schedules[node.name] = node.follows([schedules[i] for i in ins])
        if set(self.inputs) != set(shapes):
            raise IRError(f"inputs name unknown nodes: {sorted(set(self.inputs) - set(shapes))}")
        for entry, exit_ in self.blocks:
            if entry not in shapes or exit_ not in shapes:
                raise IRError(f"block ({entry!r}, {exit_!r}) names unknown nodes")
        n_full = next((shapes[n.name][0] for n in self.nodes if isinstance(n, Tokens)), None)
        for n in self.nodes:
            if isinstance(n, Select) and n.static and n.schedule.shape != (self.nodes[0].T, n_full):
                raise IRError(f"the schedule of {n.name!r} has shape {n.schedule.shape}, expected (T, tokens) = "
                              f"({self.nodes[0].T}, {n_full})")
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "schedules", schedules)
        object.__setattr__(self, "_index", {n.name: n for n in self.nodes})

    def __eq__(self, other) -> bool:
        return (isinstance(other, Graph) and self.nodes == other.nodes and self.inputs == other.inputs
                and self.blocks == other.blocks)

    __hash__ = None

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, name: str) -> Node:
        try:
            return self._index[name]
        except KeyError:
            raise IRError(f"the graph has no node {name!r}") from None

    def readers(self, name: str) -> list[str]:
        """Names of the nodes that read ``name``'s output."""
        return [n for n, ins in self.inputs.items() if name in ins]

    def transform(self, p: Callable[["Graph"], "Graph"]) -> "Graph":
        """``p(self)``: a new graph (a pass never changes its input)."""
        return p(self)

    def op_counts(self) -> dict[str, int]:
        """Number of nodes per node type (and per Product kind, as ``Product.kv``), for tests and summaries."""
        out: dict[str, int] = {}
        for n in self.nodes:
            for key in (type(n).__name__,) + ((f"Product.{n.kind}",) if isinstance(n, Product) else ()):
                out[key] = out.get(key, 0) + 1
        return out

    @property
    def T(self) -> int:
        return self.nodes[0].T

    @property
    def n_tokens(self) -> int:
        """Tokens in the full sequence (image tokens + anchor)."""
        return next(self.shapes[n.name][0] for n in self.nodes if isinstance(n, Tokens))

    def population(self, select: str) -> int:
        """Token positions whose neurons exist after Select ``select`` (static: ``tokens``, else its input's)."""
        node = self.node(select)
        if isinstance(node, Select) and node.tokens is not None:
            return len(node.tokens)
        src = self.inputs[select][0]
        return self.population(self.schedules[src]) if self.schedules[src] else self.shapes[src][0]

    def neurons(self, name: str) -> int:
        """Neurons (state elements) of Neuron ``name`` per sample: rows following a drop schedule exist for every
        token of that schedule's population, present at a timestep or not."""
        shape = self.shapes[name]
        s = self.schedules[name]
        if s is not None and self.node(s).mode == "drop" and len(shape) == 2:
            return self.population(s) * shape[1]
        return math.prod(shape)
