"""Independent-reader parity: our NIR export imported by snntorch 1.0.0 (`snntorch.import_nir.import_from_nir`).

1. A spike-driven (SDSA) sdt-tiny model: a complete standard NIR graph (Conv2d + LIF only, the AND gates are LIFs
   with tau = 1*dt). snntorch runs it; every LIF layer's spikes are compared with our torch model.
2. The first `--split` segment of spikformer-tiny (SSA): the SPS stem and block 0's Q/K/V neurons, a standard
   graph with one image input, replayed by snntorch the same way (one output port at a time: nirtorch 2.6 loops
   forever on graphs with several Output nodes; segments with several Input nodes are not importable either).
Ties: snntorch fires at v > threshold, SpikingJelly/our torch model at v >= threshold. Binary spike sums hit the
threshold exactly (e.g. LIF_0.5 on an integer token sum), so each case is also compared with our own reader run with
the strict rule: zero mismatches there means the tie rule is the only difference.

Usage: python benchmarks/nir_peer_parity.py [--samples 300] [--run RUN]
  --run RUN: part 1 on a trained run (e.g. `stata-deploy train --model sdt-tiny --out RUN`; its RUN/masks.json is
  used when present) instead of an untrained lively sdt-tiny.
Install snntorch without torch: pip install --no-deps snntorch==1.0.0 nirtorch==2.6
Last line: key=value headline.
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
    if ref.ndim == 4:  # (T, B, N, D) tokens vs (T, B, D, g, g) map or (T, B, D, 1, 1)
        return a.reshape(a.shape[0], a.shape[1], a.shape[2], -1).transpose(0, 1, 3, 2)
    return a


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--chunk", type=int, default=50)
    ap.add_argument("--run", default=None, help="a trained run folder for part 1 (default: a lively sdt-tiny)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        import snntorch  # noqa: F401
        import nirtorch  # noqa: F401
    except ImportError as e:
        sys.exit(f"snntorch is not installed ({e}); pip install --no-deps snntorch==1.0.0 nirtorch==2.6")
    from exporters.nir_exporter import NirExporter
    from runtimes.nir_graph import execute, read_graph, simulate
    from stata_deploy.data import load_dataset
    from stata_deploy.inference import run_torch

    ds = load_dataset("digits")
    xcal = ds.x_train[:64]
    x = ds.x_test[: args.samples]
    head = {}
    tmp = Path(tempfile.mkdtemp())
    # ---------------- 1. SDSA, complete graph
    masks = None
    if args.run:
        from stata_deploy.checkpoint import load_model
        from stata_deploy.pruning import TokenMasks

        model, _ = load_model(args.run)
        if (Path(args.run) / "masks.json").is_file():
            masks = TokenMasks.load(Path(args.run) / "masks.json")
    else:
        model, _ = lively_model("sdt-tiny", x_cal=xcal)
    path = str(tmp / "sdt.nir")
    NirExporter().export(model, masks, Path(path))
    G = read_graph(path)
    ref_sp, peer_sp, strict_sp = {}, {}, {}
    agree: list = []
    t0 = time.perf_counter()
    for i in range(0, len(x), args.chunk):
        xb = x[i:i + args.chunk]
        ref_res = run_torch(model, torch.as_tensor(xb), masks)
        ref = ref_res.spikes
        peer, peer_out = snntorch_run(path, xb, model.cfg.T, list(ref))
        peer_pred = torch.stack(peer_out).mean(0).reshape(len(xb), -1).argmax(-1).numpy()
        agree.append(peer_pred == ref_res.predictions)
        strict = execute(G, xb, strict_ties=True).spikes
        for k in ref:
            ref_sp.setdefault(k, []).append(ref[k])
            peer_sp.setdefault(k, []).append(to_torch_layout(k, peer[k], ref[k]))
            strict_sp.setdefault(k, []).append(strict[k])
    cat = lambda d: {k: np.concatenate(v, 1) for k, v in d.items()}  # noqa: E731
    ref_sp, peer_sp, strict_sp = cat(ref_sp), cat(peer_sp), cat(strict_sp)
    per, tot, n = spike_mismatches(ref_sp, peer_sp)
    _, tot_strict, _ = spike_mismatches(strict_sp, peer_sp)
    roots = root_flips(ref_sp, peer_sp)
    print(f"[sdt-tiny, SDSA, complete standard graph] {len(x)} inputs, {time.perf_counter() - t0:.1f}s")
    for k, v in per.items():
        print(f"  {k:28s} {v:8d} / {ref_sp[k].size}")
    print(f"  snntorch vs torch: {tot} of {n} spikes differ ({roots} flips start a divergence; the rest propagate)")
    print(f"  snntorch vs our reader with the strict tie rule (v > th): {tot_strict} differ")
    agreement = float(np.concatenate(agree).mean())
    print(f"  prediction agreement snntorch vs torch: {agreement:.4f}")
    head.update(sdsa_mismatches=tot, sdsa_spikes=n, sdsa_root_flips=roots, sdsa_mismatches_strict_reader=tot_strict,
                sdsa_agreement=agreement)
    # ---------------- 2. SSA: the stem segment of --split
    model, _ = lively_model("spikformer-tiny", x_cal=xcal)
    path = str(tmp / "ssa.nir")
    NirExporter().export(model, None, Path(path), split=True)
    seg0 = str(tmp / "ssa.seg0.nir")
    Gs = read_graph(seg0)
    ref_sp, peer_sp, strict_sp = {}, {}, {}
    ports = {}
    for nm in ("q", "k", "v"):
        ports[nm] = str(tmp / f"ssa.seg0.{nm}.nir")
        single_output(seg0, f"blocks.0.attn.host.{nm}", ports[nm])
    for i in range(0, len(x), args.chunk):
        xb = x[i:i + args.chunk]
        ref = run_torch(model, torch.as_tensor(xb)).spikes
        layers = [o.layer for o in Gs.ops.values() if o.layer]
        peer = {}
        for nm, pth in ports.items():
            peer.update(snntorch_run(pth, xb, model.cfg.T, layers)[0])
        _, recs = simulate(Gs, {"input": np.broadcast_to(xb, (model.cfg.T, *xb.shape))}, True, True)
        for k in layers:
            ref_sp.setdefault(k, []).append(ref[k])
            peer_sp.setdefault(k, []).append(to_torch_layout(k, peer[k], ref[k]))
            strict_sp.setdefault(k, []).append(to_torch_layout(k, np.stack(recs[k]), ref[k]))
    ref_sp, peer_sp, strict_sp = cat(ref_sp), cat(peer_sp), cat(strict_sp)
    per, tot2, n2 = spike_mismatches(ref_sp, peer_sp)
    _, tot2s, _ = spike_mismatches(strict_sp, peer_sp)
    print(f"[spikformer-tiny --split segment 0: stem + block 0 Q/K/V] {len(x)} inputs")
    for k, v in per.items():
        print(f"  {k:28s} {v:8d} / {ref_sp[k].size}")
    print(f"  snntorch vs torch: {tot2} of {n2} differ; vs our strict-tie reader: {tot2s}")
    head.update(stem_segment_mismatches=tot2, stem_segment_spikes=n2, stem_segment_mismatches_strict_reader=tot2s)
    print(" ".join(f"{k}={v}" for k, v in {"peer": "snntorch-1.0.0", "samples": len(x), **head}.items()))


if __name__ == "__main__":
    main()
