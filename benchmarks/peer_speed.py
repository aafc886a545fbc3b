"""Our training step and batch-1 inference against a Spikformer written on SpikingJelly 2.0.0 (issue 16).

Configurations, all in ONE process (same ``torch.set_num_threads``, same glibc malloc settings, same batch):

  ours      stata_deploy's Spikformer (``--preset``, default spikformer-4-384), unpruned
  ours_g    the same with STATA token pruning at keep ``--gamma`` (dynamic top-k at the config's default sites,
            exactly what ``train_speedup.py`` trains)
  sj        ``benchmarks/_sj_spikformer.py``: the same Spikformer (shapes, tau, thresholds, hard reset, sigmoid
            surrogate alpha 4, detached reset) on SpikingJelly's ``LIFNode(step_mode='m')``, with
            ``functional.reset_net`` after every step; our unpruned model's initial weights copied into it

Training step = zero_grad, forward, cross-entropy on the T-averaged logits, backward, AdamW step (lr 1e-4) on a
fixed random batch (direct encoding: the image repeated over T). Paired rounds: every round times one step of each
configuration, the order rotating (ours, ours_g, sj / ours_g, sj, ours / ...); the first ``--warmup`` rounds are
dropped; each speedup is the median over rounds of that round's time ratio (sj / ours, sj / ours_g, ours / ours_g),
printed with its range [min..max] (robust to the load drifting between rounds). CPU-time ratios beside them.

Batch-1 inference (eval mode, no autograd): ours in torch eager, the SpikingJelly model in eager (+ reset_net), and
ours exported with ``exporters/onnx_exporter.py`` on ONNX Runtime (``runtimes/onnxruntime_runtime.py``, the input
repeated over T inside ``run``), same threads; ``--infer-rounds`` paired rounds of ``--infer-inner`` calls, the
fastest call of a round counts (``onnx_latency.py``'s rule).

Checks before timing (reported, never hidden): the reference against ours with identical weights (BatchNorm set so
that every layer fires) on ``--parity-batch`` inputs — every spike of every layer and the logits in eval mode, and
in train mode also the gradients; the ONNX Runtime spikes against torch at batch 1.

``--profile``: where the time goes — per configuration one step split into forward / backward / optimizer, the
time spent inside neuron layers' forward, and torch.profiler's top ops (self CPU time) and top autograd nodes.
``--quick``: a tiny model (spikformer-tiny, 3x8x8, batch 4), one timed round: a smoke run, numbers meaningless.

Needs SpikingJelly 2.0.0 (``bash scripts/install_peers.sh .venv``, i.e. ``pip install --no-deps spikingjelly==2.0.0
loguru==0.7.3``). Default run on spikformer-4-384 (about 3.96 + 2.61 + 5.11 s a round measured once): 2 warm-up +
36 timed training rounds (~7.5 min) plus setup, checks and the inference rounds: about 8-9 minutes.

    python benchmarks/peer_speed.py                  # spikformer-4-384, 32x32, T=4, batch 32, gamma 0.2
    python benchmarks/peer_speed.py --quick          # smoke run
    python benchmarks/peer_speed.py --profile --rounds 3

Last line: key=value pairs, e.g. ``train_sj_over_ours=1.3 train_sj_over_ours_g0.2=2.0 ...``.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C

TARGETS = {"unpruned": 1.5, "pruned": 2.2}  # issue 16: training step vs SpikingJelly, ours unpruned / at gamma 0.2
SJ_PIN = "2.0.0"


def fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def check_spikingjelly() -> str | None:
    """None when SpikingJelly SJ_PIN imports, else the reason (one line)."""
    import importlib.metadata as md

    try:
        version = md.version("spikingjelly")
    except md.PackageNotFoundError:
        return "SpikingJelly is not installed; install it with: bash scripts/install_peers.sh .venv"
    if version != SJ_PIN:
        return (f"SpikingJelly {version} is installed, this benchmark compares with {SJ_PIN}; install it with: "
                "bash scripts/install_peers.sh .venv")
    logging.getLogger("torch._library.triton").setLevel(logging.ERROR)  # "Triton not available" on CPU-only torch
    try:
        from spikingjelly.activation_based import functional, neuron  # noqa: F401
    except ImportError as e:
        return f"SpikingJelly {version} does not import ({e}); reinstall it with: bash scripts/install_peers.sh .venv"
    return None


# ------------------------------------------------------------------------------------------------ models
def make_cfg(args, gamma: float | None):
    from stata_deploy.config import PruneConfig, make_config

    prune = PruneConfig() if gamma is None else PruneConfig(method=args.method, keep=gamma, sites=args.site_list)
    return make_config(args.preset, img_size=args.img, in_channels=3, num_classes=args.classes, T=args.T,
                       prune=prune)


def build_all(args):
    """{label: dict(model, opt, kind, cfg)} for ours, ours_g and sj (sj starts from ours' initial weights)."""
    import torch

    import _sj_spikformer as R
    from stata_deploy.nn.model import build_model

    out = {}
    for lab, gamma in (("ours", None), ("ours_g", args.gamma)):
        cfg = make_cfg(args, gamma)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        out[lab] = dict(model=model, cfg=cfg, kind="ours")
    ref = R.from_config(out["ours"]["cfg"]).train()
    R.copy_weights(out["ours"]["model"], ref)
    out["sj"] = dict(model=ref, cfg=out["ours"]["cfg"], kind="sj")
    for c in out.values():
        c["opt"] = torch.optim.AdamW(c["model"].parameters(), lr=1e-4)
    return out


def make_batch(args, n: int, seed: int = 123):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, args.img, args.img, generator=g)
    y = torch.randint(0, args.classes, (n,), generator=g)
    return x, y


def forward_logits(c, x):
    import _sj_spikformer as R

    if c["kind"] == "sj":
        return R.run(c["model"], x)[0]  # forward, then functional.reset_net
    return c["model"](x).logits


def train_step(c, x, y) -> None:
    import torch.nn.functional as F

    c["opt"].zero_grad(set_to_none=True)
    F.cross_entropy(forward_logits(c, x), y).backward()
    c["opt"].step()


# ------------------------------------------------------------------------------------------------ checks
def parity_checks(args, confs) -> dict:
    """The reference against ours with identical weights: eval (spikes, logits) and train (+ gradients)."""
    import _sj_spikformer as R
    from stata_deploy.testing import liven_batchnorm

    ours = liven_batchnorm(copy.deepcopy(confs["ours"]["model"]))
    ref = copy.deepcopy(confs["sj"]["model"])
    R.copy_weights(ours, ref)
    x, y = make_batch(args, args.parity_batch, seed=7)
    res = {"eval": R.parity(ours, ref, x), "train": R.parity(ours, ref, x, y)}
    for mode, r in res.items():
        extra = f", max relative gradient difference {r['max_rel_grad_diff']:.2g}" if "max_rel_grad_diff" in r else ""
        print(f"# parity SpikingJelly vs ours ({mode} mode, batch {args.parity_batch}, identical weights): "
              f"{r['mismatches']} of {r['spikes']} spikes differ in {r['layers'][0]} neuron layers (spike rate "
              f"{r['spike_rate']:.2f}), max |logit difference| {r['max_logit_diff']:.2g}{extra}", flush=True)
    return res


# ------------------------------------------------------------------------------------------------ timing
def ratio_stats(num: list, den: list) -> tuple[float, float, float]:
    rs = [a / b for a, b in zip(num, den)]
    return statistics.median(rs), min(rs), max(rs)


def train_rounds(args, confs, x, y) -> tuple[dict, dict]:
    labels = list(confs)
    wall = {lab: [] for lab in labels}
    cpu = {lab: [] for lab in labels}
    rounds = args.warmup + args.rounds
    t_start = time.perf_counter()
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        rt, ct = {}, {}
        for lab in order:
            with C.Stopwatch() as sw:
                train_step(confs[lab], x, y)
            rt[lab], ct[lab] = sw.seconds, sw.cpu_seconds
            if r >= args.warmup:
                wall[lab].append(sw.seconds)
                cpu[lab].append(sw.cpu_seconds)
        tag = "warmup" if r < args.warmup else "timed"
        eta = ""
        if r == args.warmup and rounds > r + 1:
            per = (time.perf_counter() - t_start) / (r + 1)
            eta = f"; about {per * (rounds - r - 1) / 60:.1f} min of training rounds left"
        print(f"# round {r + 1}/{rounds} ({tag}, {C.utc()}, order {'/'.join(order)}): "
              + ", ".join(f"{k}={rt[k]:.2f}s (cpu {ct[k]:.2f}s)" for k in labels) + eta, flush=True)
    return wall, cpu


def inference(args, confs, tmp: Path) -> dict:
    """Batch-1 eval of ours (torch), the reference (torch + reset_net) and ours on ONNX Runtime."""
    import numpy as np
    import torch

    import _sj_spikformer as R
    from exporters.onnx_exporter import OnnxExporter
    from runtimes.onnxruntime_runtime import OnnxRuntime
    from stata_deploy.inference import run_torch
    from stata_deploy.testing import liven_batchnorm

    ours = liven_batchnorm(copy.deepcopy(confs["ours"]["model"])).eval()
    ref = copy.deepcopy(confs["sj"]["model"])
    R.copy_weights(ours, ref)
    ref.eval()
    path = tmp / "ours.onnx"
    t0 = time.perf_counter()
    OnnxExporter().export(ours, None, path)
    export_s = time.perf_counter() - t0
    rt = OnnxRuntime(path, threads=args.threads)
    x = np.random.default_rng(0).random((1, 3, args.img, args.img), dtype=np.float32)
    xt = torch.from_numpy(x)
    a, b = rt.run(x), run_torch(ours, xt)
    bad = sum(int((a.spikes[k] != b.spikes[k]).sum()) for k in b.spikes)
    total = sum(v.size for v in b.spikes.values())
    dl = float(np.abs(a.logits_t - b.logits_t).max())
    print(f"# ONNX export {export_s:.1f} s; parity ORT vs torch at batch 1: {bad} of {total} spikes differ, max "
          f"|logit difference| {dl:.2g}" + (" (a float-rounding tie at a threshold flips a spike: the GEMMs of ORT "
                                            "and torch round differently)" if bad else ""), flush=True)

    def ours_torch():
        with torch.no_grad():
            ours(xt)

    def sj_torch():
        with torch.no_grad():
            R.run(ref, xt)

    fns = {"ours_torch": ours_torch, "sj_torch": sj_torch, "ours_ort": lambda: rt.run(x, record=False)}
    times = C.paired_rounds(fns, args.infer_rounds, 1, args.infer_inner)
    rt.close()
    return {"times": times, "ort_spike_mismatches": bad, "ort_spikes": total, "ort_max_logit_diff": dl,
            "export_s": export_s}


# ------------------------------------------------------------------------------------------------ profile
def _neuron_modules(c):
    import _sj_spikformer as R
    from stata_deploy.nn.neurons import NEURON_TYPES

    if c["kind"] == "sj":
        return [m for _, m in R.lif_modules(c["model"])]
    return [m for m in c["model"].modules() if isinstance(m, NEURON_TYPES)]


def phase_split(c, x, y) -> dict:
    """One step split into forward / backward / optimizer seconds, and the forward time inside neuron layers."""
    import torch.nn.functional as F

    acc = {"neuron_fwd": 0.0}
    t_in = {}

    def pre(mod, inp):
        t_in[id(mod)] = time.perf_counter()

    def post(mod, inp, out):
        acc["neuron_fwd"] += time.perf_counter() - t_in.pop(id(mod))

    mods = _neuron_modules(c)
    hooks = [m.register_forward_pre_hook(pre) for m in mods] + [m.register_forward_hook(post) for m in mods]
    try:
        c["opt"].zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = F.cross_entropy(forward_logits(c, x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        c["opt"].step()
        t3 = time.perf_counter()
    finally:
        for h in hooks:
            h.remove()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "neuron_forward": acc["neuron_fwd"]}


def torch_profile(c, x, y, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            train_step(c, x, y)
    ka = list(prof.key_averages())
    ops = [e for e in ka if not e.key.startswith("autograd::engine::evaluate_function")]
    total = sum(e.self_cpu_time_total for e in ka) / steps / 1e6
    top = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:15]
    nodes = sorted((e for e in ka if e.key.startswith("autograd::engine::evaluate_function")),
                   key=lambda e: -e.cpu_time_total)[:10]
    return {"self_total_s": total,
            "top_ops": [(e.key, e.self_cpu_time_total / steps / 1e6, e.count // steps) for e in top],
            "top_autograd_nodes": [(e.key.split(": ", 1)[-1], e.cpu_time_total / steps / 1e6, e.count // steps)
                                   for e in nodes]}


def profile_all(args, confs, x, y) -> dict:
    out = {}
    for lab, c in confs.items():
        train_step(c, x, y)  # warm
        ph = phase_split(c, x, y)
        pr = torch_profile(c, x, y, args.profile_steps)
        out[lab] = {"phases": ph, **pr}
        step = ph["forward"] + ph["backward"] + ph["optimizer"]
        print(f"# profile {lab}: step {step:.3f} s = forward {ph['forward']:.3f} (of which neuron layers "
              f"{ph['neuron_forward']:.3f}) + backward {ph['backward']:.3f} + optimizer {ph['optimizer']:.3f}; "
              f"torch.profiler self CPU total {pr['self_total_s']:.3f} s/step")
        print("#   top ops (self s/step, calls/step): " + ", ".join(
            f"{k} {s:.3f} ({n})" for k, s, n in pr["top_ops"]))
        print("#   top autograd nodes (total s/step, calls/step): " + ", ".join(
            f"{k} {s:.3f} ({n})" for k, s, n in pr["top_autograd_nodes"]), flush=True)
    return out


# ------------------------------------------------------------------------------------------------ main
QUICK = dict(preset="spikformer-tiny", img=8, batch=4, rounds=1, warmup=1, infer_rounds=1, infer_inner=2,
             parity_batch=2, profile_steps=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(ap)
    ap.add_argument("--gamma", type=float, default=0.2, help="keep ratio of the pruned side")
    ap.add_argument("--method", default="stata", help="scorer of the pruned side (stata: timestep-wise top-k)")
    ap.add_argument("--sites", default="", help="pruning sites, e.g. 1 (default: the config's, every 3 blocks "
                                                "from L//3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=36, help="timed training rounds (each: one step of each model)")
    ap.add_argument("--warmup", type=int, default=2, help="training rounds dropped from the statistics")
    ap.add_argument("--infer-rounds", type=int, default=12, help="timed batch-1 inference rounds")
    ap.add_argument("--infer-inner", type=int, default=5, help="calls per model per inference round (fastest "
                                                                "counts)")
    ap.add_argument("--no-infer", action="store_true", help="skip the batch-1 inference part")
    ap.add_argument("--parity-batch", type=int, default=2, help="inputs of the reference-vs-ours check")
    ap.add_argument("--profile", action="store_true", help="where the time goes (phases, torch.profiler)")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model, one timed round: a smoke run")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="glibc malloc settings (the same for every configuration: one process)")
    ap.add_argument("--json-out", default=None, help="also write the results to this JSON file")
    if ap.parse_known_args(argv)[0].quick:
        ap.set_defaults(**QUICK)  # options given on the command line still win
    args = ap.parse_args(argv)
    for name in ("rounds", "batch", "infer_rounds", "infer_inner", "parity_batch", "profile_steps", "threads"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        return fail(f"--warmup must be >= 0, got {args.warmup}")
    if not 0.0 < args.gamma < 1.0:
        return fail(f"--gamma must be in (0, 1) (the pruned side keeps that fraction of tokens), got {args.gamma}")
    try:
        args.site_list = [int(s) for s in args.sites.split(",")] if args.sites else None
    except ValueError:
        return fail(f"--sites must be comma-separated block indices, got {args.sites!r}")
    if args.json_out:
        from stata_deploy.fileio import OutputError, check_output

        try:
            check_output(args.json_out, suffixes=(".json",), what="--json-out")
        except OutputError as e:
            return fail(str(e))
    C.ensure_malloc_env(args.malloc)
    why = check_spikingjelly()
    if why:
        return fail(why)

    import torch

    from stata_deploy.errors import StataError
    from stata_deploy.nn.model import count_params

    torch.set_num_threads(args.threads)
    try:
        make_cfg(args, args.gamma)
        confs = build_all(args)
    except (StataError, ValueError) as e:
        return fail(str(e).splitlines()[0])
    import importlib.metadata as md

    g = f"g{args.gamma:g}"
    cfg = confs["ours"]["cfg"]
    print(f"# {C.utc()}  torch {torch.__version__}, spikingjelly {md.version('spikingjelly')}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, malloc: {C.malloc_desc()}; load average at "
          f"start: {os.getloadavg()[0]:.2f}" + ("  [--quick: smoke run, numbers meaningless]" if args.quick else ""))
    pruned_cfg = confs["ours_g"]["cfg"]
    print(f"# {args.preset}: T={cfg.T} img={args.img} batch={args.batch} dim={cfg.dim} depth={cfg.depth} "
          f"heads={cfg.heads} tokens={cfg.num_image_tokens}; parameters ours {count_params(confs['ours']['model'])}, "
          f"SpikingJelly {count_params(confs['sj']['model'])}, ours_g {count_params(confs['ours_g']['model'])} "
          f"(+ anchor token); ours_g: {args.method} keep {args.gamma:g} at sites "
          f"{pruned_cfg.prune.resolved_sites(cfg.depth)}, tokens per block {C.tokens_per_block(pruned_cfg)}"
          + (f", anchor_grad {pruned_cfg.prune.anchor_grad}" if hasattr(pruned_cfg.prune, "anchor_grad") else ""))
    m0, m1 = C.count_macs(cfg), C.count_macs(pruned_cfg)
    print(f"# forward GMACs/sample: ours/sj {m0.total / 1e9:.3f}, ours_g {m1.total / 1e9:.3f} (ideal ours/ours_g "
          f"{m0.total / m1.total:.2f})", flush=True)
    parity = parity_checks(args, confs)

    x, y = make_batch(args, args.batch)
    wall, cpu = train_rounds(args, confs, x, y)
    kv: dict = {}
    res = {"preset": args.preset, "img": args.img, "batch": args.batch, "T": args.T, "threads": args.threads,
           "gamma": args.gamma, "method": args.method, "malloc": C.malloc_desc(), "quick": args.quick,
           "utc": C.utc(), "parity": parity, "train": {"step_seconds": wall, "step_cpu_seconds": cpu}}
    print(f"\ntraining step, {args.rounds} rounds (median of per-round ratios [min..max])")
    print(f"  {'config':>7} {'step s':>8} {'cpu s':>7}")
    for lab in confs:
        print(f"  {lab:>7} {C.median(wall[lab]):>8.3f} {C.median(cpu[lab]):>7.3f}")
    pairs = {"sj_over_ours": ("sj", "ours", TARGETS["unpruned"]),
             f"sj_over_ours_{g}": ("sj", "ours_g", TARGETS["pruned"]),
             f"ours_over_ours_{g}": ("ours", "ours_g", None)}
    res["train"]["ratios"] = {}
    for key, (num, den, target) in pairs.items():
        m, lo, hi = ratio_stats(wall[num], wall[den])
        mc, _, _ = ratio_stats(cpu[num], cpu[den])
        verdict = "" if target is None else (f"   target >= {target}x: " + ("met" if m >= target else "NOT met"))
        print(f"  {num}/{den:<7} {m:6.2f}x [{lo:.2f}..{hi:.2f}]  cpu-time ratio {mc:.2f}x{verdict}")
        kv[f"train_{key}"] = round(m, 3)
        res["train"]["ratios"][key] = {"median": m, "min": lo, "max": hi, "cpu_median": mc, "target": target,
                                       "rounds": [a / b for a, b in zip(wall[num], wall[den])]}
        if target is not None:
            kv[f"target_{key}"] = "met" if m >= target else "not_met"
    kv["ours_step_s"] = round(C.median(wall["ours"]), 3)
    kv[f"ours_{g}_step_s"] = round(C.median(wall["ours_g"]), 3)
    kv["sj_step_s"] = round(C.median(wall["sj"]), 3)

    if not args.no_infer:
        with tempfile.TemporaryDirectory() as d:
            inf = inference(args, confs, Path(d))
        t = inf["times"]
        print(f"\nbatch-1 inference, {args.infer_rounds} rounds x {args.infer_inner} calls (fastest per round; median "
              "of per-round ratios [min..max])")
        for k in t:
            print(f"  {k:>10} {statistics.median(t[k]) * 1e3:9.2f} ms")
        for num, den in (("sj_torch", "ours_torch"), ("sj_torch", "ours_ort"), ("ours_torch", "ours_ort")):
            m, lo, hi = ratio_stats(t[num], t[den])
            print(f"  {num}/{den:<10} {m:6.2f}x [{lo:.2f}..{hi:.2f}]")
            kv[f"infer_b1_{num}_over_{den}"] = round(m, 3)
        kv["ort_spike_mismatches"] = inf["ort_spike_mismatches"]
        res["infer"] = inf
    if args.profile:
        print()
        res["profile"] = profile_all(args, confs, x, y)
    kv["parity_spike_mismatches"] = parity["eval"]["mismatches"] + parity["train"]["mismatches"]
    kv["parity_max_rel_grad_diff"] = float(f"{parity['train']['max_rel_grad_diff']:.2g}")
    kv["threads"] = args.threads
    print(f"# {C.utc()}  load average at the end: {os.getloadavg()[0]:.2f} (other processes share these CPUs)")
    if args.json_out:
        from stata_deploy.fileio import atomic_write_json

        atomic_write_json(args.json_out, res)
    print(C.headline(kv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
