"""Lava simulator speed: simulated timesteps/s and samples/s, and the cost of building/compiling the network,
for the tiny and small presets, with and without token pruning (static per-timestep masks, keep 0.5).

    python benchmarks/lava_speed.py [--samples 64] [--batch 32] [--presets spikformer-tiny,spikformer-small]
    python benchmarks/lava_speed.py --parity RUN_DIR [RUN_DIR ...] --samples 100   # parity + fixed-point cost

Models: random weights with BatchNorm set so that every layer fires (speed depends on activity, so a dead network
would flatter Lava), digits-shaped input (1x8x8). ``--parity`` instead takes trained run folders (with
masks.json if pruned), exports each to NIR, runs torch and Lava (float and fixed) on the first N test digits and
reports spike mismatches, prediction agreement, accuracies and SOPs from both.
Last line: key=value pairs (DESIGN.md section 1).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def lively(preset: str, prune: bool, seed: int = 0):
    from stata_deploy.config import make_config
    from stata_deploy.nn.model import build_model
    from stata_deploy.testing import liven_batchnorm, random_timestep_masks

    torch.manual_seed(seed)
    cfg = make_config(preset, img_size=8, in_channels=1, anchor=True)
    model = liven_batchnorm(build_model(cfg).eval(), seed)
    masks = random_timestep_masks(cfg, max(1, cfg.depth // 3), 0.5, seed) if prune else None
    return model, masks


def spike_mismatches(ref, res) -> tuple[int, int, float]:
    mism = total = 0
    real = 0.0
    for k, a in ref.spikes.items():
        b = res.spikes[k]
        if not np.isin(a, (-1, 0, 1)).all():  # real-valued (A2OS2A's ReLU K)
            real = max(real, float(np.abs(a - b).max()))
            continue
        mism += int((a != b).sum())
        total += a.size
    return mism, total, real


def bench_speed(args) -> dict:
    from exporters.nir_exporter import NirExporter
    from stata_deploy.train.data import load_dataset
    from stata_deploy.inference import run_torch

    from runtimes.lava_runtime import LavaRuntime

    x = load_dataset("digits").x_test[: args.samples]
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="lava-bench-"))
    for preset in args.presets.split(","):
        short = preset.replace("spikformer-", "")
        for prune in (False, True):
            model, masks = lively(preset, prune)
            path = tmp / f"{short}-{int(prune)}.nir"
            NirExporter().export(model, masks, path)
            ref = run_torch(model, torch.as_tensor(x), masks)
            t0 = time.perf_counter()
            with LavaRuntime(path, batch=args.batch, timeout=1800) as rt:
                res = rt.run(x)  # first run: build + compile + run
                res = rt.run(x)  # steady state
                st = rt.stats[-1]
                info = dict(lower_s=rt.lower_seconds, build_s=rt.build_seconds, compile_s=rt.compile_seconds,
                            processes=len(rt._builder.spec(buffer=1)["procs"]) + len(rt._builder.records) + 1, depth=rt.depth,
                            steps=st["steps"], run_s=st["seconds"])
            info["total_s"] = time.perf_counter() - t0
            info["steps_per_s"] = st["steps"] / st["seconds"]
            info["samples_per_s"] = len(x) / st["wall_seconds"]
            info["mismatches"], info["compared"], _ = spike_mismatches(ref, res)
            key = f"{short}_{'pruned' if prune else 'full'}"
            out[key] = info
            print(key, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in info.items()}),
                  flush=True)
    return out


def bench_parity(args) -> dict:
    from exporters.nir_exporter import NirExporter
    from stata_deploy.train.checkpoint import load_model
    from stata_deploy.train.data import load_dataset
    from stata_deploy.inference import run_torch
    from stata_deploy.pruning.masks import TokenMasks
    from stata_deploy.energy.counter import count_ops

    from runtimes.lava_runtime import LavaRuntime

    ds = load_dataset("digits")
    x, y = ds.x_test[: args.samples], ds.y_test[: args.samples]
    tmp = Path(tempfile.mkdtemp(prefix="lava-parity-"))
    out = {}
    for run in args.parity:
        run = Path(run)
        model, _ = load_model(run)
        masks = TokenMasks.load(run / "masks.json") if (run / "masks.json").is_file() else None
        path = tmp / f"{run.name}.nir"
        NirExporter().export(model, masks, path)
        ref = run_torch(model, torch.as_tensor(x), masks)
        sops_t = count_ops(model.cfg, ref, masks).sops
        att = model.cfg.attention
        for prec in ("float", "fixed"):
            with LavaRuntime(path, precision=prec, batch=args.batch, timeout=1800) as rt:
                res = rt.run(x)
            m, tot, real = spike_mismatches(ref, res)
            r = dict(mismatches=m, compared=tot, real_max_diff=real,
                     agreement=float((ref.predictions == res.predictions).mean()),
                     acc_torch=float((ref.predictions == y).mean()), acc_lava=float((res.predictions == y).mean()),
                     sops_torch=sops_t, sops_lava=count_ops(model.cfg, res, masks).sops)
            out[f"{att}_{prec}"] = r
            print(f"{att}_{prec}", json.dumps(r), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--presets", default="spikformer-tiny,spikformer-small")
    ap.add_argument("--parity", nargs="*", help="trained run folders: measure parity instead of speed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.parity:
        res = bench_parity(args)
        print(" ".join(f"{k}_mismatches={v['mismatches']} {k}_agreement={v['agreement']:.3f} "
                       f"{k}_acc_delta={v['acc_lava'] - v['acc_torch']:+.3f}" for k, v in res.items()))
    else:
        res = bench_speed(args)
        print(" ".join(f"{k}_steps_per_s={v['steps_per_s']:.2f} {k}_samples_per_s={v['samples_per_s']:.2f} "
                       f"{k}_compile_s={v['compile_s']:.1f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
