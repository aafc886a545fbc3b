"""Passes: ``graph.transform(FoldBatchNorm()).transform(ApplyMasks(masks)).transform(DropNeverKept())``.

A pass is a callable ``Graph -> Graph`` that returns a NEW graph and never changes its input (nodes are frozen and
their arrays read-only; a pass edits a working copy of the node list, ``_Edit``).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..pruning.masks import TokenMasks
from .nodes import BatchNorm, Conv, Graph, IRError, Node, Rejoin, Scorer, Select, TokenLinear, Tokens


class _Edit:
    """A working copy of a graph's wiring. ``graph()`` makes the new (checked) Graph."""

    def __init__(self, g: Graph):
        self.nodes: list[Node] = list(g.nodes)
        self.inputs = {k: list(v) for k, v in g.inputs.items()}
        self.blocks = [list(b) for b in g.blocks]

    def index(self, name: str) -> int:
        return next(i for i, n in enumerate(self.nodes) if n.name == name)

    def reroute(self, old: str, new: str, keep: tuple[str, ...] = ()) -> None:
        """Every reader of ``old`` (node inputs and block entries), except the nodes in ``keep``, reads ``new``."""
        for name, ins in self.inputs.items():
            if name not in keep:
                self.inputs[name] = [new if i == old else i for i in ins]
        for b in self.blocks:
            b[0] = new if b[0] == old else b[0]

    def remove(self, name: str, by: str | None = None) -> None:
        """Drop node ``name``; its readers read ``by`` instead (there must be none when ``by`` is None)."""
        if by is not None:
            self.reroute(name, by)
        elif any(name in ins for ins in self.inputs.values()):
            raise IRError(f"cannot remove {name!r}: other nodes read it")
        del self.nodes[self.index(name)]
        del self.inputs[name]

    def insert_after(self, after: str, node: Node, inputs: tuple[str, ...]) -> str:
        self.nodes.insert(self.index(after) + 1, node)
        self.inputs[node.name] = list(inputs)
        return node.name

    def graph(self) -> Graph:
        return Graph(tuple(self.nodes), {k: tuple(v) for k, v in self.inputs.items()}, tuple(map(tuple, self.blocks)))


# -------------------------------------------------------------------------------------------- FoldBatchNorm
def _fold(op: Conv | TokenLinear, bn: BatchNorm) -> Conv | TokenLinear:
    """W' = W s, b' = (b - mean) s + beta per output channel, s = gamma / sqrt(var + eps) (float64)."""
    if op.weight is None or bn.mean is None:
        return op  # structure-only graph: nothing to compute
    s = bn.gamma.astype(np.float64) / np.sqrt(bn.var.astype(np.float64) + bn.eps)
    w = op.weight.astype(np.float64) * s.reshape(-1, *([1] * (op.weight.ndim - 1)))
    b = op.bias.astype(np.float64) if op.bias is not None else np.zeros(len(s))
    return dataclasses.replace(op, weight=w, bias=(b - bn.mean) * s + bn.beta)


class FoldBatchNorm:
    """Fold every BatchNorm into the Conv or TokenLinear before it; the BatchNorm nodes leave the graph.

    The folded layer keeps its name, so its readers now read it directly (a structure-only graph loses the
    BatchNorm nodes and keeps its weights None).
    """

    def __call__(self, g: Graph) -> Graph:
        e = _Edit(g)
        for bn in [n for n in g.nodes if isinstance(n, BatchNorm)]:
            (src,) = g.inputs[bn.name]
            op = g.node(src)
            if not isinstance(op, (Conv, TokenLinear)) or g.readers(src) != [bn.name]:
                raise IRError(f"cannot fold BatchNorm {bn.name!r}: it must be the only reader of a Conv or "
                              f"TokenLinear, its input is {type(op).__name__} {src!r}")
            e.nodes[e.index(src)] = _fold(op, bn)
            e.remove(bn.name, by=src)
        return e.graph()


# ----------------------------------------------------------------------------------------------- ApplyMasks
class ApplyMasks:
    """Static ``TokenMasks`` -> fixed per-timestep schedules, no scorer.

    Every Scorer, Select and Rejoin is removed; then, for each mask site s, a static Select (``schedule`` = the
    site's (T, n_full) mask) is inserted before block s, and in skip mode a Rejoin after it. Sites the model was
    not configured to prune at are fine (masks on an unpruned model); configured sites without a mask are gone.
    """

    def __init__(self, masks: TokenMasks):
        self.masks = masks

    def __call__(self, g: Graph) -> Graph:
        m = self.masks
        tokens = next(n for n in g.nodes if isinstance(n, Tokens))
        if (m.T, m.n_full) != (g.T, g.n_tokens):
            raise IRError(f"masks are for T={m.T}, {m.n_full} tokens; the graph has T={g.T}, {g.n_tokens} tokens")
        bad = [s for s in m.sites if not 0 <= s < len(g.blocks)]
        if bad:
            raise IRError(f"mask sites {bad} are not blocks of this graph ({len(g.blocks)} blocks)")
        e = _Edit(g)
        for n in g.nodes:  # readers of a Select read its input again; after a Rejoin, the block output
            if isinstance(n, Rejoin):
                e.remove(n.name, by=e.inputs[n.name][1])
            elif isinstance(n, Select):
                e.remove(n.name, by=e.inputs[n.name][0])
        for n in g.nodes:
            if isinstance(n, Scorer):
                e.remove(n.name)
        for s in sorted(m.sites):
            mask = np.asarray(m.sites[s], dtype=bool)
            stream, last = e.blocks[s]
            sel = Select(name=f"blocks.{s}.select", site=s, mode=m.mode, method="static", n_fixed=tokens.n_fixed,
                         timestep_wise=bool((mask != mask[:1]).any()), schedule=mask)
            e.reroute(stream, sel.name)
            e.insert_after(stream, sel, (stream,))
            if m.mode == "skip":
                rj = Rejoin(name=f"blocks.{s}.rejoin", site=s)
                e.reroute(last, rj.name)
                e.insert_after(last, rj, (stream, last))
        return e.graph()


# -------------------------------------------------------------------------------------------- DropNeverKept
class DropNeverKept:
    """Tokens never kept at any timestep leave the graph: after a static drop Select only the neurons of tokens
    kept at some timestep exist (``tokens`` = the union of its schedule over timesteps). A token dropped at t
    but kept at another timestep still has its neurons (a decaying membrane at t). Dynamic selections (known only
    at run time) and skip mode (no token leaves the network) are unchanged."""

    def __call__(self, g: Graph) -> Graph:
        e = _Edit(g)
        for i, n in enumerate(e.nodes):
            if isinstance(n, Select) and n.static and n.mode == "drop":
                e.nodes[i] = dataclasses.replace(n, tokens=np.flatnonzero(n.schedule.any(0)))
        return e.graph()
