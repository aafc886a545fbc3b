"""``build_ir(model) -> Graph``: the torch model lowered once, module by module, through one table.

``LOWERINGS`` maps a module type to a small function ``(builder, module, name, *inputs) -> output name`` that adds
that module's nodes. A new attention kind (or any new module) is one entry in the table; a module without an entry
is an ``UnsupportedOpError`` naming it. Pruning follows ``model.forward``: with the model's pruning configuration,
a Scorer and a dynamic Select before every pruning site (TP: before every block from the first site on, and a
Rejoin after it). Static masks are applied afterwards, by the ``ApplyMasks`` pass.
"""
from __future__ import annotations

import functools
import json
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..nn.attention import A2OS2A, SDSA, SSA, LinearBN
from ..config import ModelConfig
from ..errors import UnsupportedOpError
from ..nn.model import MLP, SPS, Block, ConvBN, SpikingTransformer, build_model
from ..nn.model import MaxPool as TorchMaxPool
from ..nn.neurons import LIF, ReLUNeuron, TernaryLIF
from .nodes import (SCORER_METHODS_WITH_ATTENTION, Add, BatchNorm, Conv, Graph, Head, Input, MaxPool, Neuron, Node,
                    Product, Rejoin, Scorer, Select, TokenLinear, Tokens)

TIMESTEP_WISE_SCORERS = ("stata",)  # scorers whose kept set differs between timesteps (pruning.SCORERS' flag)
SCORERS_WITHOUT_ATTENTION = ("l1", "random", "tp")


class Builder:
    """Collects nodes in forward (topological) order. ``weights=False`` builds a structure-only graph."""

    def __init__(self, weights: bool = True):
        self.weights = weights
        self.nodes: list[Node] = []
        self.inputs: dict[str, tuple[str, ...]] = {}
        self.blocks: list[tuple[str, str]] = []
        self.attention: tuple[str, str] | None = None  # (Q, K) neuron names of the last attention, for scorers

    def add(self, node: Node, *inputs: str) -> str:
        self.nodes.append(node)
        self.inputs[node.name] = inputs
        return node.name

    def lower(self, module: nn.Module, name: str, *inputs: str) -> str:
        fn = LOWERINGS.get(type(module))
        if fn is None:
            raise UnsupportedOpError(f"no IR lowering for {type(module).__name__} (module {name!r}): add one to "
                                     "stata_deploy.ir.build.LOWERINGS")
        return fn(self, module, name, *inputs)

    def array(self, t: torch.Tensor | None) -> np.ndarray | None:
        return t.detach().cpu().numpy() if (self.weights and t is not None) else None

    def graph(self) -> Graph:
        return Graph(tuple(self.nodes), self.inputs, tuple(self.blocks))


def build_ir(model: SpikingTransformer, weights: bool = True) -> Graph:
    """The IR of ``model`` (with its weights, or structure only)."""
    b = Builder(weights)
    b.lower(model, "")
    return b.graph()


@functools.lru_cache(maxsize=32)
def _structure(cfg_json: str) -> Graph:
    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    with torch.device("meta"):  # no memory, no initialisation
        model = build_model(cfg)
    return build_ir(model, weights=False)


def structure_ir(cfg: ModelConfig) -> Graph:
    """The structure-only IR of the model ``cfg`` describes (for consumers with a config but no weights, such as
    op counting). Cached: graphs are immutable."""
    return _structure(json.dumps(cfg.to_dict(), sort_keys=True))


# ------------------------------------------------------------------------------------------ the lowerings
def _model(b: Builder, m: SpikingTransformer, name: str) -> str:
    cfg = m.cfg
    x = b.add(Input(name="input", channels=cfg.in_channels, height=cfg.img_size, width=cfg.img_size, T=cfg.T))
    x = b.lower(m.stem, "stem", x)
    anchor = m.anchor is not None
    x = b.add(Tokens(name="tokens", anchor=anchor, anchor_value=b.array(m.anchor.reshape(-1)) if anchor else None), x)
    n_fixed = 1 if anchor else 0
    pr = cfg.prune
    sites = set(pr.resolved_sites(cfg.depth)) if pr.active else set()
    skip = pr.method == "tp"  # TP: every block from the first site on selects tokens; the others skip it
    first = min(sites, default=cfg.depth)
    for i, blk in enumerate(m.blocks):
        stream = x
        if (skip and i >= first) or i in sites:
            x = _site(b, cfg, i, x, "skip" if skip else "drop", n_fixed)
        y = b.lower(blk, f"blocks.{i}", x)
        b.blocks.append((x, y))
        x = b.add(Rejoin(name=f"blocks.{i}.rejoin", site=i), stream, y) if skip and i >= first else y
    return b.add(Head(name="head", in_features=m.head.in_features, out_features=m.head.out_features, n_fixed=n_fixed,
                      weight=b.array(m.head.weight), bias=b.array(m.head.bias)), x)


def _site(b: Builder, cfg: ModelConfig, i: int, x: str, mode: str, n_fixed: int) -> str:
    method = cfg.prune.method
    if method in SCORER_METHODS_WITH_ATTENTION:
        qk = b.attention
    elif method in SCORERS_WITHOUT_ATTENTION:
        qk = ()
    else:
        raise UnsupportedOpError(f"no IR lowering for pruning method {method!r}: add it to stata_deploy.ir.build")
    s = b.add(Scorer(name=f"blocks.{i}.scorer", method=method, n_fixed=n_fixed, heads=cfg.heads, grid=cfg.grid),
              x, *qk)
    return b.add(Select(name=f"blocks.{i}.select", site=i, mode=mode, method=method, n_fixed=n_fixed,
                        keep=cfg.prune.keep, timestep_wise=method in TIMESTEP_WISE_SCORERS), x, s)


def _sps(b: Builder, m: SPS, name: str, x: str) -> str:
    for i, st in enumerate(m.stages):
        x = b.lower(st.conv, f"{name}.stages.{i}.conv", x)
        x = b.lower(st.lif, f"{name}.stages.{i}.lif", x)
        if st.pool is not None:
            x = b.lower(st.pool, f"{name}.stages.{i}.pool", x)
    r = b.lower(m.rpe, f"{name}.rpe", x)
    r = b.lower(m.rpe_lif, f"{name}.rpe_lif", r)
    return b.add(Add(name=f"{name}.rpe_residual"), x, r)  # (D, g, g), values in {0, 1, 2}


def _square(module: nn.Module, name: str, attr: str) -> int:
    v = getattr(module, attr)
    v = v if isinstance(v, tuple) else (v, v)
    if v[0] != v[1] or (isinstance(module, nn.Conv2d) and (module.groups != 1 or module.dilation != (1, 1))):
        raise UnsupportedOpError(f"{name}: only square, ungrouped, undilated {type(module).__name__} is supported")
    return int(v[0])


def _batchnorm(b: Builder, bn: nn.Module, name: str, x: str) -> str:
    return b.add(BatchNorm(name=name, features=bn.num_features, eps=float(bn.eps), mean=b.array(bn.running_mean),
                           var=b.array(bn.running_var), gamma=b.array(bn.weight), beta=b.array(bn.bias)), x)


def _conv_bn(b: Builder, m: ConvBN, name: str, x: str) -> str:
    c = m.conv
    x = b.add(Conv(name=name, in_channels=c.in_channels, out_channels=c.out_channels,
                   kernel=_square(c, name, "kernel_size"), stride=_square(c, name, "stride"),
                   padding=_square(c, name, "padding"), weight=b.array(c.weight), bias=b.array(c.bias)), x)
    return _batchnorm(b, m.bn, f"{name}.bn", x)


def _linear_bn(b: Builder, m: LinearBN, name: str, x: str) -> str:
    lin = m.linear
    x = b.add(TokenLinear(name=name, in_features=lin.in_features, out_features=lin.out_features,
                          weight=b.array(lin.weight), bias=b.array(lin.bias)), x)
    return _batchnorm(b, m.bn, f"{name}.bn", x)


def _max_pool(b: Builder, m: TorchMaxPool, name: str, x: str) -> str:
    p = m.pool
    if p.dilation not in (1, (1, 1)) or p.ceil_mode:
        raise UnsupportedOpError(f"{name}: only undilated, floor-mode max pooling is supported")
    return b.add(MaxPool(name=name, kernel=_square(p, name, "kernel_size"), stride=_square(p, name, "stride"),
                             padding=_square(p, name, "padding")), x)


def _neuron(b: Builder, m: nn.Module, name: str, x: str) -> str:
    if m.kind == "relu":
        return b.add(Neuron(name=name, kind="relu"), x)
    return b.add(Neuron(name=name, kind=m.kind, tau=float(m.tau), v_th=float(m.v_th), v_reset=float(m.v_reset)), x)


def _block(b: Builder, m: Block, name: str, x: str) -> str:
    a = b.lower(m.attn, f"{name}.attn", x)
    x = b.add(Add(name=f"{name}.attn_residual"), x, a)
    y = b.lower(m.mlp, f"{name}.mlp", x)
    return b.add(Add(name=f"{name}.mlp_residual"), x, y)


def _mlp(b: Builder, m: MLP, name: str, x: str) -> str:
    x = b.lower(m.fc1_lif, f"{name}.fc1_lif", b.lower(m.fc1, f"{name}.fc1", x))
    return b.lower(m.fc2_lif, f"{name}.fc2_lif", b.lower(m.fc2, f"{name}.fc2", x))


def _qkv(b: Builder, m, name: str, x: str) -> tuple[str, str, str]:
    q, k, v = (b.lower(getattr(m, f"{br}_lif"), f"{name}.{br}_lif", b.lower(getattr(m, br), f"{name}.{br}", x))
               for br in "qkv")
    b.attention = (q, k)
    return q, k, v


def _proj(b: Builder, m, name: str, y: str) -> str:
    return b.lower(m.proj_lif, f"{name}.proj_lif", b.lower(m.proj, f"{name}.proj", y))


def _ssa(b: Builder, m: SSA, name: str, x: str) -> str:
    q, k, v = _qkv(b, m, name, x)
    a = b.add(Product(name=f"{name}.qk", kind="qk", heads=m.heads), q, k)
    y = b.add(Product(name=f"{name}.av", kind="av", heads=m.heads, scale=float(m.scale)), a, v)
    return _proj(b, m, name, b.lower(m.attn_lif, f"{name}.attn_lif", y))


def _sdsa(b: Builder, m: SDSA, name: str, x: str) -> str:
    q, k, v = _qkv(b, m, name, x)
    kv = b.add(Product(name=f"{name}.kv", kind="kv", heads=m.heads), k, v)
    s = b.add(Product(name=f"{name}.kv_sum", kind="kv_sum", heads=m.heads), kv)
    g = b.lower(m.attn_lif, f"{name}.attn_lif", s)  # (1, D): token-independent
    return _proj(b, m, name, b.add(Product(name=f"{name}.qkv_gate", kind="qkv_gate", heads=m.heads), q, g))


def _a2os2a(b: Builder, m: A2OS2A, name: str, x: str) -> str:
    q, k, v = _qkv(b, m, name, x)
    ktv = b.add(Product(name=f"{name}.ktv", kind="ktv", heads=m.heads), k, v)
    y = b.add(Product(name=f"{name}.qktv", kind="qktv", heads=m.heads), q, ktv)
    return _proj(b, m, name, b.lower(m.attn_lif, f"{name}.attn_lif", y))


# module type -> lowering. One entry per module kind; a new attention kind is one more line.
LOWERINGS: dict[type, Callable[..., str]] = {
    SpikingTransformer: _model,
    SPS: _sps,
    ConvBN: _conv_bn,
    TorchMaxPool: _max_pool,
    LinearBN: _linear_bn,
    LIF: _neuron,
    TernaryLIF: _neuron,
    ReLUNeuron: _neuron,
    Block: _block,
    MLP: _mlp,
    SSA: _ssa,
    SDSA: _sdsa,
    A2OS2A: _a2os2a,
}
