"""``stata-deploy inspect MODEL.nir``: what an exported NIR file contains and what a standard reader computes."""
from __future__ import annotations

from pathlib import Path

import click

from .main import emit, main
from ..errors import StataError
from ..registry import RUNTIMES


@main.command("inspect")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(model_file, as_json):
    """Summarise an exported .nir file: node counts, neurons, synapses, token masks, ports, host operations
    (what is not standard NIR) and what a reader that ignores our metadata computes.

    \b
    Examples:
      stata-deploy inspect runs/a/model.nir
      stata-deploy inspect runs/a/model.nir --json
    """
    p = Path(model_file)
    if p.suffix != ".nir":
        raise StataError(f"inspect reads .nir files; got {p.name}")
    rt = RUNTIMES.get("nir")
    info = rt.inspect(p)
    emit(info, as_json, _human(info))


def _human(d: dict) -> str:
    lines = [f"{d['path']}: standard NIR 1.0 node types; T={d['T']}, dt={d['dt']}",
             "nodes:    " + ", ".join(f"{k} {v}" for k, v in sorted(d["nodes"].items())),
             f"neurons:  {d['neurons']} LIF (+ {d['gate_neurons']} memoryless gate neurons, "
             f"{d['host_neurons']} in host operations)",
             f"synapses: {d['synapses']} (nonzero weights x positions; "
             + ", ".join(f"{k} {v}" for k, v in sorted(d["synapses_by_role"].items())) + ")",
             "inputs:   " + ", ".join(f"{p['name']} {tuple(p['shape'])} [{p['role']}]" for p in d["inputs"]),
             "outputs:  " + ", ".join(f"{p['name']} {tuple(p['shape'])} [{p['role']}]" for p in d["outputs"])]
    m = d.get("masks")
    if m:
        lines.append(f"masks:    mode {m['mode']}, {m['n_full']} tokens, T={m['T']}")
        for sid, s in m["segments"].items():
            lines.append(f"  site {s['site']}: {s['tokens_in_graph']} tokens in the graph, kept per timestep "
                         f"{s['kept_per_timestep']}{' (schedule varies over time)' if s['time_varying'] else ''}")
    else:
        lines.append("masks:    none")
    if d["host_ops"]:
        lines.append("not standard (host operations between ports, described in metadata):")
        lines += [f"  {h['name']} ({h['kind']}): {', '.join(h['inputs'])} -> {h['output']}" for h in d["host_ops"]]
    for ns in d.get("not_standard", []):
        if not any(ns.startswith(h["name"]) for h in d["host_ops"]):
            lines.append(f"not standard: {ns}")
    lines.append(f"a reader that ignores metadata: {d['standard_reader_computes']}")
    lines.append(f"nir.write(nir.read(f)) lossless: {'yes' if d['lossless_rewrite'] else 'NO'}")
    return "\n".join(lines)
