"""ONNX Runtime vs torch eager: batch-1 latency and batch-32 throughput, side by side in one run.

For each preset (default: the tiny test model and the paper-shaped spikformer-4-384) and for an unpruned model and
a STATA-pruned one with static per-timestep masks (keep --keep at one site, tokens differing between timesteps),
the model is exported to ONNX and both runtimes run the same inputs with the same thread count. Measurements are
interleaved (ORT, torch, ORT, torch, ...) so machine load hits both alike; medians are reported. Weights are random
(speed does not depend on training: neither runtime exploits spike sparsity).

Last line: key=value pairs, e.g.
  ort_vs_torch_b1_spikformer-tiny=3.1 ort_vs_torch_b1_spikformer-4-384_pruned=1.2 ... (torch time / ORT time)

Run:  python benchmarks/onnx_latency.py [--presets spikformer-tiny,spikformer-4-384] [--keep 0.5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from exporters.onnx_exporter import OnnxExporter
from runtimes.onnxruntime_runtime import OnnxRuntime
from stata_deploy.config import PruneConfig, make_config
from stata_deploy.model import build_model
from stata_deploy.pruning import TokenMasks, num_keep


def tw_masks(cfg, keep: float, seed: int = 0) -> TokenMasks:
    """Static masks keeping a random ceil(keep * n) image tokens per timestep at every site (anchor kept)."""
    rng = np.random.default_rng(seed)
    T, n = cfg.T, cfg.num_tokens
    allowed, n_present, sites = np.ones((T, n), bool), cfg.num_image_tokens, {}
    for s in cfg.prune.resolved_sites(cfg.depth):
        k = num_keep(n_present, keep)
        m = np.zeros((T, n), bool)
        for t in range(T):
            cand = np.flatnonzero(allowed[t, 1:]) + 1
            m[t, rng.choice(cand, k, replace=False)] = True
            m[t, 0] = True
        sites[s], allowed, n_present = m, m, k
    return TokenMasks(sites, n, T, "drop", meta={"method": "stata", "keep": keep, "source": "benchmark (random)"})


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench(preset: str, pruned: bool, keep: float, threads: int, reps1: int, reps32: int, tmp: Path) -> dict:
    torch.manual_seed(0)
    prune = PruneConfig(method="stata", keep=keep) if pruned else None
    cfg = make_config(preset, prune=prune) if prune else make_config(preset)
    model = build_model(cfg).eval()
    masks = tw_masks(cfg, keep) if pruned else None
    path = tmp / f"{preset}{'-pruned' if pruned else ''}.onnx"
    t0 = time.perf_counter()
    OnnxExporter().export(model, masks, path)
    export_s = time.perf_counter() - t0
    rt = OnnxRuntime(path, threads=threads)
    rng = np.random.default_rng(0)
    res = {"preset": preset, "pruned": pruned, "export_s": export_s}
    for B, reps in ((1, reps1), (32, reps32)):
        x = rng.random((B, cfg.in_channels, cfg.img_size, cfg.img_size), dtype=np.float32)
        xt = torch.from_numpy(x)
        with torch.no_grad():
            a = rt.run(x, record=False).logits_t
            b = model(xt, masks=masks).logits_t.numpy()  # warm-up both, and check they agree
            assert np.allclose(a, b, rtol=1e-4, atol=1e-4), "ORT and torch disagree"
            ort_t, torch_t = [], []
            for _ in range(reps):  # interleaved A/B
                ort_t += timed(lambda: rt.run(x, record=False), 1)
                torch_t += timed(lambda: model(xt, masks=masks), 1)
        o, t = statistics.median(ort_t), statistics.median(torch_t)
        res[f"b{B}"] = {"ort_ms": o * 1e3, "torch_ms": t * 1e3, "ratio": t / o,
                        "ort_img_s": B / o, "torch_img_s": B / t}
    rt.close()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="spikformer-tiny,spikformer-4-384")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=0, help="batch-1 repetitions (default: 50 tiny, 10 large)")
    ap.add_argument("--reps32", type=int, default=0, help="batch-32 repetitions (default: 10 tiny, 3 large)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for preset in args.presets.split(","):
            large = "tiny" not in preset
            r1 = args.reps or (10 if large else 50)
            r32 = args.reps32 or (3 if large else 10)
            for pruned in (False, True):
                r = bench(preset, pruned, args.keep, args.threads, r1, r32, Path(d))
                rows.append(r)
                tag = f"{preset}{' pruned' if pruned else ''}"
                print(f"{tag:28s} batch 1: ORT {r['b1']['ort_ms']:8.2f} ms  torch {r['b1']['torch_ms']:8.2f} ms  "
                      f"(x{r['b1']['ratio']:.2f})   batch 32: ORT {r['b32']['ort_img_s']:8.1f} img/s  torch "
                      f"{r['b32']['torch_img_s']:8.1f} img/s (x{r['b32']['ratio']:.2f})   export {r['export_s']:.1f} s",
                      flush=True)
    kv = []
    for r in rows:
        tag = f"{r['preset']}{'_pruned' if r['pruned'] else ''}"
        kv.append(f"ort_vs_torch_b1_{tag}={r['b1']['ratio']:.2f}")
        kv.append(f"ort_vs_torch_b32_{tag}={r['b32']['ratio']:.2f}")
    by = {(r["preset"], r["pruned"]): r for r in rows}
    for p in args.presets.split(","):
        if (p, False) in by and (p, True) in by:
            kv.append(f"pruned_speedup_ort_b1_{p}={by[(p, False)]['b1']['ort_ms'] / by[(p, True)]['b1']['ort_ms']:.2f}")
            kv.append(f"pruned_speedup_ort_b32_{p}={by[(p, False)]['b32']['ort_ms'] / by[(p, True)]['b32']['ort_ms']:.2f}")
    kv.append(f"keep={args.keep} threads={args.threads}")
    print(" ".join(kv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
