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
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Select the kept slots of a full token tensor x (T, B, N, ...) -> (T, B, k, ...)."""
        index = self.idx.reshape(*self.idx.shape, *([1] * (x.dim() - 3))).expand(
            *self.idx.shape, *x.shape[3:]
        )
        return torch.gather(x, 2, index)


def _surrogate(u: torch.Tensor, alpha: float) -> torch.Tensor:
    sg = torch.sigmoid(alpha * u)
    return alpha * sg * (1.0 - sg)


def _fire(h: torch.Tensor, v_th: float, ternary: bool) -> torch.Tensor:
    s = (h >= v_th).to(h.dtype)
    if ternary:
        s = s - (h <= -v_th).to(h.dtype)
    return s


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
            v = torch.full_like(x[0], v_reset)
            for t in range(T):
                h = v + (x[t] - (v - v_reset)) / tau
                s = _fire(h, v_th, ternary)
                hs[t] = h
                out[t] = s
                v = torch.where(s != 0, torch.full_like(h, v_reset), h)
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
            gv = torch.zeros_like(hs[0])  # grad w.r.t. V[t] flowing back from step t+1
            for t in range(T - 1, -1, -1):
                h = hs[t]
                s = _fire(h, v_th, ternary)
                sg = _surrogate(h - v_th, alpha)
                if ternary:
                    sg = sg + _surrogate(-h - v_th, alpha)
                gh = grad_out[t] * sg + gv * (1.0 - s.abs())
                grad_x[t] = gh / tau
                gv = gh * decay
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
