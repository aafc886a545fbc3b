"""Energy per inference from an ``OpsReport`` and a hardware profile (pJ per op, each with its source).

    from stata_deploy.energy.profiles import load_profile, estimate_energy
    e = estimate_energy(report, load_profile("loihi"))     # e.total_mj, e.layers[i]["energy_mj"]

Built-in profiles live in ``stata_deploy/energy/hardware/*.json`` (45nm, loihi, spinnaker2, truenorth). A user profile is a
TOML or JSON file with the same layout::

    name = "mychip"
    citation = "where the numbers come from"
    [ops]
    ac = 0.9                                    # pJ, or a table:
    mac = { pj = 4.6, source = "Horowitz 2014" }

Op kinds: see ``stata_deploy.energy.counter.OP_KINDS``. A profile that has no entry for an op the model performs is an error
naming the op — never a silent zero. An explicit 0 is allowed and reported as "not costed" with its reason.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import StataError
from .counter import OP_KINDS, OpsReport

PJ_TO_MJ = 1e-9


class ProfileError(StataError):
    """A hardware profile is missing, malformed, or lacks the cost of an op the model performs."""


@dataclass
class OpCost:
    pj: float  # energy of one op, picojoules
    source: str = ""


@dataclass
class Profile:
    name: str
    ops: dict[str, OpCost]
    title: str = ""
    citation: str = ""
    notes: str = ""
    path: str | None = None  # file it was read from (None: built-in)

    def cost(self, op: str, count: float = 0.0) -> OpCost:
        c = self.ops.get(op)
        if c is None:
            raise ProfileError(
                f"hardware profile {self.name!r} has no cost for op {op!r}, which this model performs "
                f"({count:,.0f} per inference); add '{op}' (pJ) to the profile's [ops]"
            )
        return c

    def to_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "citation": self.citation, "notes": self.notes,
                "ops": {k: {"pj": v.pj, "source": v.source} for k, v in self.ops.items()}}


MAX_PJ = 1e9  # 1 mJ for one operation: beyond any hardware; keeps every total finite


def builtin_profiles() -> list[str]:
    d = resources.files("stata_deploy.energy") / "hardware"
    return sorted(p.name[:-5] for p in d.iterdir() if p.name.endswith(".json"))


def _parse(d: dict, where: str, default_name: str) -> Profile:
    if not isinstance(d, dict):
        raise ProfileError(f"hardware profile {where} must be a table/object")
    ops_in = d.get("ops")
    if not isinstance(ops_in, dict) or not ops_in:
        raise ProfileError(f"hardware profile {where} has no [ops] table of costs in pJ (op kinds: {', '.join(OP_KINDS)})")
    ops: dict[str, OpCost] = {}
    for op, v in ops_in.items():
        if op not in OP_KINDS:
            raise ProfileError(f"hardware profile {where}: unknown op {op!r}; op kinds are: {', '.join(OP_KINDS)}")
        if isinstance(v, dict):
            pj, source = v.get("pj"), str(v.get("source", ""))
        else:
            pj, source = v, ""
        if isinstance(pj, bool) or not isinstance(pj, (int, float)) or not math.isfinite(pj) or not 0 <= pj <= MAX_PJ:
            raise ProfileError(f"hardware profile {where}: cost of {op!r} must be a non-negative number of pJ, at most "
                               f"{MAX_PJ:g} (1 mJ per operation), got {pj!r}")
        ops[op] = OpCost(float(pj), source)
    return Profile(str(d.get("name") or default_name), ops, str(d.get("title", "")), str(d.get("citation", "")),
                   str(d.get("notes", "")))


def load_profile(spec: str | Path) -> Profile:
    """A built-in profile by name (45nm, loihi, spinnaker2, truenorth) or a user .toml / .json file."""
    spec = str(spec)
    names = builtin_profiles()
    if spec in names:
        text = (resources.files("stata_deploy.energy") / "hardware" / f"{spec}.json").read_text()
        return _parse(json.loads(text), spec, spec)
    p = Path(spec)
    if not p.is_file():
        raise ProfileError(f"unknown hardware {spec!r}: not a built-in profile ({', '.join(names)}) and no such file")
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            d = tomllib.loads(p.read_text())
        else:
            d = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as e:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise ProfileError(f"hardware profile {p} is not valid {'TOML' if p.suffix.lower() == '.toml' else 'JSON'} ({e})") from None
    prof = _parse(d, str(p), p.stem)
    prof.path = str(p)
    return prof


@dataclass
class EnergyReport:
    """Energy per inference (mJ) in total, per op kind and per layer, with the ops left uncosted (explicit 0)."""

    profile: Profile
    total_mj: float
    by_op_mj: dict[str, float]
    layers: list[dict]  # {"name", "kind", "energy_mj", "by_op_mj"}
    not_costed: dict[str, str] = field(default_factory=dict)  # op -> reason, for ops used with an explicit 0 cost

    def to_dict(self) -> dict:
        return {"hardware": self.profile.name, "citation": self.profile.citation, "energy_mj": self.total_mj,
                "energy_by_op_mj": self.by_op_mj, "not_costed": self.not_costed}


def estimate_energy(report: OpsReport, profile: Profile) -> EnergyReport:
    counts = report.counts()
    used = {op: n for op, n in counts.items() if n > 0}
    for op, n in used.items():  # every op the model performs must have a cost: raise before computing anything
        profile.cost(op, n)
    by_op = {op: n * profile.ops[op].pj * PJ_TO_MJ for op, n in used.items()}
    layers = []
    for l in report.layers:
        lb = {op: l.count(op) * profile.ops[op].pj * PJ_TO_MJ for op in used if l.count(op)}
        layers.append({"name": l.name, "kind": l.kind, "energy_mj": sum(lb.values()), "by_op_mj": lb})
    not_costed = {op: profile.ops[op].source for op in used if profile.ops[op].pj == 0}
    return EnergyReport(profile, sum(by_op.values()), by_op, layers, not_costed)
