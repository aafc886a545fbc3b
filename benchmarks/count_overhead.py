"""Counting overhead: torch inference alone vs inference + recording + count_ops, side by side (A/B interleaved).

    .venv/bin/python benchmarks/count_overhead.py [--run RUN_DIR] [--batch 64] [--repeats 7]

The requirement: counting must not slow inference by more than 2x. Last line: key=value headline.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def lively(model):
    with torch.no_grad():  # untrained weights with livelier BN: 30-60 % firing, like a trained model or denser
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.mul_(2.0)
                m.bias.uniform_(0.0, 2.5)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=None, help="Run folder(s) (default: tiny SSA, unpruned and STATA 0.5).")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from stata_deploy.train.checkpoint import load_model
    from stata_deploy.config import PruneConfig, make_config
    from stata_deploy.train.data import load_dataset
    from stata_deploy.inference import run_torch
    from stata_deploy.nn.model import build_model
    from stata_deploy.energy.counter import count_ops

    models = {}
    if args.run:
        for r in args.run:
            models[Path(r).name] = load_model(r)[0]
    else:
        for tag, att, prune in [("ssa", "ssa", dict(method="none")), ("ssa_stata0.5", "ssa", dict(method="stata", keep=0.5)),
                                ("sdsa", "sdsa", dict(method="none")), ("a2os2a", "a2os2a", dict(method="none"))]:
            torch.manual_seed(0)
            models[tag] = lively(build_model(make_config("spikformer-tiny", attention=att, prune=PruneConfig(**prune))))
    ds = load_dataset("digits")
    x = torch.from_numpy(ds.x_test[: args.batch])
    head = {}
    for tag, model in models.items():
        for _ in range(2):  # warm-up both paths
            run_torch(model, x, record=False)
            count_ops(model.cfg, run_torch(model, x))
        a, b, c = [], [], []
        for _ in range(args.repeats):  # interleaved A/B
            t0 = time.perf_counter()
            run_torch(model, x, record=False)
            t1 = time.perf_counter()
            res = run_torch(model, x, record=True)
            t2 = time.perf_counter()
            count_ops(model.cfg, res)
            t3 = time.perf_counter()
            a.append(t1 - t0)
            b.append(t3 - t1)
            c.append(t3 - t2)
        ma, mb, mc = statistics.median(a), statistics.median(b), statistics.median(c)
        ratio = mb / ma
        print(f"{tag:14s} batch {args.batch}: inference {ma * 1e3:8.1f} ms | inference + record + count {mb * 1e3:8.1f} ms "
              f"(count_ops alone {mc * 1e3:7.1f} ms) -> {ratio:.2f}x  [medians of {args.repeats}, interleaved]")
        head[f"overhead_{tag.replace('.', '')}"] = round(ratio, 3)
    worst = max(head.values())
    print(" ".join(f"{k}={v}" for k, v in head.items()) + f" overhead_max={worst} within_2x={int(worst <= 2.0)}")


if __name__ == "__main__":
    main()
