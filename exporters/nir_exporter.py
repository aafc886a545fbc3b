"""Export a trained stata-deploy model (and its static token masks) to a standard NIR 1.0 file.

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
- SSA and A²OS²A need a product of two activations, which NIR cannot express: Q, K, V leave the graph through
  Output ports and the product enters through an Input port; the host operation is described in metadata
  (``host_ops``). A metadata-ignoring reader sees a graph with extra inputs it has no values for: it cannot run the
  model without supplying them, so it cannot silently compute a different network. ``split=True`` also writes the
  standard segments between host operations as separate, runnable files.
- Static masks (``TokenMasks``): at each drop site, tokens never kept at any timestep are removed from the graph
  (the crop); the remaining schedule (T, n) is in metadata (``token_segments``, positions in graph order) and
  executed by our reader. A fixed schedule (``calibrate --schedule fixed``) is entirely structural: the file is then
  exact for a reader that ignores metadata. TP ("skip") masks must be the same at every timestep and are then
  entirely structural (a crop before the block, a zero pad back into the row after it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stata_deploy import description
from stata_deploy.nn.attention import A2OS2A, SDSA, SSA, LinearBN
from stata_deploy.errors import StataError, UnsupportedOpError
from stata_deploy.exporter_api import Exporter
from stata_deploy.nn.neurons import LIF, ReLUNeuron, TernaryLIF
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


def _f64(a) -> np.ndarray:
    import torch

    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def fold_bn(weight, bias, bn) -> tuple[np.ndarray, np.ndarray]:
    """Fold eval-mode BatchNorm into the preceding layer: returns (W', b') in float64 (out axis first)."""
    w = _f64(weight)
    b = _f64(bias) if bias is not None else np.zeros(w.shape[0])
    scale = _f64(bn.weight) / np.sqrt(_f64(bn.running_var) + bn.eps)
    w2 = w * scale.reshape(-1, *([1] * (w.ndim - 1)))
    b2 = (b - _f64(bn.running_mean)) * scale + _f64(bn.bias)
    return w2, b2


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
    """Collects NIR nodes and edges; the lowering functions below add to it."""

    def __init__(self, T: int):
        import nir

        self.nir = nir
        self.T = T
        self.nodes: dict = {}
        self.edges: list = []
        self.host_ops: list[dict] = []
        self.segments: dict[str, dict] = {}
        self.sites: dict[str, str] = {}
        self.seg: str | None = None  # current token segment id (masked ops)
        self.order = None  # positions (full sequence) of the token row before any site, graph order

    def add(self, name: str, node, inputs=(), **meta) -> str:
        if name in self.nodes:
            raise StataError(f"internal: duplicate NIR node {name!r}")
        meta = {k: v for k, v in meta.items() if v is not None}
        if meta:
            node.metadata = {**(node.metadata or {}), **meta}
        self.nodes[name] = node
        for s in inputs:
            self.edges.append((s, name))
        return name

    # ---- node factories
    def lif(self, name, inputs, shape, v_th, tau_steps, v_reset=0.0, layer=None, layout=None, tokens=None, role=None):
        shape = tuple(shape)
        node = self.nir.LIF(
            tau=np.full(shape, tau_steps * NIR_DT, dtype=np.float64),
            r=np.ones(shape, dtype=np.float64),
            v_leak=np.full(shape, v_reset, dtype=np.float64),
            v_threshold=np.full(shape, nir_threshold(v_th), dtype=np.float64),
            v_reset=np.full(shape, v_reset, dtype=np.float64),
        )
        return self.add(name, node, inputs, layer=layer, layout=layout, tokens=tokens, role=role)

    def neuron(self, name, inputs, shape, mod, layout, tokens=None):
        if type(mod) is not LIF:
            raise UnsupportedOpError(f"neuron {name!r} of type {type(mod).__name__} has no NIR lowering")
        return self.lif(name, inputs, shape, float(mod.v_th), float(mod.tau), float(mod.v_reset), layer=name,
                        layout=layout, tokens=tokens)

    def conv(self, name, inputs, in_hw, w, b, stride=1, padding=0, groups=1, tokens=None, role=None):
        # NIR 1.0.8 types a Conv2d's input as weight.shape[1] channels, i.e. it does not model groups: a grouped
        # conv fails nir's type check, so grouped kernels are written as the equivalent dense (block-diagonal) one
        w = _dense_groups(np.asarray(w, np.float64), int(groups))
        node = self.nir.Conv2d(input_shape=tuple(int(v) for v in in_hw), weight=w,
                               stride=stride, padding=padding, dilation=1, groups=1,
                               bias=np.asarray(b, np.float64))
        return self.add(name, node, inputs, tokens=tokens, role=role)

    def conv1d(self, name, inputs, n_in, w, b, stride=1, padding=0, dilation=1, groups=1, tokens=None, role=None):
        """A Conv1d over the token axis of a row (C, n_in) (grouped kernels written dense, as for Conv2d)."""
        w = np.asarray(w, np.float64)
        if groups != 1:
            w = _dense_groups(w[:, :, None, :], int(groups))[:, :, 0, :]
        node = self.nir.Conv1d(input_shape=int(n_in), weight=w, stride=int(stride), padding=int(padding),
                               dilation=int(dilation), groups=1, bias=np.asarray(b, np.float64))
        return self.add(name, node, inputs, tokens=tokens, role=role)

    def token_linear(self, name, inputs, lbn: LinearBN, tok: "Tok"):
        """Per-token Linear + BN: a 1x1 Conv2d on the token map (D, g, g), a kernel-1 Conv1d on a row (D, n)."""
        w, b = fold_bn(lbn.linear.weight, lbn.linear.bias, lbn.bn)
        if tok.grid:
            return self.conv(name, inputs, (tok.grid, tok.grid), w[:, :, None, None], b, tokens=self.seg)
        return self.conv1d(name, inputs, tok.n, w[:, :, None], b, tokens=self.seg)

    def token_sum(self, name, src, D, tok: "Tok"):
        """Sum over tokens -> (D, 1, 1) / (D, 1): a depthwise conv whose kernel of ones covers the map / row."""
        if tok.grid:
            g = tok.grid
            return self.conv(name, [src], (g, g), np.ones((D, 1, g, g)), np.zeros(D), groups=D, role="token_sum")
        return self.conv1d(name, [src], tok.n, np.ones((D, 1, tok.n)), np.zeros(D), groups=D, role="token_sum")

    def token_broadcast(self, name, src, D, tok: "Tok"):
        """(D, 1, 1) / (D, 1) -> every token: a depthwise conv of ones with padding kernel - 1."""
        if tok.grid:
            g = tok.grid
            return self.conv(name, [src], (1, 1), np.ones((D, 1, g, g)), np.zeros(D), padding=g - 1, groups=D,
                             role="token_broadcast")
        n = tok.n
        return self.conv1d(name, [src], 1, np.ones((D, 1, n)), np.zeros(D), padding=n - 1, groups=D,
                           role="token_broadcast", tokens=self.seg)

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

    def host(self, name, kind, inputs, output, attrs, layer=None):
        """A host operation: the IR node ``name`` of ``kind`` (HOST_EQUATIONS) with its fields ``attrs``, reading
        output ports or earlier host ops, writing input port ``output`` (None: read by host ops only)."""
        if name in self.nodes or any(h["name"] == name for h in self.host_ops):
            raise StataError(f"internal: host operation {name!r} clashes with another node")
        self.host_ops.append(dict(name=name, kind=kind, inputs=list(inputs), output=output, tokens=self.seg,
                                  attrs=attrs, **({"layer": layer} if layer else {}),
                                  equation=HOST_EQUATIONS[kind]))
        return name

    def port_out(self, name, src, shape, tokens=None, role="host_port"):
        return self.add(name, self.nir.Output(output_type={"output": np.array(shape)}), [src], tokens=tokens, role=role)

    def port_in(self, name, shape, tokens=None, role="host_result"):
        return self.add(name, self.nir.Input(input_type={"input": np.array(shape)}), [], tokens=tokens, role=role)


# ------------------------------------------------------------------------------------------------ the stem
def _lower_stem(b: _Builder, model) -> tuple[list[str], int, int]:
    cfg = model.cfg
    C, H = cfg.in_channels, cfg.img_size
    b.add("input", b.nir.Input(input_type={"input": np.array([C, H, H])}))
    prev, hw, ch = ["input"], H, C
    for i, st in enumerate(model.stem.stages):
        w, bias = fold_bn(st.conv.conv.weight, st.conv.conv.bias, st.conv.bn)
        ch = w.shape[0]
        c = b.conv(f"stem.stages.{i}.conv", prev, (hw, hw), w, bias, padding=1)
        s = b.neuron(f"stem.stages.{i}.lif", [c], (ch, hw, hw), st.lif, "grid")
        prev = [s]
        if st.pool is not None:
            pool = st.pool.pool
            if (pool.kernel_size, pool.stride, pool.padding) not in ((3, 2, 1), ((3, 3), (2, 2), (1, 1))):
                raise UnsupportedOpError(f"MaxPool2d at stem.stages.{i}.pool with kernel {pool.kernel_size} has no "
                                         "NIR lowering here")
            p = b.add(f"stem.stages.{i}.pool.sum", b.nir.SumPool2d(kernel_size=np.array([3, 3]),
                                                                   stride=np.array([2, 2]), padding=np.array([1, 1])),
                      prev)
            hw = (hw + 2 - 3) // 2 + 1
            prev = [b.lif(f"stem.stages.{i}.pool.any", [p], (ch, hw, hw), 0.5, 1.0, role="gate")]
    w, bias = fold_bn(model.stem.rpe.conv.weight, model.stem.rpe.conv.bias, model.stem.rpe.bn)
    r = b.conv("stem.rpe.conv", prev, (hw, hw), w, bias, padding=1)
    rl = b.neuron("stem.rpe_lif", [r], (ch, hw, hw), model.stem.rpe_lif, "grid")
    return [*prev, rl], ch, hw


def _lower_tokens(b: _Builder, srcs: list[str], D: int, g: int, model, order: np.ndarray) -> list[str]:
    """(D, g, g) map (sum of srcs) -> token row (D, n) holding the sequence positions ``order`` (graph order; the
    anchor is position 0, image token p = i*g + j of the map is position p + 1 with an anchor, p without).

    ``Flatten(-2, -1)`` gives the row in torch's flatten order (negative dims: per-sample and batched readings of
    the dims agree); any other order is one token matrix (four Conv1d with one-hot kernels), a shift by the anchor
    slot one window Conv1d. The anchor, a learned constant token, is a Conv1d with zero weights and the anchor as
    its bias ((D, 1): the same value at every timestep, whatever its input), placed at its slot by a one-hot window
    Conv1d (zero at the other tokens); every consumer sums the row and the placed anchor (two edges)."""
    n_fixed = 1 if model.anchor is not None else 0
    N = g * g
    n = len(order)
    flat = b.add("tokens.flat", b.nir.Flatten(input_type={"input": np.array([D, g, g])}, start_dim=-2, end_dim=-1),
                 srcs, role="reindex")
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
    if model.anchor is None:
        return [row]
    const = b.conv1d("tokens.anchor", [flat], N, np.zeros((D, D, 1)), _f64(model.anchor).reshape(-1), stride=N,
                     role="anchor")
    return [row, b.token_window("tokens.anchor.place", [const], D, 1, n, shift=-int(slot[0]), role="anchor")]


def token_order(n: int, n_fixed: int, masks: TokenMasks | None) -> np.ndarray:
    """The order of the token row (positions in the full sequence): every pruning site then keeps a prefix, so that
    its selection is a crop. Drop mode (nested kept sets): the anchor, then the tokens kept (at any timestep) by the
    last site, then those kept by the site before, ... then the tokens no site keeps (each group ascending). Skip
    mode: the tokens of the first site, then the rest. No sites: ascending."""
    pos = np.arange(n)
    if masks is None or not masks.sites:
        return pos
    sites = sorted(masks.sites)
    if masks.mode == "skip":
        level = masks.sites[sites[0]][0].astype(int)
    else:
        level = sum(masks.sites[s].any(0).astype(int) for s in sites)
    level = np.where(pos < n_fixed, len(sites) + 1, level)
    return np.lexsort((pos, -level))


# ----------------------------------------------------------------------------------------------- attention
def _qkv(b, attn, pre, R, D, tok, lif_names=("q", "k", "v")):
    outs = {}
    for nm in ("q", "k", "v"):
        c = b.token_linear(f"{pre}.{nm}", R, getattr(attn, nm), tok)
        mod = getattr(attn, f"{nm}_lif")
        outs[nm] = b.neuron(f"{pre}.{nm}_lif", [c], tok.shape(D), mod, tok.layout, b.seg) if nm in lif_names else c
    return outs


def _tail(b, attn, pre, y, D, tok):
    """attn_lif (given its input) -> proj -> proj_lif."""
    a = b.neuron(f"{pre}.attn_lif", y, tok.shape(D), attn.attn_lif, tok.layout, b.seg)
    p = b.token_linear(f"{pre}.proj", [a], attn.proj, tok)
    return b.neuron(f"{pre}.proj_lif", [p], tok.shape(D), attn.proj_lif, tok.layout, b.seg)


def lower_ssa(b: _Builder, attn: SSA, pre: str, R: list[str], D: int, tok: Tok) -> str:
    o = _qkv(b, attn, pre, R, D, tok)
    q, k, v = (b.port_out(f"{pre}.host.{nm}", o[nm], tok.shape(D), b.seg) for nm in ("q", "k", "v"))
    res = b.port_in(f"{pre}.host.result", tok.shape(D), b.seg)
    b.host(f"{pre}.qk", "qk", [q, k], None, dict(heads=attn.heads))
    b.host(f"{pre}.av", "av", [f"{pre}.qk", v], res, dict(heads=attn.heads, scale=float(attn.scale)))
    return _tail(b, attn, pre, [res], D, tok)


def lower_a2os2a(b: _Builder, attn: A2OS2A, pre: str, R: list[str], D: int, tok: Tok) -> str:
    for nm, want in (("k_lif", ReLUNeuron), ("v_lif", TernaryLIF), ("q_lif", LIF)):
        if type(getattr(attn, nm)) is not want:
            raise UnsupportedOpError(f"{pre}.{nm} ({type(getattr(attn, nm)).__name__}) has no NIR lowering")
    o = _qkv(b, attn, pre, R, D, tok, lif_names=("q",))
    q, k, v = (b.port_out(f"{pre}.host.{nm}", o[nm], tok.shape(D), b.seg) for nm in ("q", "k", "v"))
    res = b.port_in(f"{pre}.host.result", tok.shape(D), b.seg)
    vl = attn.v_lif
    b.host(f"{pre}.k_lif", "relu", [k], None, {}, layer=f"{pre}.k_lif")
    b.host(f"{pre}.v_lif", "ternary", [v], None, dict(tau=float(vl.tau), v_th=float(vl.v_th),
                                                       v_reset=float(vl.v_reset)), layer=f"{pre}.v_lif")
    b.host(f"{pre}.ktv", "ktv", [f"{pre}.k_lif", f"{pre}.v_lif"], None, dict(heads=attn.heads))
    b.host(f"{pre}.qktv", "qktv", [q, f"{pre}.ktv"], res, dict(heads=attn.heads))
    return _tail(b, attn, pre, [res], D, tok)


def lower_sdsa(b: _Builder, attn: SDSA, pre: str, R: list[str], D: int, tok: Tok) -> str:
    o = _qkv(b, attn, pre, R, D, tok)
    sh = tok.shape(D)
    kv = b.lif(f"{pre}.kv_and", [o["k"], o["v"]], sh, GATE_TH, 1.0, role="gate", tokens=b.seg)
    s = b.token_sum(f"{pre}.kv_sum", kv, D, tok)
    a = b.neuron(f"{pre}.attn_lif", [s], tok.single(D), attn.attn_lif, "single")
    bc = b.token_broadcast(f"{pre}.kv_broadcast", a, D, tok)
    g = b.lif(f"{pre}.qkv_and", [o["q"], bc], sh, GATE_TH, 1.0, role="gate", tokens=b.seg)
    p = b.token_linear(f"{pre}.proj", [g], attn.proj, tok)
    return b.neuron(f"{pre}.proj_lif", [p], sh, attn.proj_lif, tok.layout, b.seg)


ATTENTION_LOWERINGS = {SSA: lower_ssa, SDSA: lower_sdsa, A2OS2A: lower_a2os2a}
# leaf module types the lowering understands (anything else in the model is an op with no NIR lowering)
_KNOWN_LEAVES = ("Conv2d", "BatchNorm2d", "BatchNorm1d", "Linear", "LIF", "TernaryLIF", "ReLUNeuron", "MaxPool2d",
                 "MatMul", "Hadamard", "TokenSum")


def _check_ops(model) -> None:
    for name, m in model.named_modules():
        if len(list(m.children())) == 0 and type(m).__name__ not in _KNOWN_LEAVES:
            raise UnsupportedOpError(f"op {type(m).__name__} at {name!r} has no NIR lowering")
        if name.endswith(".attn") and type(m) not in ATTENTION_LOWERINGS:
            raise UnsupportedOpError(f"attention {type(m).__name__} at {name!r} has no NIR lowering")


def _lower_mlp(b, mlp, pre, R, D, tok):
    c1 = b.token_linear(f"{pre}.fc1", R, mlp.fc1, tok)
    h = mlp.fc1.linear.out_features
    s1 = b.neuron(f"{pre}.fc1_lif", [c1], tok.shape(h), mlp.fc1_lif, tok.layout, b.seg)
    c2 = b.token_linear(f"{pre}.fc2", [s1], mlp.fc2, tok)
    return b.neuron(f"{pre}.fc2_lif", [c2], tok.shape(D), mlp.fc2_lif, tok.layout, b.seg)


def _lower_block(b, blk, i, R, D, tok):
    pre = f"blocks.{i}"
    a = ATTENTION_LOWERINGS[type(blk.attn)](b, blk.attn, f"{pre}.attn", R, D, tok)
    R = [*R, a]
    m = _lower_mlp(b, blk.mlp, f"{pre}.mlp", R, D, tok)
    return [*R, m], a, m


def _selection(cur: np.ndarray, keep_pos: np.ndarray) -> np.ndarray:
    """(len(keep_pos), len(cur)) 0/1 matrix picking positions keep_pos out of the current positions cur."""
    idx = {int(p): j for j, p in enumerate(cur)}
    mat = np.zeros((len(keep_pos), len(cur)))
    for a, p in enumerate(keep_pos):
        mat[a, idx[int(p)]] = 1.0
    return mat


def build_graph(model, masks: TokenMasks | None, weights_sha256: str | None = None):
    """Lower ``model`` (+ static masks) to (nir.NIRGraph, description dict)."""
    import nir

    from stata_deploy.nn.model import SpikingTransformer

    if not isinstance(model, SpikingTransformer):
        raise StataError(f"not a stata-deploy model ({type(model).__name__}); export a run folder written by "
                         "`stata-deploy train`")
    cfg = model.cfg
    model.eval()
    _check_ops(model)
    if masks is not None:
        masks.check_model(cfg)
    elif cfg.prune.active:
        raise UnsupportedOpError(
            f"dynamic top-k token selection (prune={cfg.prune.method}, keep={cfg.prune.keep}) has no NIR lowering: "
            "NIR needs a fixed topology; run `stata-deploy calibrate RUN` to freeze static masks and export with them")
    b = _Builder(cfg.T)
    srcs, D, g = _lower_stem(b, model)
    grid = masks is None and model.anchor is None
    n_fixed = 1 if cfg.anchor else 0
    if grid:
        R, n = srcs, g * g  # tokens stay on the stem's (D, g, g) map: every node is a plain Conv2d / LIF
        cur = np.arange(n)
    else:
        cur = token_order(cfg.num_tokens, n_fixed, masks)  # positions (in the full sequence) of the token row
        R, n = _lower_tokens(b, srcs, D, g, model, cur), len(cur)
        b.order = cur
    sites = sorted(masks.sites) if masks is not None else []
    skip = masks is not None and masks.mode == "skip"
    time_varying = False
    for i, blk in enumerate(model.blocks):
        if i in sites and skip:
            m = masks.sites[i]
            if (m != m[:1]).any():
                raise UnsupportedOpError(f"skip-mode (tp) masks that differ across timesteps at block {i} have no "
                                         "NIR lowering (the torch model keeps slot state, not token state)")
            keep_pos = cur[m[0][cur]]  # kept positions in graph order
            sid = f"site{i}"
            b.segments[sid] = dict(site=i, positions=keep_pos.tolist(), schedule=m[:, keep_pos].astype(int).tolist())
            b.sites[str(i)] = sid
            outer, b.seg = b.seg, sid  # a constant all-ones schedule: only names the block's token order
            sel = b.token_select(f"blocks.{i}.select", R, D, cur, keep_pos, tokens=sid)
            _, a, mm = _lower_block(b, blk, i, [sel], D, Tok(len(keep_pos)))
            b.seg = outer
            R = [*R, b.token_place(f"blocks.{i}.place", [a, mm], D, keep_pos, cur, tokens=b.seg)]
            continue
        if i in sites:
            m = masks.sites[i]  # (T, n_full)
            union = cur[m.any(0)[cur]]  # tokens kept at any timestep, graph order (a prefix of cur)
            sid = f"site{i}"
            sched = m[:, union]
            time_varying |= bool((sched != sched[:1]).any())
            b.segments[sid] = dict(site=i, positions=union.tolist(), schedule=sched.astype(int).tolist())
            b.sites[str(i)] = sid
            b.seg = sid
            R = [b.token_select(f"blocks.{i}.select", R, D, cur, union, tokens=sid)]
            cur = union
            n = len(cur)
        R, _, _ = _lower_block(b, blk, i, R, D, Tok(n, g if grid else None))
    # head: mean over the image tokens kept per timestep + Linear = one conv whose kernel covers the tokens
    k_img = (masks.final_mask()[0].sum() if (masks is not None and not skip) else cfg.num_tokens) - n_fixed
    W = _f64(model.head.weight)  # (classes, D)
    if grid:  # kernel (g, g) over the map
        w = np.broadcast_to(W[:, :, None, None] / float(k_img), (W.shape[0], D, g, g))
        b.conv("head", R, (g, g), w, _f64(model.head.bias))
    else:  # a Conv1d with kernel n over the row, zero at the anchor's slot
        w = np.zeros((W.shape[0], D, n))
        w[:, :, np.flatnonzero(cur >= n_fixed)] = W[:, :, None] / float(k_img)
        b.conv1d("head", R, n, w, _f64(model.head.bias))
    b.add("logits", nir.Output(output_type={"output": np.array([W.shape[0], 1, 1] if grid else [W.shape[0], 1])}),
          ["head"])
    desc = _describe(b, model, masks, weights_sha256, time_varying, skip)
    graph = nir.NIRGraph(nodes=b.nodes, edges=b.edges, metadata={description.META_KEY: description.encode(desc)})
    return graph, desc


def _describe(b, model, masks, weights_sha256, time_varying, skip) -> dict:
    cfg = model.cfg
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
def write_nir_atomic(graph, path: Path) -> None:
    """nir.write into memory (h5py), then one atomic write: a full disk is one error, never a crash in HDF5."""
    import nir

    from stata_deploy.fileio import write_via_buffer

    write_via_buffer(Path(path), lambda buf: nir.write(buf, graph))


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
        write_nir_atomic(graph, out)
        files = [str(out)]
        if options.get("split"):
            for j, (sg, _) in enumerate(split_graph(graph, desc)):
                p = out.with_name(f"{out.stem}.seg{j}{out.suffix}")
                write_nir_atomic(sg, p)
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
