"""DDP scaling on this machine: the same training (digits, spikformer-tiny, same global batch, same seed) in 1 and in
2 processes (torch.distributed, gloo, one thread per process), wall times and final accuracy side by side.

    .venv/bin/python benchmarks/ddp_scaling.py [--epochs 3] [--train-limit 0] [--batch-size 64]

Last line: key=value pairs (wall_1p, wall_2p, speedup, acc_1p, acc_2p, acc_diff).
Both runs are started through `stata-deploy train` (the 2-process one with --nproc 2, which sets up the same
environment as torchrun). With 2 shared cores, the speedup is bounded by what the other processes on the machine use.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(nproc: int, out: Path, args) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "stata_deploy", "train", "--dataset", "digits", "--model", "spikformer-tiny",
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--threads", "1", "--quiet", "--json", "--out", str(out), "--nproc", str(nproc)]
    if args.train_limit:
        cmd += ["--train-limit", str(args.train_limit)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{nproc}-process run failed: {r.stderr.strip().splitlines()[-1:]}")
    return wall, json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64, help="global batch (split over the processes)")
    ap.add_argument("--train-limit", type=int, default=0, help="0 = all 1437 training digits")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for n in (1, 2):
            wall, m = run(n, Path(d) / f"p{n}", args)
            res[n] = (wall, m)
            print(f"{n} process(es): wall {wall:.1f} s (train {m['train_seconds']:.1f} s), "
                  f"test accuracy {m['test_accuracy']:.4f}, world_size {m['world_size']}, global batch {m['global_batch']}",
                  flush=True)
    (w1, m1), (w2, m2) = res[1], res[2]
    print(f"epochs={args.epochs} global_batch={args.batch_size} wall_1p={w1:.1f} wall_2p={w2:.1f} "
          f"train_1p={m1['train_seconds']:.1f} train_2p={m2['train_seconds']:.1f} speedup={m1['train_seconds'] / m2['train_seconds']:.2f} "
          f"acc_1p={m1['test_accuracy']:.4f} acc_2p={m2['test_accuracy']:.4f} "
          f"acc_diff={m2['test_accuracy'] - m1['test_accuracy']:+.4f}")


if __name__ == "__main__":
    main()
