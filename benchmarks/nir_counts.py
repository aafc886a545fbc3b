"""NIR export: neurons and synapses vs keep ratio gamma (static STATA masks), plus round-trip parity.

For gamma in 0.2/0.5/0.8/1.0: a spikformer-tiny with an anchor token (STATA, site at block 1) is calibrated to
static per-timestep masks (`calibrate_masks`, as `stata-deploy calibrate`), exported with `NirExporter` and
summarised by our reader (`stata-deploy inspect`): LIF neurons, synapses (nonzero weights x positions they are
applied at), tokens in the graph at the site. gamma=1.0 is the same model exported without masks.
Then every attention kind x pruning method goes torch -> .nir -> our reader on --samples inputs and the spike
mismatches are counted.

Usage: python benchmarks/nir_counts.py [--samples 100]        Last line: key=value headline.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _nir_models import lively_model, root_flips, spike_mismatches, time_varying_masks  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--no-parity", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from exporters.nir_exporter import NirExporter
    from runtimes.nir_runtime import NirRuntime, inspect
    from stata_deploy.train.data import load_dataset
    from stata_deploy.inference import run_torch
    from stata_deploy.pruning.masks import TokenMasks

    ds = load_dataset("digits")
    xcal = ds.x_train[:64]
    tmp = Path(tempfile.mkdtemp())
    head = {}
    rows = []
    base = None
    for gamma in (0.2, 0.5, 0.8, 1.0):
        model, masks = lively_model("spikformer-tiny", "stata", gamma, xcal) if gamma < 1 else \
            lively_model("spikformer-tiny", "stata", 0.5, xcal)
        if gamma == 1.0:
            masks = TokenMasks({}, model.cfg.num_tokens, model.cfg.T)  # same anchor model, nothing removed
        p = tmp / f"g{gamma}.nir"
        NirExporter().export(model, masks, p)
        d = inspect(p)
        toks = d["masks"]["segments"]["site1"]["tokens_in_graph"] if d["masks"] and d["masks"]["segments"] else \
            model.cfg.num_tokens
        rows.append((gamma, toks, d["neurons"], d["synapses"]))
        if gamma == 1.0:
            base = d
    print(f"{'gamma':>6} {'tokens@site1':>13} {'neurons':>9} {'synapses':>10} {'neurons%':>9} {'synapses%':>10}")
    for gamma, toks, ne, sy in rows:
        print(f"{gamma:>6} {toks:>13} {ne:>9} {sy:>10} {100 * ne / base['neurons']:>8.1f}% "
              f"{100 * sy / base['synapses']:>9.1f}%")
        head[f"neurons_g{gamma}"] = ne
        head[f"synapses_g{gamma}"] = sy
    if not args.no_parity:
        x = ds.x_test[: args.samples]
        print(f"round trip torch -> .nir -> our reader, {len(x)} inputs:")
        total = 0
        for preset in ("spikformer-tiny", "sdt-tiny", "a2os2a-tiny"):
            for method in ("none", "stata", "tv", "tp"):
                prune = {"tv": "stata"}.get(method, method)
                model, masks = lively_model(preset, prune, 0.5 if method != "none" else 1.0, xcal)
                if method == "tv":
                    masks = time_varying_masks(model.cfg)
                p = tmp / f"{preset}-{method}.nir"
                NirExporter().export(model, masks, p)
                t0 = time.perf_counter()
                got = NirRuntime(p, batch_size=50).run(x)
                ref = run_torch(model, torch.as_tensor(x), masks)
                per, tot, n = spike_mismatches(ref.spikes, got.spikes)
                roots = root_flips(ref.spikes, got.spikes)
                agree = float((got.predictions == ref.predictions).mean())
                kept_ok = all(np.array_equal(got.kept[s], ref.kept[s]) for s in ref.kept)
                label = {"tv": "stata-timevarying"}.get(method, method)
                print(f"  {preset:16s} {label:18s} mismatches {tot:6d} / {n} (root flips {roots}), prediction "
                      f"agreement {agree:.3f}, kept equal {kept_ok}, {time.perf_counter() - t0:.1f}s")
                head[f"rt_{preset.split('-')[0]}_{label}"] = tot
                total += tot
        head["roundtrip_mismatches_total"] = total
        head["samples"] = len(x)
    print(" ".join(f"{k}={v}" for k, v in head.items()))


if __name__ == "__main__":
    main()
