"""Multi-step spiking neurons, vectorised over batch and features, looped over time.

LIF (SpikingJelly / Spikformer form)::

    H[t] = V[t-1] + (X[t] - (V[t-1] - V_reset)) / tau
    S[t] = H[t] >= V_th                      (binary)   or  sign(H) * (|H| >= V_th) (ternary)
    V[t] = H[t] * (1 - |S[t]|) + V_reset * |S[t]|   (hard reset, reset detached from the graph)

The surrogate gradient of the Heaviside step is the derivative of sigmoid(alpha * u).

Token-pruned state semantics (documented contract, every runtime does the same): neuron state lives in a
full-N buffer of tokens. When a token is not kept at timestep t it receives no input at t, so its membrane
decays: V <- V_reset + (V - V_reset) * (1 - 1/tau) per skipped step. A decaying membrane never crosses the
threshold, so a dropped token never spikes. ``TokenIndex`` says which token each slot holds at each timestep.

The forward and the backward (BPTT) are hand-written in one autograd Function: this saves only the membrane
potential H and avoids the T zero-filled gradient buffers that per-timestep indexing makes autograd allocate.

Static masks at inference (no autograd graph): the token schedule is known in advance, so a ``LIFSchedule``
(built once per masks object, ``stata_deploy.pruning.masks.static_plan``) says for every slot at every timestep where its
previous membrane is (which slot of which earlier step, or none) and how many steps it decayed. The neuron then
keeps only the post-reset membranes of the kept slots of each step (no full-N buffer) and gathers each step's
state from them: the same arithmetic, in the same order, as the indexed path above (spike for spike).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

TAU = 2.0
V_TH = 1.0
V_RESET = 0.0
ATTN_V_TH = 0.5
ALPHA = 4.0


@dataclass
class TokenIndex:
    """Which token each slot holds: ``idx`` (T, B, k) int64 positions in the full sequence of ``n_full`` tokens.

    ``timestep_wise`` is False when ``idx`` is the same at every timestep (then neurons need no full buffer).
    """

    idx: torch.Tensor  # (T, B, k)
    n_full: int
    timestep_wise: bool
    schedule: "LIFSchedule | None" = None  # static masks: precomputed state sources (inference fast path)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Select the kept slots of a full token tensor x (T, B, N, ...) -> (T, B, k, ...)."""
        index = self.idx.reshape(*self.idx.shape, *([1] * (x.dim() - 3))).expand(
            *self.idx.shape, *x.shape[3:]
        )
        return torch.gather(x, 2, index)


class LIFSchedule:
    """A static timestep-wise token schedule, precomputed for the neurons of the slots it describes.

    ``positions`` (T, k): the token (position in the full sequence) each slot holds at each timestep. For every
    timestep t and slot j: ``gap[t, j]`` = steps since the token was last kept (``t`` if never before: the indexed
    path's ``t - 1 - last`` with ``last = -1``), ``src[t]`` (k,) the row of a history buffer holding its previous
    post-reset membrane: row 0 holds ``v_reset`` (a token never kept before), row ``1 + t' * k + j'`` slot j' after
    step t'. ``src[t]`` is None when every slot continues the previous step's slot (same token, same place): no
    gather. ``decays[t]``: some gap at t is > 0 (then the indexed path applies ``(1 - 1/tau) ** gap``).
    """

    def __init__(self, positions: np.ndarray):
        pos = np.asarray(positions, dtype=np.int64)
        T, k = pos.shape
        self.T, self.k = T, k
        self.positions = pos
        gap = np.zeros((T, k), dtype=np.int64)
        src = np.zeros((T, k), dtype=np.int64)
        last: dict[int, tuple[int, int]] = {}
        for t in range(T):
            for j, g in enumerate(pos[t].tolist()):
                if g in last:
                    tp, jp = last[g]
                    gap[t, j], src[t, j] = t - 1 - tp, 1 + tp * k + jp
                else:
                    gap[t, j], src[t, j] = t, 0
            for j, g in enumerate(pos[t].tolist()):
                last[g] = (t, j)
        self.gap, self.src_rows = gap, src
        self.decays = [bool((gap[t] > 0).any()) for t in range(T)]
        self.continues = [t > 0 and bool((src[t] == 1 + (t - 1) * k + np.arange(k)).all()) for t in range(T)]
        self.fresh = src == 0
        self._cache: dict = {}

    def src(self, t: int, device) -> torch.Tensor | None:
        """History rows (k,) int64 for step t (None: continue the previous step's slots)."""
        if self.continues[t]:
            return None
        key = ("src", t, str(device))
        if key not in self._cache:
            self._cache[key] = torch.as_tensor(self.src_rows[t], device=device)
        return self._cache[key]

    def factor(self, t: int, tau: float, dtype, device) -> torch.Tensor:
        """``(1 - 1/tau) ** gap[t]`` (k,), computed as the indexed path computes it."""
        key = ("fac", t, float(tau), dtype, str(device))
        if key not in self._cache:
            g = torch.as_tensor(self.gap[t], device=device)
            self._cache[key] = (1.0 - 1.0 / tau) ** g.to(dtype)
        return self._cache[key]


def _static_forward(x: torch.Tensor, tau: float, v_th: float, v_reset: float, ternary: bool,
                    sched: LIFSchedule) -> torch.Tensor:
    """Inference-only twin of the indexed ``_MultiStepNeuron.forward`` for a static schedule (same spikes).

    State: ``hist`` (B, 1 + T*k, *F): row 0 = v_reset, then the post-reset membranes of each step's k slots; step
    t computes H in place in its own rows and gathers its starting membranes from earlier rows (``sched.src``).
    Work and memory follow the kept slots, never the full token sequence.
    """
    T, B, k = x.shape[:3]
    feat = x.shape[3:]
    if sched.T != T or sched.k != k:
        raise ValueError(f"schedule is for T={sched.T}, k={sched.k}; input has T={T}, k={k}")
    out = torch.empty_like(x)
    hist = x.new_empty((B, 1 + T * k, *feat))
    hist[:, 0].fill_(v_reset)
    fired = torch.empty((B, k, *feat), dtype=torch.bool, device=x.device)
    bshape = (k, *([1] * len(feat)))
    prev = None
    for t in range(T):
        h = hist[:, 1 + t * k: 1 + (t + 1) * k]  # this step's rows: H, then the post-reset membrane
        if t == 0:  # every membrane starts at v_reset (gap 0): H = v_reset + (x - 0) / tau
            torch.div(x[0], tau, out=h)
            if v_reset != 0.0:
                h.add_(v_reset)
        else:
            src = sched.src(t, x.device)
            v = prev if src is None else hist.index_select(1, src)
            if sched.decays[t]:
                fac = sched.factor(t, tau, x.dtype, x.device).reshape(bshape)
                v = v * fac if v_reset == 0.0 else (v - v_reset) * fac + v_reset
            _charge_into(h, x[t], v, tau, v_reset)
        _fire_into(out[t], fired, h, v_th, ternary)
        if t < T - 1:
            h.masked_fill_(fired, v_reset)
        prev = h
    return out


def _surrogate(u: torch.Tensor, alpha: float) -> torch.Tensor:
    sg = torch.sigmoid(alpha * u)
    return alpha * sg * (1.0 - sg)


def _surrogate_(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """In-place ``_surrogate`` on a temporary u (same op order): returns alpha * sig * (1 - sig)."""
    sg = u.mul_(alpha).sigmoid_()
    one_minus = torch.rsub(sg, 1.0)
    return sg.mul_(alpha).mul_(one_minus)


def _fire(h: torch.Tensor, v_th: float, ternary: bool) -> torch.Tensor:
    s = (h >= v_th).to(h.dtype)
    if ternary:
        s = s - (h <= -v_th).to(h.dtype)
    return s


def _charge_into(h: torch.Tensor, xt: torch.Tensor, v: torch.Tensor, tau: float, v_reset: float) -> None:
    """H = v + (x - (v - v_reset)) / tau into the buffer h, in place, with the same arithmetic and order as that
    expression (bit-identical): the membrane update of the eager dense and static paths."""
    torch.sub(xt, v if v_reset == 0.0 else v - v_reset, out=h)
    h.div_(tau)
    h.add_(v)


def _fire_into(out_t: torch.Tensor, fired: torch.Tensor, h: torch.Tensor, v_th: float, ternary: bool) -> None:
    """The spikes of one timestep into out_t, and which neurons fired (to reset) into the bool buffer ``fired``."""
    if ternary:
        out_t.copy_(_fire(h, v_th, True))
        torch.ne(out_t, 0, out=fired)
    else:
        torch.ge(h, v_th, out=fired)
        out_t.copy_(fired)


class _MultiStepNeuron(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tau, v_th, v_reset, alpha, ternary, idx, n_full):
        # x: (T, B, k, *F) inputs of the kept slots; idx: (T, B, k) or None (dense over time).
        T = x.shape[0]
        decay = 1.0 - 1.0 / tau
        hs = torch.empty_like(x)
        out = torch.empty_like(x)
        gaps = None
        if idx is None:
            # H written in place into the saved buffers: no per-step temporaries of the whole input (the LIF is
            # memory-bound on CPU).
            v = torch.full_like(x[0], v_reset)
            fired = torch.empty(x.shape[1:], dtype=torch.bool, device=x.device)
            for t in range(T):
                h = hs[t]
                _charge_into(h, x[t], v, tau, v_reset)
                _fire_into(out[t], fired, h, v_th, ternary)
                v = h.masked_fill(fired, v_reset)
        else:
            B, k = idx.shape[1], idx.shape[2]
            feat = x.shape[3:]
            V = x.new_full((B, n_full, *feat), v_reset)
            last = torch.full((B, n_full), -1, dtype=torch.long, device=x.device)
            gaps = torch.empty(idx.shape, dtype=torch.long, device=x.device)
            for t in range(T):
                it = idx[t]
                ie = it.reshape(B, k, *([1] * len(feat))).expand(B, k, *feat)
                gap = t - 1 - torch.gather(last, 1, it)  # skipped steps since last update
                gaps[t] = gap
                v = torch.gather(V, 1, ie)
                if bool((gap > 0).any()):
                    fac = decay ** gap.to(x.dtype)
                    v = v_reset + (v - v_reset) * fac.reshape(B, k, *([1] * len(feat)))
                h = v + (x[t] - (v - v_reset)) / tau
                s = _fire(h, v_th, ternary)
                hs[t] = h
                out[t] = s
                V.scatter_(1, ie, torch.where(s != 0, torch.full_like(h, v_reset), h))
                last.scatter_(1, it, t)
        ctx.save_for_backward(hs, idx if idx is not None else torch.empty(0), gaps if gaps is not None else torch.empty(0))
        ctx.cfg = (tau, v_th, v_reset, alpha, ternary, idx is not None, n_full)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hs, idx, gaps = ctx.saved_tensors
        tau, v_th, v_reset, alpha, ternary, indexed, n_full = ctx.cfg
        T = hs.shape[0]
        decay = 1.0 - 1.0 / tau
        grad_x = torch.empty_like(hs)
        if not indexed:
            # In-place form of: gh = grad_out * sg + gv * (1 - |s|); grad_x = gh / tau; gv = gh * decay, with
            # sg = alpha * sig * (1 - sig), sig = sigmoid(alpha * (h - v_th)) (same op order; gv * 0 -> 0).
            gv = None  # grad w.r.t. V[t] flowing back from step t+1
            fired = torch.empty(hs.shape[1:], dtype=torch.bool, device=hs.device)
            for t in range(T - 1, -1, -1):
                h = hs[t]
                sg = _surrogate_(torch.sub(h, v_th), alpha)
                if ternary:
                    sg.add_(_surrogate_(torch.neg(h).sub_(v_th), alpha))
                    torch.logical_or(h >= v_th, h <= -v_th, out=fired)
                else:
                    torch.ge(h, v_th, out=fired)
                gh = sg.mul_(grad_out[t]) if grad_out[t].dtype == sg.dtype else grad_out[t] * sg
                if gv is not None:
                    gh.add_(gv.masked_fill_(fired, 0.0))
                torch.div(gh, tau, out=grad_x[t])
                gv = gh.mul_(decay)
        else:
            B, k = idx.shape[1], idx.shape[2]
            feat = hs.shape[3:]
            G = hs.new_zeros((B, n_full, *feat))  # grad w.r.t. the stored state of each token
            for t in range(T - 1, -1, -1):
                it = idx[t]
                ie = it.reshape(B, k, *([1] * len(feat))).expand(B, k, *feat)
                h = hs[t]
                s = _fire(h, v_th, ternary)
                sg = _surrogate(h - v_th, alpha)
                if ternary:
                    sg = sg + _surrogate(-h - v_th, alpha)
                gv_out = torch.gather(G, 1, ie)
                gh = grad_out[t] * sg + gv_out * (1.0 - s.abs())
                grad_x[t] = gh / tau
                gv_in = gh * decay
                fac = (decay ** gaps[t].clamp(min=0).to(hs.dtype)).reshape(B, k, *([1] * len(feat)))
                G.scatter_(1, ie, gv_in * fac)
        return grad_x, None, None, None, None, None, None, None


def multistep_neuron(
    x: torch.Tensor,
    tau: float = TAU,
    v_th: float = V_TH,
    v_reset: float = V_RESET,
    alpha: float = ALPHA,
    ternary: bool = False,
    index: TokenIndex | None = None,
) -> torch.Tensor:
    """Run a LIF (or ternary LIF) over T. x: (T, B, ...) -> spikes of the same shape.

    With a timestep-wise ``index``, x is (T, B, k, ...) and state is kept per token (see module doc).
    """
    idx, n_full = None, 0
    if index is not None and index.timestep_wise:
        if index.schedule is not None and not (torch.is_grad_enabled() and x.requires_grad):
            return _static_forward(x, tau, v_th, v_reset, ternary, index.schedule)
        idx, n_full = index.idx, index.n_full
    return _MultiStepNeuron.apply(x, tau, v_th, v_reset, alpha, ternary, idx, n_full)


def lif_reference(x: torch.Tensor, tau=TAU, v_th=V_TH, v_reset=V_RESET, ternary=False) -> torch.Tensor:
    """Plain, traceable loop (no custom autograd): used by exporters and as a test oracle."""
    v = torch.full_like(x[0], v_reset)
    out = []
    for xt in x.unbind(0):
        h = v + (xt - (v - v_reset)) / tau
        s = _fire(h, v_th, ternary)
        v = h * (1.0 - s.abs()) + v_reset * s.abs()
        out.append(s)
    return torch.stack(out)


def _inv_pow2(tau: float) -> float | None:
    """1/tau when tau is a power of two (then x * (1/tau) is bit for bit x / tau, and a multiply is cheaper)."""
    m, _ = math.frexp(tau)
    return 1.0 / tau if tau > 0 and m == 0.5 else None


def _step_traceable(xt, v, tau, v_th, v_reset, ternary):
    """One LIF step in out-of-place ops (H, spikes or None, fired) with the eager path's arithmetic. ``v`` None: the
    first step, every membrane at v_reset: H = (x - 0) / tau + v_reset, i.e. x / tau (+ v_reset). Binary neurons
    return spikes None: the caller casts the concatenated ``fired`` of all steps once."""
    inv = _inv_pow2(tau)
    if v is None:
        h = xt * inv if inv is not None else xt / tau
        if v_reset != 0.0:
            h = h + v_reset
    else:
        d = xt - (v if v_reset == 0.0 else v - v_reset)
        h = (d * inv if inv is not None else d / tau) + v
    if ternary:
        s = _fire(h, v_th, True)
        return h, s, s != 0
    return h, None, h >= v_th


def _spikes_traceable(spikes: list, fired: list, dtype) -> torch.Tensor:
    """(T, ...) spikes from the per-step results of ``_step_traceable``: one Concat (and one Cast)."""
    if spikes[0] is not None:
        return torch.cat(spikes, 0)
    return torch.cat(fired, 0).to(dtype)


def multistep_neuron_traceable(
    x: torch.Tensor,
    tau: float = TAU,
    v_th: float = V_TH,
    v_reset: float = V_RESET,
    ternary: bool = False,
    index: TokenIndex | None = None,
) -> torch.Tensor:
    """Forward-only twin of ``multistep_neuron`` in plain, out-of-place tensor ops (traceable by
    ``torch.onnx.export``/``torch.export``, no data-dependent Python control flow, batch size symbolic).

    Same arithmetic, in the same order, as ``_MultiStepNeuron.forward`` (so spikes are identical; only the sign of a
    zero membrane may differ, which no spike can see). Written for a lean graph: one Split of the input over T, per
    step Sub, Mul (x / tau is x * (1/tau) bit for bit when tau is a power of two, else Div), Add, GreaterOrEqual and
    Where, then one Concat and one Cast of the spikes (no per-step shape arithmetic).

    * no index or a time-invariant one: the slots are the neurons (no token buffer).
    * a timestep-wise ``index`` with a static ``schedule`` (static masks): ``multistep_neuron_static_traceable``.
    * a timestep-wise dynamic index (top-k in the graph): a full-N state buffer, a token not kept at t gets no input
      and its membrane decays by ``(1 - 1/tau) ** gap`` when it is next kept. (The eager version applies the decay
      only when some gap > 0; here it is always applied, which is the identity for gap 0 when ``v_reset == 0``, the
      value every model uses.)
    """
    T = x.shape[0]
    if index is not None and index.timestep_wise and index.schedule is not None:
        return multistep_neuron_static_traceable(x, tau, v_th, v_reset, ternary, index.schedule)
    if index is None or not index.timestep_wise:
        spikes, fires = [], []
        v = None
        for t, xt in enumerate(torch.split(x, 1, 0)):
            h, s, fired = _step_traceable(xt, v, tau, v_th, v_reset, ternary)
            spikes.append(s)
            fires.append(fired)
            if t < T - 1:
                v = torch.where(fired, v_reset, h)
        return _spikes_traceable(spikes, fires, x.dtype)
    decay = 1.0 - 1.0 / tau
    idx, n_full = index.idx, index.n_full  # (T, B, k)
    nf = x.dim() - 3  # feature dims after (T, B, k)
    V = torch.full_like(x[0, :, :1], v_reset).expand(-1, n_full, *([-1] * nf))  # (B, n_full, *F)
    last = torch.full_like(idx[0, :, :1], -1).expand(-1, n_full)  # (B, n_full) last step each token was updated
    out = []
    for t in range(T):
        it = idx[t]  # (B, k)
        ie = it.reshape(*it.shape, *([1] * nf)).expand_as(x[t])
        gap = (t - 1) - torch.gather(last, 1, it)  # skipped steps since the last update
        fac = torch.pow(decay, gap.to(x.dtype)).reshape(*it.shape, *([1] * nf))
        v = torch.gather(V, 1, ie)
        v = v_reset + (v - v_reset) * fac
        h = v + (x[t] - (v - v_reset)) / tau
        s = _fire(h, v_th, ternary)
        out.append(s)
        V = V.scatter(1, ie, torch.where(s != 0, torch.full_like(h, v_reset), h))
        last = last.scatter(1, it, torch.full_like(it, t))
    return torch.stack(out)


def multistep_neuron_static_traceable(x: torch.Tensor, tau: float, v_th: float, v_reset: float, ternary: bool,
                                      sched: LIFSchedule) -> torch.Tensor:
    """Traceable twin of ``_static_forward``: x (T, B, k, *F) with a static timestep-wise schedule.

    Step t starts from the post-reset membranes of the earlier steps it needs (``sched.src``): one constant-index
    Gather over the slot axis (of a Concat when the sources span several steps), a constant decay factor where
    some gap > 0, and a constant Where putting v_reset into slots whose token was never kept before. Nothing is
    sized by the full token sequence.
    """
    T, k = sched.T, sched.k  # plain ints (x.shape entries are traced values)
    nf = x.dim() - 3
    bshape = (1, 1, k, *([1] * nf))
    spikes, fires, hist = [], [], []  # hist[t]: (1, B, k, *F) post-reset membranes after step t
    for t, xt in enumerate(torch.split(x, 1, 0)):
        if t == 0:
            v = None
        elif sched.continues[t]:
            v = hist[t - 1]
        else:
            rows = sched.src_rows[t]
            fresh = sched.fresh[t]
            steps = sorted({(int(r) - 1) // k for r in rows[~fresh]}) or [t - 1]
            # rows of the concatenation of the needed steps (fresh slots read any row, then get v_reset)
            where = {tp: i for i, tp in enumerate(steps)}
            local = np.array([0 if f else where[(int(r) - 1) // k] * k + (int(r) - 1) % k
                              for r, f in zip(rows.tolist(), fresh.tolist())], dtype=np.int64)
            src = hist[steps[0]] if len(steps) == 1 else torch.cat([hist[tp] for tp in steps], 2)
            v = torch.index_select(src, 2, torch.as_tensor(local))
            if sched.decays[t]:
                fac = sched.factor(t, tau, x.dtype, x.device)  # a constant of the graph
                v = v * fac.reshape(bshape) if v_reset == 0.0 else (v - v_reset) * fac.reshape(bshape) + v_reset
            if fresh.any():
                v = torch.where(torch.as_tensor(fresh).reshape(bshape), v_reset, v)
        h, s, fired = _step_traceable(xt, v, tau, v_th, v_reset, ternary)
        spikes.append(s)
        fires.append(fired)
        if t < T - 1:
            hist.append(torch.where(fired, v_reset, h))
    return _spikes_traceable(spikes, fires, x.dtype)


class LIF(nn.Module):
    """Multi-step LIF neuron layer (binary spikes). Accepts ``index`` for timestep-wise token sets."""

    kind = "lif"

    def __init__(self, v_th: float = V_TH, tau: float = TAU, v_reset: float = V_RESET, alpha: float = ALPHA):
        super().__init__()
        self.v_th, self.tau, self.v_reset, self.alpha = v_th, tau, v_reset, alpha

    def forward(self, x: torch.Tensor, index: TokenIndex | None = None) -> torch.Tensor:
        return multistep_neuron(x, self.tau, self.v_th, self.v_reset, self.alpha, self._ternary, index)

    _ternary = False

    def extra_repr(self) -> str:
        return f"v_th={self.v_th}, tau={self.tau}, v_reset={self.v_reset}"


class TernaryLIF(LIF):
    """LIF that emits -1/0/+1 (A²OS²A's V neuron): fires +1 at H >= V_th, -1 at H <= -V_th, hard reset."""

    kind = "ternary"
    _ternary = True


class ReLUNeuron(nn.Module):
    """Stateless ReLU 'neuron' (A²OS²A's K): real-valued, non-negative output."""

    kind = "relu"

    def forward(self, x: torch.Tensor, index: TokenIndex | None = None) -> torch.Tensor:
        return torch.relu(x)


NEURON_TYPES = (LIF, TernaryLIF, ReLUNeuron)
