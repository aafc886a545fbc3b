"""Training throughput (images/s) of the paper-shaped presets on CPU (issue 2).

One training step = forward + cross-entropy backward + AdamW step on a random batch, T timesteps, direct encoding,
unpruned. ``--warmup`` steps are dropped; images/s = batch / median step time over ``--steps`` steps.
Default: spikformer-4-384 at 32x32, batch 32, and spikformer-8-768 at 224x224 with batch 4 (batch 32 at 224x224
would take minutes per step on 2 cores; override with --batch-8-768 32).

    python benchmarks/train_throughput.py
    python benchmarks/train_throughput.py --only spikformer-4-384 --steps 5
"""
from __future__ import annotations

import argparse
import json
import sys

import _common as C

PRESETS = {"spikformer-4-384": 32, "spikformer-8-768": 224}


def run(preset: str, img: int, batch: int, T: int, warmup: int, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from stata_deploy.config import make_config
    from stata_deploy.nn.model import build_model, count_params

    cfg = make_config(preset, img_size=img, in_channels=3, num_classes=10, T=T)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, img, img)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + steps):
        with C.Stopwatch() as sw:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).logits, y).backward()
            opt.step()
        print(f"#   {preset} step {i + 1}/{warmup + steps}: {sw.seconds:.2f} s{' (warmup)' if i < warmup else ''}",
              flush=True)
        if i >= warmup:
            times.append(sw.seconds)
    med = C.median(times)
    return {"preset": preset, "img": img, "batch": batch, "T": T, "params": count_params(model),
            "step_seconds": times, "median_step_s": med, "images_per_s": batch / med,
            "gmacs_fwd_per_image": C.count_macs(cfg).total / 1e9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, choices=list(PRESETS))
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--batch-4-384", type=int, default=32)
    ap.add_argument("--batch-8-768", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args(argv)
    C.ensure_malloc_env(args.malloc)
    import torch

    torch.set_num_threads(args.threads)
    print(f"# {C.utc()} torch {torch.__version__}, {args.threads} threads, malloc: {C.malloc_desc()}")
    batches = {"spikformer-4-384": args.batch_4_384, "spikformer-8-768": args.batch_8_768}
    results, kv = [], {}
    for preset, img in PRESETS.items():
        if args.only and preset != args.only:
            continue
        r = run(preset, img, batches[preset], args.T, args.warmup, args.steps)
        results.append(r)
        print(f"{preset}: {img}x{img}, T={args.T}, batch {r['batch']}, {r['params'] / 1e6:.2f}M params, "
              f"{r['gmacs_fwd_per_image']:.2f} GMACs/image fwd: median step {r['median_step_s']:.2f} s -> "
              f"{r['images_per_s']:.2f} images/s (forward+backward+AdamW)")
        short = preset.replace("spikformer-", "")
        kv[f"img_per_s_{short}"] = round(r["images_per_s"], 3)
        kv[f"batch_{short}"] = r["batch"]
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    print(C.headline(kv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
