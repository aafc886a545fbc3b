"""Training-step speedup of STATA token pruning (issue 3): unpruned vs pruned at several keep ratios gamma.

A training step = forward + cross-entropy backward + AdamW step, on a fixed random batch (T timesteps, direct
encoding). All configurations live in ONE process with the same allocator settings and are timed A/B interleaved:
every round times every configuration once (the order rotates each round), the first ``--warmup`` rounds are
dropped, and the speedup is the median over rounds of the paired ratio base_time / pruned_time of that round
(robust to the machine's load drifting between rounds). Median absolute step times are printed as well.

Ideal speedup = the ratio of counted forward MACs (analytic counter in ``_common.py``, cross-checked with
``torch.utils.flop_counter.FlopCounterMode``) of the actual configurations: unpruned / pruned.

Peak memory: the RSS high-water mark is per process, so each configuration is measured in its own child process
(same interpreter, same malloc settings): build the model, run ``--mem-steps`` training steps, report
``ru_maxrss`` and the RSS before the first step. ``mem_ratio`` = pruned peak / unpruned peak (whole process,
including the interpreter, weights and AdamW state); ``step_mem_ratio`` uses peak minus the pre-step RSS.

    python benchmarks/train_speedup.py                                  # spikformer-4-384, 32x32, batch 32
    python benchmarks/train_speedup.py --preset spikformer-8-768 --img 224 --batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import _common as C

GAMMAS = (0.2, 0.4, 0.6, 0.8)


def build(args, gamma: float | None, method: str):
    import torch

    from stata_deploy.config import PruneConfig, make_config
    from stata_deploy.nn.model import build_model

    prune = PruneConfig() if gamma is None else PruneConfig(method=method, keep=gamma, sites=args.site_list)
    cfg = make_config(args.preset, img_size=args.img, in_channels=3, num_classes=args.classes, T=args.T, prune=prune)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return cfg, model, opt


def make_batch(args):
    import torch

    g = torch.Generator().manual_seed(123)
    x = torch.rand(args.batch, 3, args.img, args.img, generator=g)
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    return x, y


def step(model, opt, x, y) -> None:
    import torch.nn.functional as F

    opt.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out.logits, y).backward()
    opt.step()


def child_mem(args) -> None:
    """Child process: peak RSS of one configuration."""
    import torch

    torch.set_num_threads(args.threads)
    gamma = None if args.child_mem == "none" else float(args.child_mem)
    cfg, model, opt = build(args, gamma, args.method)
    x, y = make_batch(args)
    before = C.current_rss_bytes()
    for _ in range(args.mem_steps):
        step(model, opt, x, y)
    print(json.dumps({"peak_rss": C.peak_rss_bytes(), "rss_before": before}))


def measure_mem(args, label: str) -> dict | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-mem", label, "--preset", args.preset, "--img",
           str(args.img), "--batch", str(args.batch), "--T", str(args.T), "--threads", str(args.threads), "--method",
           args.method, "--mem-steps", str(args.mem_steps), "--malloc", args.malloc]
    if args.sites:
        cmd += ["--sites", args.sites]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        print(f"memory child {label} failed: {p.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_shape_args(ap)
    ap.add_argument("--method", default="stata", help="scorer for the pruned side (stata = timestep-wise)")
    ap.add_argument("--gammas", default=",".join(str(g) for g in GAMMAS))
    ap.add_argument("--sites", default="", help="pruning sites, e.g. 1 (default: the config's: every 3 blocks from L//3)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds dropped from the statistics")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="glibc malloc settings for this process and the memory children (same on both sides)")
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--mem-only", action="store_true", help="only the peak-memory child processes (no timing)")
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--json-out", default=None, help="also write the results to this JSON file")
    ap.add_argument("--child-mem", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    C.ensure_malloc_env(args.malloc)
    args.site_list = [int(s) for s in args.sites.split(",")] if args.sites else None
    if args.child_mem is not None:
        child_mem(args)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    gammas = [float(g) for g in args.gammas.split(",") if g.strip()]
    labels = ["none"] + [str(g) for g in gammas]
    print(f"# {C.utc()}  torch {torch.__version__}, {torch.get_num_threads()} threads, malloc: {C.malloc_desc()}")
    x, y = make_batch(args)
    confs = {}
    for lab in labels:
        cfg, model, opt = build(args, None if lab == "none" else float(lab), args.method)
        macs = C.count_macs(cfg)
        confs[lab] = dict(cfg=cfg, model=model, opt=opt, macs=macs, times=[], cpu_times=[])
    c0 = confs["none"]["cfg"]
    print(f"# {args.preset}: T={c0.T} img={args.img} batch={args.batch} dim={c0.dim} depth={c0.depth} "
          f"tokens={c0.num_image_tokens}; pruned side: {args.method}, sites "
          f"{confs[labels[-1]]['cfg'].prune.resolved_sites(c0.depth) if len(labels) > 1 else '-'}"
          f" ({'given' if args.site_list else 'default: every 3 blocks from L//3'})")
    for lab in labels:
        m = confs[lab]["macs"]
        print(f"#   {lab:>5}: tokens per block {m.tokens_per_block}, forward GMACs/sample {m.total / 1e9:.3f} "
              f"(stem {m.stem / 1e9:.3f})")
    # FlopCounterMode cross-check of the analytic count (one sample, forward).
    xc = x[:1]
    for lab in (labels[0], labels[1]) if len(labels) > 1 else (labels[0],):
        fc = C.flopcounter_macs(confs[lab]["model"], xc)
        an = confs[lab]["macs"].total + confs[lab]["macs"].scoring
        print(f"#   FlopCounterMode check {lab}: {fc / 1e9:.4f} vs analytic {an / 1e9:.4f} GMACs")

    rounds = 0 if args.mem_only else args.warmup + args.reps
    pair: dict[str, list[float]] = {lab: [] for lab in labels[1:]}
    pair_cpu: dict[str, list[float]] = {lab: [] for lab in labels[1:]}
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)]
        rt, ct = {}, {}
        for lab in order:
            c = confs[lab]
            with C.Stopwatch() as sw:
                step(c["model"], c["opt"], x, y)
            rt[lab] = sw.seconds
            ct[lab] = sw.cpu_seconds
            if r >= args.warmup:
                c["times"].append(sw.seconds)
                c["cpu_times"].append(sw.cpu_seconds)
        tag = "warmup" if r < args.warmup else "timed"
        print(f"# round {r + 1}/{rounds} ({tag}, {C.utc()}): " + ", ".join(f"{k}={rt[k]:.2f}s (cpu {ct[k]:.2f}s)" for k in labels),
              flush=True)
        if r >= args.warmup:
            for lab in labels[1:]:
                pair[lab].append(rt["none"] / rt[lab])
                pair_cpu[lab].append(ct["none"] / ct[lab])

    mem = {}
    if not args.no_mem:
        for lab in labels:
            mem[lab] = measure_mem(args, lab)

    base = confs["none"]
    if args.mem_only:
        print(f"\n{'gamma':>6} {'peak RSS GB':>11} {'mem ratio':>9} {'step-mem ratio':>14}")
        bm, kv = mem.get("none"), {}
        for lab in labels:
            m = mem.get(lab)
            if not (m and bm):
                continue
            mr = m["peak_rss"] / bm["peak_rss"]
            smr = (m["peak_rss"] - m["rss_before"]) / (bm["peak_rss"] - bm["rss_before"])
            print(f"{lab:>6} {m['peak_rss'] / 1e9:>11.2f} {mr:>9.2f} {smr:>14.2f}")
            if lab != "none":
                kv[f"mem_ratio_g{lab}"] = round(mr, 3)
                kv[f"step_mem_ratio_g{lab}"] = round(smr, 3)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump({"mem": mem, "malloc": C.malloc_desc(), "utc": C.utc()}, f, indent=2)
        print(C.headline(kv))
        return 0
    print()
    print(f"{'gamma':>6} {'step s':>8} {'speedup':>8} {'(min..max)':>13} {'cpu-speedup':>11} {'ideal':>6} {'sp/ideal':>8} "
          f"{'peak RSS GB':>11} {'mem ratio':>9} {'step-mem ratio':>14}")
    kv = {}
    res = {"preset": args.preset, "img": args.img, "batch": args.batch, "T": args.T, "threads": args.threads,
           "malloc": C.malloc_desc(), "method": args.method, "rounds_timed": args.reps, "utc": C.utc(), "rows": []}
    bm = mem.get("none")
    print(f"{'1.0':>6} {C.median(base['times']):>8.2f} {'1.00':>8} {'':>13} {'1.00':>11} {'1.00':>6} {'':>8} "
          f"{(bm['peak_rss'] / 1e9 if bm else float('nan')):>11.2f} {'1.00':>9} {'1.00':>14}")
    for lab in labels[1:]:
        c = confs[lab]
        sp = C.median(pair[lab])
        ideal = base["macs"].total / c["macs"].total
        m = mem.get(lab)
        mr = m["peak_rss"] / bm["peak_rss"] if (m and bm) else float("nan")
        smr = ((m["peak_rss"] - m["rss_before"]) / (bm["peak_rss"] - bm["rss_before"])) if (m and bm) else float("nan")
        rng = f"{min(pair[lab]):.2f}..{max(pair[lab]):.2f}"
        cps = C.median(pair_cpu[lab])
        print(f"{lab:>6} {C.median(c['times']):>8.2f} {sp:>8.2f} {rng:>13} {cps:>11.2f} {ideal:>6.2f} {sp / ideal:>8.2f} "
              f"{(m['peak_rss'] / 1e9 if m else float('nan')):>11.2f} {mr:>9.2f} {smr:>14.2f}")
        g = lab
        kv[f"speedup_g{g}"] = round(sp, 3)
        kv[f"ideal_g{g}"] = round(ideal, 3)
        kv[f"frac_g{g}"] = round(sp / ideal, 3)
        kv[f"cpu_speedup_g{g}"] = round(cps, 3)
        if m and bm:
            kv[f"mem_ratio_g{g}"] = round(mr, 3)
        res["rows"].append({"gamma": float(lab), "speedup_median_paired": sp, "speedup_rounds": pair[lab],
                            "step_seconds": c["times"], "cpu_speedup_median_paired": cps,
                            "cpu_speedup_rounds": pair_cpu[lab], "step_cpu_seconds": c["cpu_times"], "ideal": ideal, "fraction_of_ideal": sp / ideal,
                            "tokens_per_block": c["macs"].tokens_per_block, "gmacs": c["macs"].total / 1e9,
                            "mem": m, "mem_ratio": mr, "step_mem_ratio": smr})
    res["base"] = {"step_seconds": base["times"], "step_cpu_seconds": base["cpu_times"], "gmacs": base["macs"].total / 1e9, "mem": bm}
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump(res, f, indent=2)
    kv["base_step_s"] = round(C.median(base["times"]), 3)
    print(C.headline(kv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
