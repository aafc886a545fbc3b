"""Operation counts per layer and in total (``LayerOps``, ``OpsReport``): what the IR counter (``ir.count``)
returns and energy estimation prices. The counting conventions are in ``stata_deploy/energy/counter.py``."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import StataError

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


def _counts(names, read: str):
    """Class decorator: a read-only float property per name in ``names``, its value ``self.<read>(name)``."""
    def add(cls):
        for n in names:
            setattr(cls, n, property(lambda self, n=n: getattr(self, read)(n), doc=f"{n} per inference"))
        return cls
    return add


@_counts(_FIELD.values(), "_get")  # macs, acs, ...: the sum over timesteps of counts_t[name] (0.0 if absent)
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


@_counts((*_FIELD.values(), "attention_ops", "events"), "_sum")  # the sum over layers of the layer's count
@dataclass
class OpsReport:
    """Per-layer op counts of one model on some inputs, per inference (see the module doc for conventions)."""

    layers: list[LayerOps]
    samples: int
    T: int

    def _sum(self, attr: str) -> float:
        return float(sum(getattr(l, attr) for l in self.layers))

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
