"""Spiking self-attention kinds: Spikformer SSA, spike-driven SDSA, addition-only A²OS²A.

Every product of two activations is an explicit submodule (``MatMul``, ``Hadamard``, ``TokenSum``) so that
op counters, exporters and runtimes see it by name instead of re-deriving it.
Each attention returns ``(out, AttnInfo)``; ``AttnInfo`` carries the per-head Q and K used to build attention
maps for pruning scores and alignment losses (``attention_map``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .neurons import ATTN_V_TH, LIF, ReLUNeuron, TernaryLIF, TokenIndex
from ..registry import Registry


class MatMul(nn.Module):
    """a @ b over the last two dims (an attention product)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class Hadamard(nn.Module):
    """Elementwise product a * b (broadcasting)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class TokenSum(nn.Module):
    """Sum over the token dimension ``dim`` (keepdim)."""

    def __init__(self, dim: int = -2):
        super().__init__()
        self.dim = dim

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a.sum(dim=self.dim, keepdim=True)


class LinearBN(nn.Module):
    """Per-token Linear followed by BatchNorm1d over channels. x: (T, B, N, Din) -> (T, B, N, Dout)."""

    def __init__(self, din: int, dout: int, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(din, dout, bias=bias)
        self.bn = nn.BatchNorm1d(dout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)  # (T, B, N, Dout)
        shp = y.shape
        return self.bn(y.reshape(-1, shp[-1])).reshape(shp)


@dataclass
class AttnInfo:
    q: torch.Tensor  # (T, B, H, N, dh)
    k: torch.Tensor  # (T, B, H, N, dh)
    scale: float

    def attention_map(self) -> torch.Tensor:
        """Q K^T * scale per head: (T, B, H, N, N)."""
        return (self.q @ self.k.transpose(-1, -2)) * self.scale

    def anchor_row(self) -> torch.Tensor:
        """Mean over heads of the anchor token's (slot 0) attention to every slot: (T, B, N)."""
        return (self.q[:, :, :, :1] @ self.k.transpose(-1, -2)).squeeze(-2).mean(2) * self.scale

    def mean_received(self) -> torch.Tensor:
        """Mean attention each slot receives (over queries and heads): (T, B, N)."""
        return (self.q.mean(3, keepdim=True) @ self.k.transpose(-1, -2)).squeeze(-2).mean(2) * self.scale


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    T, B, N, D = x.shape
    return x.reshape(T, B, N, h, D // h).transpose(2, 3)  # (T, B, H, N, dh)


def _merge(x: torch.Tensor) -> torch.Tensor:
    T, B, H, N, dh = x.shape
    return x.transpose(2, 3).reshape(T, B, N, H * dh)


class _QKVAttention(nn.Module):
    q_neuron = LIF
    k_neuron = LIF
    v_neuron = LIF

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.scale = cfg.attn_scale
        self.q = LinearBN(d, d)
        self.q_lif = self.q_neuron()
        self.k = LinearBN(d, d)
        self.k_lif = self.k_neuron()
        self.v = LinearBN(d, d)
        self.v_lif = self.v_neuron()
        self.attn_lif = LIF(v_th=ATTN_V_TH)
        self.proj = LinearBN(d, d, bias=True)
        self.proj_lif = LIF()

    def qkv(self, x, index):
        h = self.heads
        q = _heads(self.q_lif(self.q(x), index), h)
        k = _heads(self.k_lif(self.k(x), index), h)
        v = _heads(self.v_lif(self.v(x), index), h)
        return q, k, v

    def out(self, y, index):
        return self.proj_lif(self.proj(y), index)


class SSA(_QKVAttention):
    """Spikformer SSA: attn = LIF_0.5((Q K^T) V * scale), Q/K/V binary spikes, no softmax."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.qk = MatMul()
        self.av = MatMul()

    def forward(self, x: torch.Tensor, index: TokenIndex | None = None):
        q, k, v = self.qkv(x, index)  # (T, B, H, N, dh)
        attn = self.qk(q, k.transpose(-1, -2))  # (T, B, H, N, N)
        y = self.av(attn, v) * self.scale  # (T, B, H, N, dh)
        y = self.attn_lif(_merge(y), index)  # (T, B, N, D)
        return self.out(y, index), AttnInfo(q, k, self.scale)


class SDSA(_QKVAttention):
    """Spike-driven SDSA: Q ⊙ LIF_0.5(sum_N (K ⊙ V)) per head; Hadamard products and a token sum only."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.kv = Hadamard()
        self.kv_sum = TokenSum(dim=-2)
        self.qkv_gate = Hadamard()

    def forward(self, x: torch.Tensor, index: TokenIndex | None = None):
        q, k, v = self.qkv(x, index)  # (T, B, H, N, dh)
        kv = self.kv_sum(self.kv(k, v))  # (T, B, H, 1, dh)
        T, B, H, _, dh = kv.shape
        kv = self.attn_lif(kv.reshape(T, B, 1, H * dh))  # token-independent: no index
        y = self.qkv_gate(q, _heads(kv, H))  # (T, B, H, N, dh)
        return self.out(_merge(y), index), AttnInfo(q, k, self.scale)


class A2OS2A(_QKVAttention):
    """Addition-only spiking self-attention: binary Q, ReLU K, ternary V; Q (K^T V), no softmax, no scale."""

    k_neuron = ReLUNeuron
    v_neuron = TernaryLIF

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.ktv = MatMul()
        self.qktv = MatMul()

    def forward(self, x: torch.Tensor, index: TokenIndex | None = None):
        q, k, v = self.qkv(x, index)
        ktv = self.ktv(k.transpose(-1, -2), v)  # (T, B, H, dh, dh)
        y = self.qktv(q, ktv)  # (T, B, H, N, dh)
        y = self.attn_lif(_merge(y), index)
        return self.out(y, index), AttnInfo(q, k, 1.0)


ATTENTIONS: Registry[type] = Registry("attention kind")
ATTENTIONS.register("ssa", SSA)
ATTENTIONS.register("sdsa", SDSA)
ATTENTIONS.register("a2os2a", A2OS2A)
