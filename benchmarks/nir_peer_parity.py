"""Independent-reader parity: our NIR export imported by snntorch 1.0.0 (`snntorch.import_nir.import_from_nir`).

1. A spike-driven (SDSA) sdt-tiny model: a complete standard NIR graph (Conv2d + LIF only, the AND gates are LIFs
   with tau = 1*dt). snntorch runs it; every LIF layer's spikes are compared with our torch model.
1b. A token-pruned SDSA sdt-tiny (STATA, keep 0.5) whose static masks have a FIXED schedule (the same tokens at
   every timestep, `calibrate_masks(..., schedule="fixed")` / `stata-deploy calibrate RUN --schedule fixed`): token
   rows of Conv1d nodes (re-ordering, anchor, crop at the pruning site), entirely structural, so snntorch must
   reproduce it exactly without our metadata.
2. The `--split` segments with one input (the image) of spikformer-tiny (SSA) and a2os2a-tiny (A²OS²A): the SPS
   stem and block 0's Q/K/V, standard graphs replayed by snntorch the same way (one output port at a time: nirtorch
   2.6 loops forever on graphs with several Output nodes; segments with several Input nodes are not importable
   either). For A²OS²A, block 0's ReLU K and ternary V neurons are host operations: our reader's host-op table
   computes them from snntorch's port values, and they are compared with torch's K and V too.
Ties: snntorch fires at v > threshold, SpikingJelly/our torch model at v >= threshold; the exporter writes the
float32 below each threshold, which makes the two rules agree. Each case is also compared with our own reader run
with the strict rule (v > th on the written threshold): zero mismatches there means any torch mismatch is a tie.
Recorded peer spikes are put in torch's slot layout by our reader's rule (graph token order -> ascending
positions, kept tokens only).

Usage: python benchmarks/nir_peer_parity.py [--samples 300] [--run RUN] [--pruned-run RUN]
  --run RUN: part 1 on a trained run (e.g. `stata-deploy train --model sdt-tiny --out RUN`; its RUN/masks.json is
  used when present) instead of an untrained lively sdt-tiny.
  --pruned-run RUN: part 1b on a trained pruned run calibrated with `stata-deploy calibrate RUN --schedule fixed`
  (its RUN/masks.json) instead of a lively sdt-tiny with fixed-schedule masks calibrated on 64 training images.
Install snntorch without torch: pip install --no-deps snntorch==1.0.0 nirtorch==2.6
Last line: key=value headline (sdsa_*: part 1, pruned_*: part 1b, stem_segment_* (SSA), a2os2a_segment_*: part 2).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _nir_models import lively_model, root_flips, spike_mismatches  # noqa: E402


def snntorch_run(path: str, x: np.ndarray, T: int, layers: list[str]) -> tuple[dict, np.ndarray]:
    """Import with snntorch, run T steps (direct encoding), record every LIF node's spikes by node name."""
    import nir
    from snntorch import utils as su
    from snntorch.import_nir import import_from_nir

    g = nir.read(path)
    with contextlib.redirect_stdout(io.StringIO()):  # snntorch prints its weight-scaling warnings per LIF
        net = import_from_nir(g)
    names = {k.replace(".", "_"): k for k in g.nodes}
    rec: dict[str, list] = {}
    for n, mod in net.named_modules():
        if n in names and names[n] in layers:
            mod.register_forward_hook(lambda mod, i, o, n=n: rec.setdefault(names[n], []).append(
                (o[0] if isinstance(o, tuple) else o).detach().numpy().copy()))
    su.reset(net)
    outs = []
    xt = torch.as_tensor(x)
    with torch.no_grad():
        state = None
        for _ in range(T):
            o = net(xt, state)
            if isinstance(o, tuple):
                o, state = o
            outs.append(o)
    spikes = {}
    for k, v in rec.items():
        a = np.stack(v)  # (T, B, D, h, w)
        spikes[k] = a
    return spikes, outs


def single_output(src: str, port: str, dst: str) -> None:
    """Write the part of graph ``src`` that feeds output ``port`` as its own file (nirtorch 2.6, which snntorch
    uses, loops forever on graphs with several Output nodes, so a peer reads one port at a time)."""
    import nir

    g = nir.read(src)
    preds: dict[str, list] = {}
    for a, b in g.edges:
        preds.setdefault(b, []).append(a)
    keep, stack = set(), [port]
    while stack:
        n = stack.pop()
        if n not in keep:
            keep.add(n)
            stack += preds.get(n, [])
    nodes = {k: v for k, v in g.nodes.items() if k in keep}
    edges = [(a, b) for a, b in g.edges if a in keep and b in keep]
    nir.write(dst, nir.NIRGraph(nodes=nodes, edges=edges, metadata=g.metadata))


def to_torch_layout(name: str, a: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """A (T, B, D, g, g) map / (T, B, D, 1, 1) recording in torch's (T, B, N, D) layout (graphs without a token
    row; rows need the graph's token order: ``graph_to_torch``)."""
    if ref.ndim == 4:  # (T, B, N, D) tokens vs (T, B, D, g, g) map or (T, B, D, 1, 1)
        return a.reshape(a.shape[0], a.shape[1], a.shape[2], -1).transpose(0, 1, 3, 2)
    return a


def graph_to_torch(G, recs: dict) -> dict:
    """Peer recordings by torch layer name -> torch's slot layout, by our reader's rule (token order, kept tokens)."""
    from runtimes.nir_graph import _to_torch_layout

    lay = {o.layer: (o.layout, o.tokens) for o in G.ops.values() if o.layer}
    return {k: _to_torch_layout(G, *lay[k], v) for k, v in recs.items()}


def flip_margins(model, masks, x, ref: dict, got: dict) -> float | None:
    """max |H - V_th| over the root flips (in the first mismatching layer of each sample, each neuron's first
    mismatching timestep), H = torch's membrane
    recomputed in float64 from the float32 input torch fed that LIF layer (None: no flip, or a per-timestep schedule,
    whose token state this recomputation does not follow). A margin of ~1e-7 is float32 rounding of the
    pre-activation at the threshold (BatchNorm folded into the weights rounds differently from torch's conv + BN),
    not a different network."""
    from stata_deploy.inference import run_torch

    if masks is not None and any((m != m[:1]).any() for m in masks.sites.values()):
        return None
    names = list(ref)
    B = next(iter(ref.values())).shape[1]
    pos = []
    for b in range(B):
        for k in names:
            if k not in got:
                break
            d = np.argwhere(got[k][:, b] != ref[k][:, b])
            if len(d):  # each neuron's first mismatching timestep (later ones follow from its state)
                first: dict = {}
                for row in d:
                    first.setdefault(tuple(int(v) for v in row[1:]), int(row[0]))
                pos += [(k, b, (t, *rest)) for rest, t in first.items()]
                break
    if not pos:
        return None
    samples = sorted({b for _, b, _ in pos})
    mods = dict(model.named_modules())
    cap: dict = {}
    hooks = [mods[k].register_forward_hook(lambda m, i, o, k=k: cap.__setitem__(k, i[0].detach().double().numpy()))
             for k in {k for k, _, _ in pos}]
    try:
        run_torch(model, torch.as_tensor(x[samples]), masks)
    finally:
        for h in hooks:
            h.remove()
    margins = []
    for k, b, (t, *rest) in pos:
        X = cap[k][:, samples.index(b)]
        mod = mods[k]
        th, tau, vr = float(mod.v_th), float(mod.tau), float(mod.v_reset)
        V = np.full(X.shape[1:], vr)
        for tt in range(t + 1):
            H = V + (X[tt] - (V - vr)) / tau
            V = np.where(H >= th, vr, H)
        margins.append(abs(float(H[tuple(rest)]) - th))
    return max(margins)


def complete_graph_parity(model, masks, x, chunk: int, path: str, label: str) -> dict:
    """Export (model, masks) to ``path``, replay it in snntorch and compare every LIF layer with torch."""
    from exporters.nir_exporter import NirExporter
    from runtimes.nir_graph import execute, read_graph
    from stata_deploy.inference import run_torch

    summ = NirExporter().export(model, masks, Path(path))
    G = read_graph(path)
    ref_sp, peer_sp, strict_sp = {}, {}, {}
    agree: list = []
    t0 = time.perf_counter()
    for i in range(0, len(x), chunk):
        xb = x[i:i + chunk]
        ref_res = run_torch(model, torch.as_tensor(xb), masks)
        ref = ref_res.spikes
        peer, peer_out = snntorch_run(path, xb, model.cfg.T, list(ref))
        peer = graph_to_torch(G, peer)
        peer_pred = torch.stack(peer_out).mean(0).reshape(len(xb), -1).argmax(-1).numpy()
        agree.append(peer_pred == ref_res.predictions)
        strict = execute(G, xb, strict_ties=True).spikes
        for k in ref:
            ref_sp.setdefault(k, []).append(ref[k])
            if k in peer:
                peer_sp.setdefault(k, []).append(peer[k])
            strict_sp.setdefault(k, []).append(strict[k])
    cat = lambda d: {k: np.concatenate(v, 1) for k, v in d.items()}  # noqa: E731
    ref_sp, peer_sp, strict_sp = cat(ref_sp), cat(peer_sp), cat(strict_sp)
    per, tot, n = spike_mismatches(ref_sp, peer_sp)
    _, tot_strict, _ = spike_mismatches(strict_sp, peer_sp)
    roots = root_flips(ref_sp, peer_sp)
    margin = flip_margins(model, masks, x, ref_sp, peer_sp) if roots else None
    fired = int(sum(np.abs(v).sum() for v in ref_sp.values()))
    print(f"[{label}] {len(x)} inputs, {time.perf_counter() - t0:.1f}s; nodes {summ['nodes']}; "
          f"exact without metadata: {summ['exact_without_metadata']}")
    if not summ["exact_without_metadata"]:
        print("  NOTE: the masks vary per timestep; snntorch (a metadata-blind reader) computes the union of kept "
              "tokens at every timestep, so mismatches are expected")
    for k, v in per.items():
        print(f"  {k:28s} {v:8d} / {ref_sp[k].size}")
    print(f"  snntorch vs torch: {tot} of {n} spike slots differ ({fired} spikes fired; {roots} flips start a "
          "divergence, the rest propagate)")
    if margin is not None:
        print(f"  the root flips are at |H - V_th| <= {margin:.2e} in torch (float32 rounding at the threshold)")
    print(f"  snntorch vs our reader with the strict tie rule (v > th): {tot_strict} differ")
    agreement = float(np.concatenate(agree).mean())
    print(f"  prediction agreement snntorch vs torch: {agreement:.4f}")
    return dict(mismatches=tot, spikes=n, fired=fired, root_flips=roots, mismatches_strict_reader=tot_strict,
                agreement=agreement, layers=len(per), exact_without_metadata=summ["exact_without_metadata"],
                root_flip_max_margin=None if margin is None else float(f"{margin:.3g}"))


def one_input_segments_parity(preset: str, x, xcal, chunk: int, tmp: Path) -> dict:
    """Every ``--split`` segment of a lively ``preset`` with one input port (snntorch imports only those), replayed by
    snntorch one output port at a time; each LIF layer compared with torch, and the host operations that read only
    this segment's ports (A2OS2A's ReLU K and ternary V neurons) computed by our reader's host-op table from
    snntorch's port values and compared with torch's K and V."""
    from exporters.nir_exporter import NirExporter
    from runtimes.nir_graph import HOST_KINDS, _State, read_graph, simulate
    from stata_deploy.inference import run_torch

    model, _ = lively_model(preset, x_cal=xcal)
    T = model.cfg.T
    stem = tmp / f"{preset}.nir"
    files = NirExporter().export(model, None, stem, split=True)["files"][1:]
    host_ops = read_graph(stem).host_ops
    ref_sp, peer_sp, strict_sp = {}, {}, {}
    used = []
    for f in files:
        Gs = read_graph(f)
        if [o.name for o in Gs.ops.values() if o.kind == "input"] != ["input"]:
            continue  # several input ports (a host result, a segment input): snntorch cannot import it
        used.append(Path(f).name)
        outs = [o.name for o in Gs.ops.values() if o.kind == "output"]
        singles = {}
        for port in outs:
            singles[port] = str(tmp / f"{Path(f).stem}.{port}.nir")
            single_output(f, port, singles[port])
        layers = [o.layer for o in Gs.ops.values() if o.layer]
        for i in range(0, len(x), chunk):
            xb = x[i:i + chunk]
            ref = run_torch(model, torch.as_tensor(xb)).spikes
            peer, ports = {}, {}
            for port, pth in singles.items():
                sp, o = snntorch_run(pth, xb, T, layers)
                peer.update(sp)
                ports[port] = np.stack([v.numpy() for v in o]).astype(np.float64)
            st, hv = _State(), {}
            for t in range(T):  # our host-op table on snntorch's port values
                vals = {p: v[t] for p, v in ports.items()}
                for h in host_ops:  # those whose inputs this segment (or earlier host ops) provides
                    ins = [vals.get(n, vals.get(f"host:{n}")) for n in h.inputs]
                    if any(a is None for a in ins):
                        continue
                    vals[f"host:{h.name}"] = HOST_KINDS[h.kind][2](h, st, None, *ins)
                    if h.layer:
                        hv.setdefault(h.layer, []).append(vals[f"host:{h.name}"])
            peer.update({k: np.stack(v) for k, v in hv.items()})
            _, recs = simulate(Gs, {"input": np.broadcast_to(xb, (T, *xb.shape))}, True, True)
            for k in list(layers) + list(hv):
                ref_sp.setdefault(k, []).append(ref[k])
                peer_sp.setdefault(k, []).append(to_torch_layout(k, peer[k], ref[k]))
                if k in recs:
                    strict_sp.setdefault(k, []).append(to_torch_layout(k, np.stack(recs[k]), ref[k]))
    cat = lambda d: {k: np.concatenate(v, 1) for k, v in d.items()}  # noqa: E731
    ref_sp, peer_sp, strict_sp = cat(ref_sp), cat(peer_sp), cat(strict_sp)
    per, tot, n = spike_mismatches(ref_sp, peer_sp)
    _, tots, _ = spike_mismatches(strict_sp, {k: peer_sp[k] for k in strict_sp})
    print(f"[{preset} --split segments with one input: {', '.join(used)}] {len(x)} inputs")
    for k, v in per.items():
        print(f"  {k:28s} {v:8d} / {ref_sp[k].size} ({int((ref_sp[k] != 0).sum())} nonzero)"
              + ("  (host op on snntorch's ports)" if k not in strict_sp else ""))
    print(f"  snntorch vs torch: {tot} of {n} differ; vs our strict-tie reader: {tots}")
    return dict(mismatches=tot, spikes=n, mismatches_strict_reader=tots, segments=len(used))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--run", default=None, help="a trained run folder for part 1 (default: a lively sdt-tiny)")
    ap.add_argument("--pruned-run", default=None,
                    help="a trained pruned run with fixed-schedule RUN/masks.json for part 1b (default: a lively "
                         "sdt-tiny, STATA keep 0.5, masks calibrated with schedule='fixed')")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        import snntorch  # noqa: F401
        import nirtorch  # noqa: F401
    except ImportError as e:
        sys.exit(f"snntorch is not installed ({e}); pip install --no-deps snntorch==1.0.0 nirtorch==2.6")
    from exporters.nir_exporter import NirExporter
    from stata_deploy.train.checkpoint import load_model
    from stata_deploy.train.data import load_dataset
    from stata_deploy.inference import run_torch
    from stata_deploy.pruning.masks import TokenMasks
    from stata_deploy.pruning.calibration import calibrate_masks

    ds = load_dataset("digits")
    xcal = ds.x_train[:64]
    x = ds.x_test[: args.samples]
    head = {}
    tmp = Path(tempfile.mkdtemp())

    def from_run(run):
        model, _ = load_model(run)
        masks = TokenMasks.load(Path(run) / "masks.json") if (Path(run) / "masks.json").is_file() else None
        return model, masks

    # ---------------- 1. SDSA, complete graph
    if args.run:
        model, masks = from_run(args.run)
    else:
        (model, _), masks = lively_model("sdt-tiny", x_cal=xcal), None
    r = complete_graph_parity(model, masks, x, args.chunk, str(tmp / "sdt.nir"),
                              f"{args.run or 'lively sdt-tiny'}: SDSA, complete standard graph"
                              + (f", masks {masks.meta.get('schedule', '?')}" if masks is not None else ""))
    head.update({f"sdsa_{k}": r[k] for k in ("mismatches", "spikes", "root_flips", "root_flip_max_margin",
                                              "mismatches_strict_reader", "agreement")})
    # ---------------- 1b. SDSA, token-pruned, fixed schedule
    if args.pruned_run:
        model, masks = from_run(args.pruned_run)
        if masks is None:
            sys.exit(f"{args.pruned_run} has no masks.json: run `stata-deploy calibrate {args.pruned_run} "
                     "--schedule fixed` first")
    else:
        model, _ = lively_model("sdt-tiny", "stata", 0.5, x_cal=xcal)
        masks = calibrate_masks(model, [torch.as_tensor(xcal)], schedule="fixed")
    kept = {s: masks.kept(s) for s in sorted(masks.sites)}
    r = complete_graph_parity(model, masks, x, args.chunk, str(tmp / "sdt-pruned.nir"),
                              f"{args.pruned_run or 'lively sdt-tiny STATA 0.5'}: SDSA, token-pruned, masks "
                              f"{masks.meta.get('schedule', '?')}, kept {kept} of {masks.n_full}")
    head.update({f"pruned_{k}": r[k] for k in ("mismatches", "spikes", "root_flips", "root_flip_max_margin",
                                                "mismatches_strict_reader", "agreement", "exact_without_metadata")})
    head["pruned_kept"] = "/".join(f"{v}of{masks.n_full}" for v in kept.values())
    # ---------------- 2. SSA and A2OS2A: the --split segments with one input (the stem + block 0's Q, K, V)
    for preset, tag in (("spikformer-tiny", "stem_segment"), ("a2os2a-tiny", "a2os2a_segment")):
        r = one_input_segments_parity(preset, x, xcal, args.chunk, tmp)
        head.update({f"{tag}_{k}": v for k, v in r.items()})
    print(" ".join(f"{k}={v}" for k, v in {"peer": "snntorch-1.0.0", "samples": len(x), **head}.items()))


if __name__ == "__main__":
    main()
