"""One SOP table, several runtimes: the same test inputs through torch, ONNX Runtime, our NIR reader and Lava.

Every runtime returns its own spikes (``RunResult``); the one shared counter (``stata_deploy.energy.counter.count_ops``) turns
them into per-layer operation counts. If the runtimes compute the same spikes, the tables are equal number for number.

    python benchmarks/runtime_sops.py runs/demo/stata            # needs RUN/model.onnx and RUN/model.nir
    python benchmarks/runtime_sops.py RUN --runtimes torch,onnxruntime --limit 200

Last line: ``sops_<runtime>=... max_layer_rel_diff=... layers=...``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

FILES = {"torch": None, "onnxruntime": "model.onnx", "nir": "model.nir", "lava": "model.nir"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run folder with static masks, exported to ONNX and NIR")
    ap.add_argument("--runtimes", default="torch,onnxruntime,nir,lava")
    ap.add_argument("--dataset", default=None, help="default: the run's dataset")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch", type=int, default=50)
    args = ap.parse_args(argv)

    from stata_deploy.train.checkpoint import load_config
    from stata_deploy.train.data import load_dataset
    from stata_deploy.registry import RUNTIMES
    from stata_deploy.energy.counter import count_ops

    run = Path(args.run)
    names = [n.strip() for n in args.runtimes.split(",") if n.strip()]
    dataset = args.dataset or load_config(run)[1].get("train", {}).get("dataset", "digits")
    cfg_T = load_config(run)[0].T
    ds = load_dataset(dataset, T=cfg_T)
    x = ds.x_test[: args.limit]
    tables: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    for name in names:
        target = run if FILES[name] is None else run / FILES[name]
        if not target.exists():
            print(f"error: {target} is missing (stata-deploy export {run} --to {Path(FILES[name]).suffix[1:]})",
                  file=sys.stderr)
            return 2
        opts = {"batch": args.batch} if name == "lava" else {}
        rt = RUNTIMES.get(name)(target, **opts)
        try:
            per_layer: dict[str, float] = {}
            n = 0
            for i in range(0, len(x), args.batch):
                xb = x[i: i + args.batch]
                rep = count_ops(rt.cfg, rt.run(xb, record=True), rt.masks)
                for layer in rep.layers:
                    per_layer[layer.name] = per_layer.get(layer.name, 0.0) + layer.ops * len(xb)
                n += len(xb)
        finally:
            rt.close()
        tables[name] = {k: v / n for k, v in per_layer.items()}
        totals[name] = sum(tables[name].values())

    ref = tables[names[0]]
    layers = list(ref)
    width = max(len(s) for s in layers + ["total per inference"])
    print(f"# {run} on {dataset}, {len(x)} test inputs; ops = MACs + ACs + attention ops per inference")
    print(f"{'layer':{width}s} " + " ".join(f"{n:>14s}" for n in names))
    worst = 0.0
    for layer in layers:
        vals = [tables[n].get(layer, float("nan")) for n in names]
        for v in vals[1:]:
            d = abs(v - vals[0]) / max(abs(vals[0]), 1e-12) if vals[0] else abs(v)
            worst = max(worst, d if np.isfinite(d) else float("inf"))
        print(f"{layer:{width}s} " + " ".join(f"{v:14.2f}" for v in vals))
    print(f"{'total per inference':{width}s} " + " ".join(f"{totals[n]:14.2f}" for n in names))
    same_layers = all(set(tables[n]) == set(ref) for n in names)
    print(" ".join(f"sops_{n}={totals[n]:.2f}" for n in names)
          + f" max_layer_rel_diff={worst:.3g} layers={len(layers)} same_layers={int(same_layers)} samples={len(x)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
