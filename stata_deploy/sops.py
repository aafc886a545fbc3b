"""Synaptic-operation counting from a ``RunResult`` — the one counter every runtime shares.

    report = count_ops(cfg, result, masks)      # per sample: report.acs, .macs, .attention_ops, .sops, .layers

The counter does not hook the torch model: it rebuilds every synaptic layer's input from the recorded neuron
outputs (``RunResult.spikes``), the encoded input, the kept token positions (``RunResult.kept``) and the network's
IR (``stata_deploy/ir``: built from the model ``cfg`` describes; ``ir/count.py`` is the counter, one function per
node type). So the torch reference, ONNX Runtime and Lava give counts that compare number for number. This module
keeps the report types (``LayerOps``, ``OpsReport``) and the entry point ``count_ops``.

Conventions (all counts are per inference = summed over the batch, divided by the batch size; per timestep in
``*_t``):

* **AC** (accumulate, spike/integer driven). A synaptic layer (Conv/Linear) whose input row holds integers — binary
  spikes, or the residual stream, a sum of spike tensors with values 0, 1, 2, ... — costs
  ``sum(|x|) x fan-out``: an input of value 2 is two spikes arriving at the same synapses. Fan-out is the number of
  weights an input element touches: ``out_features`` for a Linear, ``out_channels x (valid kernel positions)`` for
  the 3x3 / padding 1 convs (border pixels reach fewer outputs). Weights are assumed non-zero (trained float
  weights are). Bias and folded BatchNorm are part of the neuron update, not counted as synaptic ops.
* **MAC** (multiply-accumulate, real-valued input): ``nonzero(x) x fan-out``. Used for the first conv on pixels
  (per sample and timestep: real-valued unless every pixel is an integer, as with event counts), the anchor
  token's row of the residual stream (a learnt real vector plus spikes: all D entries counted as non-zero), and
  the classifier head (its input is the token mean).
* ``events``: ``nonzero(x) x fan-out`` for every Conv/Linear regardless of the value: what NeuroBench calls
  Effective_ACs + Effective_MACs. It differs from ``acs + macs`` only where residual integers > 1 are weighted.
* **Attention products** (``attention_acs`` / ``attention_macs``, sum = ``attention_ops``): for a product of two
  activations ``A @ B`` the count is the number of non-trivial products, i.e. index triples (i, k, j) with
  ``A[i, k] != 0`` and ``B[k, j] != 0`` (for binary x binary: the pairs of coincident spikes); for an elementwise
  product the number of positions where both operands are non-zero; for a token sum the number of non-zero terms.
  A product is an accumulate (attention_ac) when one operand is in {-1, 0, 1} (then it is an add, a subtract or
  nothing) and a MAC otherwise. So SSA's ``Q K^T`` and ``(Q K^T) V``, SDSA's ``K ⊙ V``, token sum and ``Q ⊙ kv``,
  and A²OS²A's ``K^T V`` (real ReLU K x ternary V) and ``Q (K^T V)`` (binary Q) are all accumulates: A²OS²A is
  addition-only. The constant scale (SSA's 0.125) folds into the threshold and is not counted.
* **Neuron updates**: every neuron of every slot present at a timestep (pruned tokens: none). With timestep-wise
  token sets a token dropped at t but kept at another timestep keeps a decaying membrane (see neurons.py): on
  hardware with a fixed topology that neuron still exists, so it is counted apart as ``idle_neuron_updates``
  (Loihi's "inactive" update). **Spikes**: non-zero outputs (|±1| for ternary neurons; non-zero for the ReLU
  "neuron"). ``firing_rate = spikes / neuron_updates``.
* **Scorers** (dynamic pruning only; static masks need none): a layer ``blocks.{i}.scorer`` holds what the scorer
  computes — STATA/AT: the anchor row ``Q_0 K^T`` per head (attention ACs, recomputed even where SSA's ``Q K^T``
  already holds it), the mean over heads (and over T for AT) as ACs; TP: channel and time means, the temporal
  difference, channel sum and 3x3 box filter (ACs), the cosine and the two softmaxes (MACs, one per multiply,
  divide, square root or exp); l1, SSA-average likewise. The top-k selection is counted as ``compares``
  (``n x ceil(log2(k + 1))`` per selection, a heap-selection estimate). Max-pooling of spikes in the stem is an OR:
  its comparisons are reported (``compares``, 8 per output element) and costed only if a profile says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .config import ModelConfig
from .errors import StataError
from .pruning import TokenMasks
from .results import RunResult

OP_KINDS = ("mac", "ac", "attention_ac", "attention_mac", "compare", "neuron_update", "idle_neuron_update", "spike")
_FIELD = {  # op kind -> LayerOps attribute
    "mac": "macs",
    "ac": "acs",
    "attention_ac": "attention_acs",
    "attention_mac": "attention_macs",
    "compare": "compares",
    "neuron_update": "neuron_updates",
    "idle_neuron_update": "idle_neuron_updates",
    "spike": "spikes",
}


class CountError(StataError):
    """The RunResult does not describe the model (a layer's spikes or a site's kept tokens are missing)."""


# The counts reported per layer and in total (to_dict of LayerOps and OpsReport), in this order.
_REPORTED = ("macs", "acs", "attention_ops", "attention_acs", "attention_macs", "compares", "neuron_updates",
             "idle_neuron_updates", "spikes", "firing_rate", "events")


@dataclass
class LayerOps:
    """Op counts of one layer (a synaptic op with the neuron layer it drives), per inference.

    ``*_t`` hold the same counts per timestep (length T). Counts are floats because they are divided by the batch
    size; with batch size 1 they are exact integers.
    """

    name: str  # e.g. blocks.0.attn.q (synaptic op) or blocks.1.scorer
    kind: str  # conv | linear | attention | pool | scorer | head
    neuron: str | None = None  # the neuron layer this op drives (key of RunResult.spikes)
    fan_out: int = 0
    counts_t: dict[str, np.ndarray] = field(default_factory=dict)  # field name -> (T,) per-sample counts
    events_t: np.ndarray | None = None  # nonzero(x) x fan-out (NeuroBench "effective" ops) for conv/linear

    def _get(self, f: str) -> float:
        v = self.counts_t.get(f)
        return float(v.sum()) if v is not None else 0.0

    macs = property(lambda s: s._get("macs"))
    acs = property(lambda s: s._get("acs"))
    attention_acs = property(lambda s: s._get("attention_acs"))
    attention_macs = property(lambda s: s._get("attention_macs"))
    compares = property(lambda s: s._get("compares"))
    neuron_updates = property(lambda s: s._get("neuron_updates"))
    idle_neuron_updates = property(lambda s: s._get("idle_neuron_updates"))
    spikes = property(lambda s: s._get("spikes"))

    @property
    def attention_ops(self) -> float:
        return self.attention_acs + self.attention_macs

    @property
    def ops(self) -> float:
        """Synaptic + attention operations: macs + acs + attention_ops."""
        return self.macs + self.acs + self.attention_ops

    @property
    def events(self) -> float:
        return float(self.events_t.sum()) if self.events_t is not None else 0.0

    @property
    def firing_rate(self) -> float | None:
        n = self.neuron_updates
        return self.spikes / n if n else None

    def count(self, op: str) -> float:
        return self._get(_FIELD[op])

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "neuron": self.neuron, "fan_out": self.fan_out,
             **{f: getattr(self, f) for f in _REPORTED}, "ops": self.ops}
        d["per_timestep"] = {f: v.tolist() for f, v in self.counts_t.items()}
        return d


@dataclass
class OpsReport:
    """Per-layer op counts of one model on some inputs, per inference (see the module doc for conventions)."""

    layers: list[LayerOps]
    samples: int
    T: int

    def _sum(self, attr: str) -> float:
        return float(sum(getattr(l, attr) for l in self.layers))

    macs = property(lambda s: s._sum("macs"))
    acs = property(lambda s: s._sum("acs"))
    attention_acs = property(lambda s: s._sum("attention_acs"))
    attention_macs = property(lambda s: s._sum("attention_macs"))
    attention_ops = property(lambda s: s._sum("attention_ops"))
    compares = property(lambda s: s._sum("compares"))
    neuron_updates = property(lambda s: s._sum("neuron_updates"))
    idle_neuron_updates = property(lambda s: s._sum("idle_neuron_updates"))
    spikes = property(lambda s: s._sum("spikes"))
    events = property(lambda s: s._sum("events"))

    @property
    def sops(self) -> float:
        """Total synaptic operations per inference: ACs + MACs + attention ops (the 'OPs' of the ratio)."""
        return self.macs + self.acs + self.attention_ops

    ops = sops

    @property
    def firing_rate(self) -> float | None:
        n = self.neuron_updates
        return self.spikes / n if n else None

    def layer(self, name: str) -> LayerOps:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(name)

    def counts(self) -> dict[str, float]:
        """Total count per op kind (OP_KINDS), the input of energy estimation."""
        return {op: self._sum(_FIELD[op]) for op in OP_KINDS}

    def to_dict(self) -> dict:
        return {"samples": self.samples, "T": self.T, **{f: getattr(self, f) for f in _REPORTED}, "sops": self.sops,
                "layers": [l.to_dict() for l in self.layers]}

    @staticmethod
    def merge(reports: list["OpsReport"]) -> "OpsReport":
        """Combine reports of several batches of the same model into one (sample-weighted mean per inference)."""
        if not reports:
            raise CountError("no reports to merge")
        total = sum(r.samples for r in reports)
        base = reports[0]
        layers = []
        for i, l0 in enumerate(base.layers):
            counts: dict[str, np.ndarray] = {}
            ev = None
            for r in reports:
                l = r.layers[i] if i < len(r.layers) and r.layers[i].name == l0.name else r.layer(l0.name)
                w = r.samples / total
                for f, v in l.counts_t.items():
                    counts[f] = counts.get(f, 0) + v * w
                if l.events_t is not None:
                    ev = (ev if ev is not None else 0) + l.events_t * w
            layers.append(LayerOps(l0.name, l0.kind, l0.neuron, l0.fan_out, counts, ev))
        return OpsReport(layers, total, base.T)


# --------------------------------------------------------------------------------------------- counting
def count_ops(cfg: ModelConfig, result: RunResult, masks: TokenMasks | None = None) -> OpsReport:
    """Count the operations of one batch run of the model described by ``cfg`` (see the module doc).

    ``masks``: the static masks the run used (None: dynamic pruning as configured in cfg, scorer included).
    A lowering of the IR: ``ir.count.count`` on the structure of ``cfg``, with the masks applied as passes.
    """
    from .ir import structure_ir
    from .ir.count import count
    from .ir.passes import ApplyMasks, DropNeverKept

    graph = structure_ir(cfg)
    if masks is not None:
        masks.check_model(cfg)
        graph = graph.transform(ApplyMasks(masks)).transform(DropNeverKept())
    return count(graph, result)
