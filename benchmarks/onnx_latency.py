"""Inference with static token masks (issue 16): pruned vs unpruned, ONNX Runtime vs torch eager, paired rounds.

Cells: preset x batch x runtime (ORT, torch eager) x keep ratio gamma. For each preset and batch, every configuration
(unpruned and each gamma, on ORT and on torch) is loaded once into this process and timed in paired rounds: a round
times every configuration ``--inner`` calls in a row (the order rotates from round to round; the round's time of a
configuration is the fastest of its calls: interference from other processes, or from the threads of the
configuration timed just before, only ever adds time), the first ``--warmup`` rounds are dropped. Per round the speedup is
unpruned time / pruned time on the same runtime, and ORT-vs-torch is torch time / ORT time for the same model: the
median over rounds is reported with its range [min..max] (robust to load drifting between rounds; the machine may
be shared). ``ideal`` = counted forward MACs unpruned / pruned (``_common.count_macs``: convolutions, linear layers
and attention products, from the tokens each block computes on), printed beside every speedup with the fraction
``speedup / ideal``. GFLOP/s = 2 x MACs x batch / time.

Pruned models: STATA at the preset's default sites (every 3 blocks from L//3: block 1 for depth 4) with random static
masks whose kept tokens differ between timesteps (the general case: neurons follow per-step schedules). Weights are
random with BatchNorm set so that every layer fires; speed does not depend on training (neither runtime exploits
spike sparsity). Before timing, the spikes of ORT and torch are compared on up to 8 inputs (reported, not asserted:
with random weights a float-rounding tie at a threshold occasionally flips one spike, and everything after it).

Also printed: export time and node count of every ONNX file; with ``--peak`` a float32 GEMM peak of this machine
(torch.mm and a one-node ORT MatMul at the model's shapes and at 2048^3) to put the batch-1 GFLOP/s in context;
with ``--dynamo`` the torch.export-based exporter (needs onnxscript) against the TorchScript tracer: export time,
node count, paired batch-1 ORT latency; with ``--profile`` where the time goes (ORT per-op-type kernel time,
torch.profiler top ops) for the first preset's batch-1 unpruned and smallest-gamma models.

Last line: key=value pairs, e.g. ``speedup_ort_b1_spikformer-4-384_g0.2=1.40 ideal_..=1.42 ort_vs_torch_b1_..=3.1``.

Run:  python benchmarks/onnx_latency.py [--presets spikformer-4-384,spikformer-tiny] [--gammas 0.2,0.5]
                                         [--batches 1,32] [--threads 2] [--peak] [--dynamo] [--profile]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C

RUNTIMES = ("ort", "torch")


def tw_masks(cfg, keep: float, seed: int = 0):
    """Static masks keeping a random ceil(keep * n) image tokens per timestep at every site (anchor kept)."""
    import numpy as np

    from stata_deploy.pruning.masks import TokenMasks
    from stata_deploy.pruning.scorers import num_keep

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


def build(preset: str, gamma: float | None):
    """(cfg, model, masks) for the unpruned model (gamma None) or STATA at keep gamma with random static masks."""
    import torch

    from stata_deploy.config import PruneConfig, make_config
    from stata_deploy.nn.model import build_model
    from stata_deploy.testing import liven_batchnorm

    torch.manual_seed(0)
    cfg = make_config(preset, prune=PruneConfig(method="stata", keep=gamma)) if gamma else make_config(preset)
    model = liven_batchnorm(build_model(cfg)).eval()
    return cfg, model, (tw_masks(cfg, gamma) if gamma else None)


def export(model, masks, path: Path, dynamo: bool = False) -> dict:
    import onnx

    from exporters.onnx_exporter import OnnxExporter

    t0 = time.perf_counter()
    OnnxExporter().export(model, masks, path, dynamo=dynamo)
    secs = time.perf_counter() - t0
    return {"export_s": secs, "nodes": len(onnx.load(str(path), load_external_data=False).graph.node)}


def ort_optimized_nodes(path: Path, threads: int) -> tuple[int, dict]:
    """Node count (and op types) of the graph ONNX Runtime runs after its ORT_ENABLE_ALL optimisations."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    opt = str(path) + ".opt.onnx"
    so.optimized_model_filepath = opt
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    g = onnx.load(opt, load_external_data=False).graph
    os.remove(opt)
    return len(g.node), dict(collections.Counter(n.op_type for n in g.node).most_common())


def label(gamma) -> str:
    return "unpruned" if gamma is None else f"g{gamma:g}"


class Config:
    """One model on both runtimes."""

    def __init__(self, preset, gamma, threads, tmp: Path):
        from runtimes.onnxruntime_runtime import OnnxRuntime

        self.preset, self.gamma = preset, gamma
        self.cfg, self.model, self.masks = build(preset, gamma)
        self.macs = C.count_macs(self.cfg).total
        self.path = tmp / f"{preset}-{label(gamma)}.onnx"
        self.exp = export(self.model, self.masks, self.path)
        self.ort_nodes, self.ort_ops = ort_optimized_nodes(self.path, threads)
        self.rt = OnnxRuntime(self.path, threads=threads)

    def runner(self, name: str, x):
        import torch

        from stata_deploy.inference import run_torch

        if name == "ort":
            return lambda: self.rt.run(x, record=False)
        xt = torch.from_numpy(x)
        return lambda: run_torch(self.model, xt, self.masks, record=False)

    def check(self, x) -> tuple[int, int, str | None, float]:
        """(spike mismatches, spikes compared, first layer that differs, max |logit difference|), ORT vs torch."""
        import numpy as np
        import torch

        from stata_deploy.inference import run_torch

        a, b = self.rt.run(x), run_torch(self.model, torch.from_numpy(x), self.masks)
        per = {k: int((a.spikes[k] != b.spikes[k]).sum()) for k in b.spikes}
        first = next((k for k, v in per.items() if v), None)
        return sum(per.values()), sum(v.size for v in b.spikes.values()), first, float(np.abs(a.logits_t - b.logits_t).max())


def ratio_stats(num: list, den: list) -> tuple[float, float, float]:
    rs = [a / b for a, b in zip(num, den)]
    return statistics.median(rs), min(rs), max(rs)


def gemm_peak(threads: int) -> dict:
    """float32 GEMM GFLOP/s on this machine: torch.mm and a one-node ONNX Runtime MatMul (MLAS, what the model's
    MatMul/Conv kernels use) at the block's fc1 shape at batch 1 (T*N rows), an im2col-sized stem conv and 2048^3."""
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    shapes = {"fc1_b1": (4 * 65, 384, 1536), "stem_conv_b1": (4 * 32 * 32, 9 * 96, 192), "square_2048": (2048, 2048, 2048)}
    res = {}
    for name, (m, k, n) in shapes.items():
        a = torch.rand(m, k)
        b = torch.rand(k, n)
        reps = max(3, int(2e10 / (2 * m * k * n)))
        best_t = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            best_t = min(best_t, (time.perf_counter() - t0) / reps)
        g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [m, n])],
                              initializer=[onnx.numpy_helper.from_array(b.numpy(), "b")])
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        s = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString(),
                                 so, providers=["CPUExecutionProvider"])
        an = a.numpy()
        s.run(None, {"a": an})
        best_o = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                s.run(None, {"a": an})
            best_o = min(best_o, (time.perf_counter() - t0) / reps)
        res[name] = {"shape": [m, k, n], "torch_gflops": 2 * m * k * n / best_t / 1e9,
                     "ort_gflops": 2 * m * k * n / best_o / 1e9}
    return res


def profile_ort(path: Path, x, threads: int, reps: int = 10, warm: int = 3) -> list[tuple[str, float, int]]:
    """(op type, kernel ms per run, nodes) from ONNX Runtime's profiler over ``reps`` runs after ``warm`` runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(path.with_suffix("")) + "-prof"
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(warm + reps):
        s.run(["logits_t"], {"x": x})
    f = s.end_profiling()
    ev = json.load(open(f))
    os.remove(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev if e.get("cat") == "Session" and e["name"] == "model_run")
    t_start = runs[warm][0] if len(runs) > warm else 0
    by, cnt = collections.Counter(), collections.Counter()
    for e in ev:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t_start:
            by[e["args"]["op_name"]] += e["dur"]
            cnt[e["args"]["op_name"]] += 1
    return [(k, v / reps / 1e3, cnt[k] // reps) for k, v in by.most_common()]


def profile_torch(conf: Config, x, reps: int = 5) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    run = conf.runner("torch", x)
    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            run()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / reps / 1e3, e.count // reps) for e in rows[:15]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="spikformer-4-384,spikformer-tiny")
    ap.add_argument("--gammas", default="0.2,0.5")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=0, help="timed rounds (default: batch 1: 12, batch 32: 5)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds dropped from the statistics")
    ap.add_argument("--inner", type=int, default=0, help="calls per configuration per round, the fastest counts "
                                                         "(default: 5 at batch 1 for large presets, 20 tiny, 2 at "
                                                         "batch 32)")
    ap.add_argument("--peak", action="store_true", help="measure a float32 GEMM peak (torch.mm, ORT MatMul)")
    ap.add_argument("--dynamo", action="store_true", help="compare the dynamo exporter with the TorchScript one")
    ap.add_argument("--profile", action="store_true", help="ORT and torch profiles of the first preset at batch 1")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    C.ensure_malloc_env(args.malloc)

    import numpy as np
    import onnxruntime as ort
    import torch

    torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    gammas = [float(g) for g in args.gammas.split(",") if g]
    batches = [int(b) for b in args.batches.split(",") if b]
    print(f"# {C.utc()}  torch {torch.__version__}, onnxruntime {ort.__version__}, {args.threads} threads, "
          f"{os.cpu_count()} CPUs, malloc: {C.malloc_desc()}; load average at start: {os.getloadavg()[0]:.2f}")
    kv: dict = {}
    results: dict = {"threads": args.threads, "utc": C.utc(), "cells": [], "exports": {}}
    if args.peak:
        peak = gemm_peak(args.threads)
        results["peak"] = peak
        for name, p in peak.items():
            print(f"# GEMM peak {name:13s} {p['shape']}: torch.mm {p['torch_gflops']:7.1f} GFLOP/s, ORT MatMul "
                  f"{p['ort_gflops']:7.1f} GFLOP/s", flush=True)
        best = max(max(p["torch_gflops"], p["ort_gflops"]) for p in peak.values())
        kv["gemm_peak_gflops"] = round(best, 1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for preset in presets:
            large = "tiny" not in preset
            confs = {}
            for g in [None, *gammas]:
                c = Config(preset, g, args.threads, tmp)
                confs[label(g)] = c
                tpb = C.tokens_per_block(c.cfg)
                print(f"# {preset} {label(g):>8}: tokens per block {tpb}, {c.macs / 1e9:.3f} GMACs/sample, export "
                      f"{c.exp['export_s']:.1f} s, {c.exp['nodes']} nodes in the file, {c.ort_nodes} after ORT "
                      "optimisation", flush=True)
                results["exports"][f"{preset}/{label(g)}"] = {**c.exp, "ort_nodes": c.ort_nodes, "ort_ops": c.ort_ops,
                                                             "gmacs": c.macs / 1e9, "tokens_per_block": tpb}
            base = confs["unpruned"]
            rng = np.random.default_rng(0)
            for B in batches:
                cfg = base.cfg
                x = rng.random((B, cfg.in_channels, cfg.img_size, cfg.img_size), dtype=np.float32)
                for lab, c in confs.items():
                    bad, total, first, dl = c.check(x[: min(B, 8)])
                    print(f"# parity {preset} {lab} batch {min(B, 8)}: {bad} of {total} spikes differ between ORT and "
                          f"torch, max |logit difference| {dl:.2g}" + (
                              f" (first in {first}: a float-rounding tie at a threshold (the GEMMs of ORT and torch "
                              "round differently) flips a spike, which changes everything downstream)" if bad else ""))
                    kv.setdefault("spike_mismatches", 0)
                    kv["spike_mismatches"] += bad
                rounds = args.rounds or (12 if B == 1 else 5)
                inner = args.inner or (2 if B > 1 else (5 if large else 20))
                fns = {(rt, lab): c.runner(rt, x) for lab, c in confs.items() for rt in RUNTIMES}
                times = C.paired_rounds(fns, rounds, args.warmup, inner)
                print(f"\n{preset}, batch {B} ({rounds} rounds x {inner} calls, median of per-round ratios "
                      "[min..max])")
                print(f"  {'config':>8} {'runtime':>7} {'ms':>9} {'GFLOP/s':>8} {'speedup':>7} {'[range]':>13} "
                      f"{'ideal':>5} {'frac':>5}   {'ORT vs torch [range]':>22}")
                for lab, c in confs.items():
                    ovt = ratio_stats(times[("torch", lab)], times[("ort", lab)])
                    for rt in RUNTIMES:
                        t = statistics.median(times[(rt, lab)])
                        gf = 2 * c.macs * B / t / 1e9
                        cell = {"preset": preset, "batch": B, "config": lab, "gamma": c.gamma, "runtime": rt,
                                "ms": t * 1e3, "round_ms": [v * 1e3 for v in times[(rt, lab)]], "gflops": gf}
                        sp = ""
                        if c.gamma is not None:
                            m, lo, hi = ratio_stats(times[(rt, "unpruned")], times[(rt, lab)])
                            ideal = base.macs / c.macs
                            sp = f"{m:7.2f} {f'[{lo:.2f}..{hi:.2f}]':>13} {ideal:5.2f} {m / ideal:5.2f}"
                            cell.update(speedup=m, speedup_min=lo, speedup_max=hi, ideal=ideal, frac=m / ideal)
                            kv[f"speedup_{rt}_b{B}_{preset}_{lab}"] = round(m, 3)
                            kv[f"ideal_{preset}_{lab}"] = round(ideal, 3)
                        else:
                            sp = f"{'':7} {'':>13} {'':5} {'':5}"
                        o = f"{ovt[0]:6.2f} [{ovt[1]:.2f}..{ovt[2]:.2f}]" if rt == "ort" else ""
                        print(f"  {lab:>8} {rt:>7} {t * 1e3:9.2f} {gf:8.1f} {sp}   {o:>22}", flush=True)
                        if rt == "ort":
                            cell["ort_vs_torch"] = ovt[0]
                            kv[f"ort_vs_torch_b{B}_{preset}_{lab}"] = round(ovt[0], 3)
                        if B == 1 and rt == "ort":
                            kv[f"ort_gflops_b1_{preset}_{lab}"] = round(gf, 1)
                        results["cells"].append(cell)
                print(flush=True)
            if args.dynamo:
                print(f"# dynamo exporter vs TorchScript tracer, {preset}, batch 1 ORT:")
                for lab in ("unpruned", label(max(gammas))):
                    c = confs[lab]
                    p = tmp / f"{preset}-{lab}-dynamo.onnx"
                    try:
                        e = export(c.model, c.masks, p, dynamo=True)
                    except Exception as err:  # onnxscript missing, exporter failure: report, do not stop
                        print(f"#   {lab}: dynamo export failed: {str(err).splitlines()[0]}")
                        continue
                    from runtimes.onnxruntime_runtime import OnnxRuntime

                    rt = OnnxRuntime(p, threads=args.threads)
                    x = rng.random((1, c.cfg.in_channels, c.cfg.img_size, c.cfg.img_size), dtype=np.float32)
                    a, b = rt.run(x), c.rt.run(x)
                    bad = sum(int((a.spikes[k] != b.spikes[k]).sum()) for k in b.spikes)
                    n_opt, _ = ort_optimized_nodes(p, args.threads)
                    tt = C.paired_rounds({"ts": lambda: c.rt.run(x, record=False), "dyn": lambda: rt.run(x, record=False)},
                                       args.rounds or 12, args.warmup, 5 if large else 20)
                    m, lo, hi = ratio_stats(tt["ts"], tt["dyn"])
                    print(f"#   {lab:>8}: export {c.exp['export_s']:6.1f} s -> {e['export_s']:6.1f} s; nodes in file "
                          f"{c.exp['nodes']} -> {e['nodes']}, after ORT optimisation {c.ort_nodes} -> {n_opt}; "
                          f"ORT b1 {statistics.median(tt['ts']) * 1e3:.2f} -> {statistics.median(tt['dyn']) * 1e3:.2f}"
                          f" ms (TorchScript/dynamo time {m:.2f} [{lo:.2f}..{hi:.2f}]); spikes differing {bad}",
                          flush=True)
                    results["exports"][f"{preset}/{lab}/dynamo"] = {**e, "ort_nodes": n_opt, "ts_over_dynamo": m,
                                                                   "spike_mismatches_vs_ts": bad}
                    kv[f"dynamo_export_s_{preset}_{lab}"] = round(e["export_s"], 1)
                    kv[f"ts_export_s_{preset}_{lab}"] = round(c.exp["export_s"], 1)
                    kv[f"ts_over_dynamo_b1_{preset}_{lab}"] = round(m, 3)
                    rt.close()
            if args.profile and preset == presets[0]:
                x = rng.random((1, base.cfg.in_channels, base.cfg.img_size, base.cfg.img_size), dtype=np.float32)
                xe = base.rt.encode(x)
                for lab in ("unpruned", label(min(gammas))):
                    c = confs[lab]
                    prof = profile_ort(c.path, xe, args.threads)
                    tot = sum(p[1] for p in prof)
                    print(f"# ORT profile {preset} {lab} batch 1: kernel time {tot:.2f} ms/run: " + ", ".join(
                        f"{k} {ms:.2f} ({n})" for k, ms, n in prof[:12]))
                    tp = profile_torch(c, x)
                    print(f"# torch profile {preset} {lab} batch 1 (self CPU ms/run, calls): " + ", ".join(
                        f"{k} {ms:.2f} ({n})" for k, ms, n in tp[:12]))
            for c in confs.values():
                c.rt.close()
    kv["threads"] = args.threads
    print(f"# {C.utc()}  load average at the end: {os.getloadavg()[0]:.2f} (other processes share these CPUs)")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    print(C.headline(kv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
