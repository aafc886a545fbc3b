"""Other NIR readers on our exports: norse 1.1.0 and SpikingJelly 2.0.0 (snntorch 1.0.0: nir_peer_parity.py).

For each exported file (an unpruned trained sdt-tiny: the (D, g, g) token map; a STATA-pruned sdt-tiny with a FIXED
mask schedule: token rows of Conv1d, anchor, crop at the site; both complete standard NIR graphs, exact without
metadata) and each reader: imported or not (the exact error), the output shape per sample, mismatches vs torch at
the final output (logits per timestep, |d| > 1e-4) and prediction agreement, and spike mismatches at every LIF node:
against torch's own spikes for the 19 neuron layers (put in graph layout by inverting our reader's layout rule), and
against our reader's recording for the memoryless AND gates (no torch tensor; the export step also counts our
reader vs torch). Readers:

  norse           ``norse.torch.from_nir(graph, dt=1e-4)`` as shipped (it builds on the deprecated
                  ``nirtorch.load`` / ``GraphExecutor``)
  norse-modules   norse's own node mapping (``norse.torch.utils.import_nir._import_norse_module``, dt=1e-4) run
                  by nirtorch 2.6's maintained interpreter ``nirtorch.nir_to_torch`` (its default map for node types
                  norse does not map): norse's neuron/layer semantics without its graph executor
  spikingjelly    ``spikingjelly.activation_based.nir_exchange.import_from_nir(graph, dt=1e-4)`` as shipped, the
                  returned state passed back at every step (its documented stepping contract)
  spikingjelly-gate1.001
                  the same on a MODIFIED copy of the file whose memoryless gates (nir.LIF with tau = dt) have
                  tau = 1.001 dt (SpikingJelly refuses tau/dt <= 1); for integer inputs (0, 1, 2) and thresholds
                  1.5 / 0.5 the carried memory (<= 0.001 of the last value) cannot change a decision, so this
                  measures everything else SpikingJelly reads
  spikingjelly-gate1.001-nostate
                  the same without passing the returned state back (every step restarts from the initial state):
                  what a caller that ignores import_from_nir's stepping contract computes

Two steps, two Python environments (the peers are installed in a separate venv, never into the project's):
  1. export (the project's venv, from the worktree):
       PYTHONPATH=. .venv/bin/python benchmarks/nir_other_readers.py export --out DIR \\
           [--run RUN] [--pruned-run RUN] [--samples 300]
     writes DIR/<case>.nir, DIR/<case>.npz (inputs, torch logits and predictions, our reader's spikes per LIF node
     in graph layout) and DIR/cases.json. --run: an unpruned trained run (default: a lively sdt-tiny); --pruned-run:
     a pruned run with fixed-schedule RUN/masks.json (`stata-deploy calibrate RUN --schedule fixed`; default: a
     lively sdt-tiny STATA keep 0.5 with fixed masks).
  2. replay (the peers' venv; needs only nir, numpy, torch, norse, spikingjelly, nirtorch):
       /tmp/peers/bin/python benchmarks/nir_other_readers.py replay DIR
Install of the peers: python3.11 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0 &&
  /tmp/peers/bin/pip install --no-deps norse==1.1.0 spikingjelly==2.0.0 nir==1.0.8 nirtorch==2.6 &&
  /tmp/peers/bin/pip install numpy==1.26.4 h5py loguru tqdm
Last line (replay): key=value headline.
"""
from __future__ import annotations

import argparse
import dataclasses
import contextlib
import io
import json
import logging
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

GATE_SLACK = 1.001  # tau / dt of the rewritten gates for SpikingJelly


# ============================================================================================ 1. export (project venv)
def export(args) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _nir_models import lively_model
    from exporters.nir_exporter import NirExporter
    from runtimes.nir_graph import execute, read_graph, simulate
    from stata_deploy.train.checkpoint import load_model
    from stata_deploy.train.data import load_dataset
    from stata_deploy.inference import run_torch
    from stata_deploy.pruning.masks import TokenMasks
    from stata_deploy.pruning.calibration import calibrate_masks

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("digits")
    xcal, x = ds.x_train[:64], ds.x_test[: args.samples]

    def from_run(run):
        model, _ = load_model(run)
        mp = Path(run) / "masks.json"
        return model, (TokenMasks.load(mp) if mp.is_file() else None)

    cases = []
    if args.run:
        model, masks = from_run(args.run)
    else:
        (model, _), masks = lively_model("sdt-tiny", x_cal=xcal), None
    cases.append(("unpruned", args.run or "lively sdt-tiny", model, masks))
    if args.pruned_run:
        model, masks = from_run(args.pruned_run)
        if masks is None:
            sys.exit(f"{args.pruned_run} has no masks.json (stata-deploy calibrate RUN --schedule fixed)")
    else:
        model, _ = lively_model("sdt-tiny", "stata", 0.5, x_cal=xcal)
        masks = calibrate_masks(model, [torch.as_tensor(xcal)], schedule="fixed")
    cases.append(("pruned", args.pruned_run or "lively sdt-tiny STATA 0.5", model, masks))
    meta = []
    for name, src, model, masks in cases:
        path = out / f"{name}.nir"
        summ = NirExporter().export(model, masks, path)
        G = read_graph(path)
        lif_nodes = [n for n, o in G.ops.items() if o.kind == "lif"]
        inv = _graph_slots(G, lif_nodes)
        G_all = read_graph(path)  # records every LIF node, the gates too (they carry no torch layer name)
        G_all = dataclasses.replace(G_all, ops={k: dataclasses.replace(o, layer=o.layer or k) if k in lif_nodes else o
                                                for k, o in G_all.ops.items()})
        logits, preds, recs, mism = [], [], {n: [] for n in lif_nodes}, 0
        trecs: dict = {n: [] for n in inv}
        for i in range(0, len(x), args.chunk):
            xb = x[i:i + args.chunk]
            ref = run_torch(model, torch.as_tensor(xb), masks)
            logits.append(ref.logits_t)
            preds.append(ref.predictions)
            res = execute(G, xb)
            mism += sum(int((res.spikes[k] != v).sum()) for k, v in ref.spikes.items())
            for n, idx in inv.items():  # torch's spikes of layer n in graph layout (T, B, *shape)
                a = ref.spikes[G.ops[n].layer]
                g = np.zeros((a.shape[0], a.shape[1], int(np.prod(G.ops[n].shape))), dtype=bool)
                for t in range(a.shape[0]):
                    g[t][:, idx[t]] = a[t].reshape(a.shape[1], -1)
                trecs[n].append(g.reshape(a.shape[0], a.shape[1], *G.ops[n].shape))
            _, r = simulate(G_all, {G.input: np.broadcast_to(xb, (G.T, *xb.shape))}, record=True)
            for n in lif_nodes:  # every LIF node (layers and gates), graph layout (T, B, *shape)
                if n not in r:
                    continue
                recs[n].append(np.stack(r[n]).astype(bool))
        spikes = {f"lif:{n}": np.concatenate(v, 1) for n, v in recs.items() if v}
        spikes.update({f"torch:{n}": np.concatenate(v, 1) for n, v in trecs.items()})
        np.savez_compressed(out / f"{name}.npz", x=x, logits_t=np.concatenate(logits, 1),
                            predictions=np.concatenate(preds), **spikes)
        sched = None if masks is None else masks.meta.get("schedule")
        meta.append(dict(case=name, source=src, file=path.name, T=G.T, classes=int(model.cfg.num_classes),
                         masks=None if masks is None else {str(s): masks.kept(s) for s in masks.sites},
                         schedule=sched, n_full=model.cfg.num_tokens, nodes=summ["nodes"],
                         exact_without_metadata=summ["exact_without_metadata"], reader_vs_torch_mismatches=mism,
                         lif_nodes=lif_nodes))
        print(f"{name}: {path} ({src}); nodes {summ['nodes']}; our reader vs torch: {mism} spike mismatches")
    (out / "cases.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {out}/cases.json; now: /tmp/peers/bin/python {Path(__file__).name} replay {out}")


def _graph_slots(G, lif_nodes) -> dict:
    """Per LIF node with a torch layer: idx (T, slots) with torch slot j at timestep t = graph element idx[t, j]
    (our reader's layout rule applied to element numbers); only where that map is a bijection (no per-timestep
    schedule), so torch's spikes can be put in graph layout."""
    from runtimes.nir_graph import _to_torch_layout

    out = {}
    for n in lif_nodes:
        op = G.ops[n]
        if not op.layer:
            continue
        size = int(np.prod(op.shape))
        el = np.broadcast_to(np.arange(size, dtype=np.float64).reshape(op.shape), (G.T, 1, *op.shape))
        idx = _to_torch_layout(G, op.layout, op.tokens, el).reshape(G.T, -1).astype(np.int64)
        if all(len(np.unique(r)) == size == len(r) for r in idx):
            out[n] = idx
    return out


# ============================================================================================ 2. replay (peers venv)
def _sanitize(name: str) -> str:
    return name.replace(".", "_")


def _rewrite_gates(src: Path, dst: Path) -> int:
    """Copy of the file with every LIF whose tau == dt given tau = GATE_SLACK * dt; returns how many."""
    import nir

    g = nir.read(str(src))
    n = 0
    for node in g.nodes.values():
        if isinstance(node, nir.LIF) and np.allclose(node.tau, 1e-4):
            node.tau = np.full_like(node.tau, GATE_SLACK * 1e-4)
            n += 1
    nir.write(str(dst), g)
    return n


def _import(reader: str, path: Path):
    """(module, notes) for one reader; raises whatever the reader raises."""
    import nir

    g = nir.read(str(path))
    notes = {}
    if reader == "norse":
        import norse.torch

        net = norse.torch.from_nir(g, dt=1e-4)
        order = [n.name for n in net.execution_order]
        pos = {n: i for i, n in enumerate(order)}
        late = [(a, b) for a, b in g.edges if _sanitize(a) in pos and _sanitize(b) in pos
                and pos[_sanitize(a)] > pos[_sanitize(b)]]
        skipped = [n.name for n in net.execution_order if n.elem is None]
        ret = net.execution_order[-1]
        notes = dict(executor="nirtorch.load GraphExecutor (deprecated): depth-first order from the input",
                     returns_node=(ret.name if ret.elem is not None else net.execution_order[-2].name),
                     edges=len(g.edges), edges_read_before_written=len(late), example_late_edges=late[:3],
                     unmapped_nodes_skipped=[n for n in skipped if n not in ("input", "logits")])
        return net, notes
    if reader == "norse-modules":
        import nirtorch
        from norse.torch.utils.import_nir import _import_norse_module

        types = (nir.Affine, nir.Conv2d, nir.Flatten, nir.Linear, nir.IF, nir.CubaLIF, nir.LIF, nir.SumPool2d)
        node_map = {t: (lambda n: _import_norse_module(n, dt=1e-4)) for t in types}
        return nirtorch.nir_to_torch(g, node_map), notes
    if reader.startswith("spikingjelly"):
        from spikingjelly.activation_based.nir_exchange import import_from_nir

        return import_from_nir(g, dt=1e-4), notes
    raise ValueError(reader)


def _run(net, reader: str, x: np.ndarray, T: int, lif_nodes: list[str]):
    """T steps (direct encoding), state passed back; (outputs (T, B, ...), {lif node: (T, B, ...)}, norse cache)."""
    import torch

    names = {_sanitize(n): n for n in lif_nodes}
    rec: dict = {}
    hooks = []
    for n, mod in net.named_modules():
        if n in names:
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=n: rec.setdefault(names[n], []).append(
                (o[0] if isinstance(o, tuple) else o).detach().float().numpy().copy())))
    outs, head = [], []
    with torch.no_grad():
        state = None
        for _ in range(T):
            o = net(torch.as_tensor(x, dtype=torch.float32), state)
            if isinstance(o, tuple):
                o, state = o
            if reader.endswith("-nostate"):
                state = None  # the state returned is dropped: every step restarts from the initial state
            outs.append(o.detach().float().numpy().copy())
            cache = getattr(state, "cache", None)
            if isinstance(cache, dict) and "head" in cache:  # norse's GraphExecutor: the head node's value
                head.append(cache["head"].detach().float().numpy().copy())
    for h in hooks:
        h.remove()
    return np.stack(outs), {k: np.stack(v) for k, v in rec.items()}, (np.stack(head) if head else None)


def _compare(case: dict, ref, outs, rec, head) -> dict:
    B = outs.shape[1]
    C = case["classes"]
    per_sample = int(np.prod(outs.shape[2:]))
    r = dict(output_shape=list(outs.shape[2:]), outputs_per_sample=per_sample)
    logits = outs.reshape(outs.shape[0], B, -1) if per_sample == C else None
    if logits is None and head is not None and int(np.prod(head.shape[2:])) == C:
        r["note"] = "output is not the logits port; the head node's value (from the executor's cache) is compared"
        logits = head.reshape(head.shape[0], B, -1)
    if logits is not None:
        d = np.abs(logits - ref["logits_t"])
        r.update(logit_mismatches=int((d > 1e-4).sum()), logit_values=int(d.size), max_abs_dlogit=float(d.max()),
                 agreement=float((logits.mean(0).argmax(-1) == ref["predictions"]).mean()))
    mism, total, first = 0, 0, None
    g_mism, g_total, n_torch = 0, 0, 0
    per_node = {}
    for n in case["lif_nodes"]:
        vs_torch = f"torch:{n}" in ref  # a layer: torch's own spikes; a gate: our reader's (no torch tensor)
        want = ref.get(f"torch:{n}", ref.get(f"lif:{n}"))
        got = rec.get(n)
        if want is None:
            continue
        if got is None or got.shape != want.shape:
            per_node[n] = f"not recorded ({None if got is None else got.shape} vs {want.shape})"
            k = want.size
        else:
            k = int(((got > 0.5) != want).sum())
            per_node[n] = k
            if k and first is None:
                first = n
        if vs_torch:
            mism, total, n_torch = mism + k, total + want.size, n_torch + 1
        else:
            g_mism, g_total = g_mism + k, g_total + want.size
    r.update(spike_mismatches=mism, spike_slots=total, gate_mismatches=g_mism, gate_slots=g_total,
             first_mismatching_node=first, nodes_vs_torch=n_torch,
             nodes_recorded=sum(isinstance(v, int) for v in per_node.values()), nodes=len(per_node))
    r["per_node"] = per_node
    return r


def replay(args) -> None:
    import torch

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    d = Path(args.dir)
    cases = json.loads((d / "cases.json").read_text())
    versions = {}
    for mod in ("torch", "nir", "nirtorch", "norse", "spikingjelly"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception as e:  # noqa: BLE001
            versions[mod] = f"missing ({e})"
    print("versions:", versions)
    readers = args.readers.split(",")
    head = {}
    for case in cases:
        ref = dict(np.load(d / f"{case['case']}.npz"))
        x = ref["x"][: args.samples]
        ref = {k: (v[:, : len(x)] if k.startswith("lif:") or k == "logits_t" else v[: len(x)])
               for k, v in ref.items() if k != "x"}
        print(f"\n=== {case['case']}: {case['source']} ({case['file']}; nodes {case['nodes']}; masks {case['masks']} "
              f"{case['schedule'] or ''}; exact without metadata: {case['exact_without_metadata']}; our reader vs "
              f"torch: {case['reader_vs_torch_mismatches']} spike mismatches) on {len(x)} inputs")
        for reader in readers:
            path = d / case["file"]
            notes = {}
            if reader.startswith("spikingjelly-gate1.001"):
                path = d / f"{case['case']}.gate1001.nir"
                notes["gates_rewritten"] = _rewrite_gates(d / case["file"], path)
            t0 = time.perf_counter()
            key = f"{case['case']}_{reader.replace('-', '_').replace('.', '')}"
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    net, more = _import(reader, path)
                notes.update(more)
            except Exception as e:  # noqa: BLE001 - the reader's own error is the measurement
                err = f"{type(e).__name__}: {e}"
                print(f"  [{reader}] NOT imported: {err}")
                print("    raised at: " + traceback.extract_tb(e.__traceback__)[-1].filename.split("site-packages/")[-1]
                      + f":{traceback.extract_tb(e.__traceback__)[-1].lineno}")
                head[f"{key}_imported"] = False
                continue
            try:
                outs, rec, hd = [], {}, []
                for i in range(0, len(x), args.chunk):
                    with contextlib.redirect_stdout(io.StringIO()):
                        o, r, h = _run(net, reader, x[i:i + args.chunk], case["T"], case["lif_nodes"])
                    outs.append(o)
                    hd.append(h)
                    for k, v in r.items():
                        rec.setdefault(k, []).append(v)
                outs = np.concatenate(outs, 1)
                rec = {k: np.concatenate(v, 1) for k, v in rec.items()}
                hd = None if any(h is None for h in hd) else np.concatenate(hd, 1)
            except Exception as e:  # noqa: BLE001
                err = f"{type(e).__name__}: {e}"
                print(f"  [{reader}] imported, but running failed: {err}")
                head[f"{key}_imported"] = True
                head[f"{key}_runs"] = False
                continue
            res = _compare(case, ref, outs, rec, hd)
            secs = time.perf_counter() - t0
            print(f"  [{reader}] imported; {secs:.1f}s; output per sample {res['output_shape']} "
                  f"({res['outputs_per_sample']} values, {case['classes']} classes)")
            for k, v in notes.items():
                print(f"    {k}: {v}")
            if "note" in res:
                print(f"    {res['note']}")
            if "agreement" in res:
                print(f"    logits vs torch: {res['logit_mismatches']} of {res['logit_values']} differ by > 1e-4 "
                      f"(max |d| {res['max_abs_dlogit']:.3g}); prediction agreement {res['agreement']:.4f}")
            else:
                print("    no logits: predictions cannot be compared")
            print(f"    spikes at {res['nodes_recorded']}/{res['nodes']} LIF nodes: {res['nodes_vs_torch']} layers vs torch "
                  f"{res['spike_mismatches']} of {res['spike_slots']} differ, gates vs our reader {res['gate_mismatches']} "
                  f"of {res['gate_slots']}; first mismatching node: {res['first_mismatching_node']}")
            if args.verbose:
                for n, v in res["per_node"].items():
                    print(f"      {n:32s} {v}")
            head[f"{key}_imported"] = True
            head[f"{key}_outputs"] = res["outputs_per_sample"]
            head[f"{key}_spike_mismatches"] = res["spike_mismatches"]
            head[f"{key}_gate_mismatches"] = res["gate_mismatches"]
            if "agreement" in res:
                head[f"{key}_agreement"] = res["agreement"]
    print()
    print(" ".join(f"{k}={v}" for k, v in {"samples": args.samples, **head}.items()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="export the files and torch references (project venv)")
    e.add_argument("--out", required=True)
    e.add_argument("--run", default=None)
    e.add_argument("--pruned-run", default=None)
    e.add_argument("--samples", type=int, default=300)
    e.add_argument("--chunk", type=int, default=50)
    r = sub.add_parser("replay", help="import and run the files with the other readers (peers venv)")
    r.add_argument("dir")
    r.add_argument("--samples", type=int, default=300)
    r.add_argument("--chunk", type=int, default=50)
    r.add_argument("--readers", default="norse,norse-modules,spikingjelly,spikingjelly-gate1.001,"
                                        "spikingjelly-gate1.001-nostate")
    r.add_argument("--verbose", action="store_true", help="per-node spike mismatches")
    args = ap.parse_args()
    export(args) if args.cmd == "export" else replay(args)


if __name__ == "__main__":
    main()
