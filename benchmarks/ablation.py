"""Scorer ablation on Fashion-MNIST (the paper's Table 1/5 in miniature) + TP training-free pruning.

Trains the ``spikformer-small`` preset with every token scorer at the same keep ratio over several seeds, each run
through ``stata_deploy.train.train`` (the API the CLI wraps; one child process per run, ``--threads`` each, ``--workers`` in
parallel), then applies TP-Spikformer training-free pruning (``stata-deploy prune RUN --method tp --keep K``) to the
trained unpruned checkpoints. Completed runs (``metrics.json`` present with the same recipe) are reused, so the
script can be re-run to extend seeds or rebuild the table (``--table-only``).

    python benchmarks/ablation.py --seeds 0,1 --epochs 1 --train-limit 6000 --workers 3
    python benchmarks/ablation.py --table-only

Writes ``OUT/results.json`` and prints the table; the last line is ``key=value`` pairs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "stata_deploy"]
METHODS = ("none", "stata", "anchor", "random", "l1", "ssa")


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}_s{seed}"


def train_cmd(a, method: str, seed: int) -> list[str]:
    """One run = this script in --child mode (a thin wrapper over stata_deploy.train.train, which the CLI also wraps;
    the child mode exists only to set warmup_epochs, which the CLI does not expose)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, str(seed), "--dataset", a.dataset,
           "--model", a.model, "--epochs", str(a.epochs), "--warmup-epochs", str(a.warmup_epochs), "--batch-size",
           str(a.batch_size), "--lr", str(a.lr), "--threads", str(a.threads), "--keep", str(a.keep), "--stata-align",
           a.stata_align, "--out", str(a.out)]
    if a.train_limit:
        cmd += ["--train-limit", str(a.train_limit)]
    return cmd


def child(a, method: str, seed: int) -> None:
    import torch

    from stata_deploy.train import TrainConfig, train

    torch.set_num_threads(a.threads)
    align = a.stata_align.split(",") if (method == "stata" and a.stata_align) else []
    tc = TrainConfig(dataset=a.dataset, model=a.model, out=str(run_dir(Path(a.out), method, seed)), epochs=a.epochs,
                     batch_size=a.batch_size, lr=a.lr, warmup_epochs=a.warmup_epochs, seed=seed, prune=method,
                     keep=a.keep if method != "none" else 1.0, align=align, train_limit=a.train_limit or None,
                     progress=False)
    m = train(tc, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(m))


def recipe(a, method: str, seed: int) -> dict:
    return {"dataset": a.dataset, "model": a.model, "epochs": a.epochs, "warmup_epochs": a.warmup_epochs,
            "batch_size": a.batch_size, "lr": a.lr,
            "seed": seed, "train_limit": a.train_limit, "prune": method,
            "keep": a.keep if method != "none" else 1.0,
            "align": (a.stata_align.split(",") if (method == "stata" and a.stata_align) else [])}


def done(d: Path, rec: dict) -> bool:
    try:
        r = json.loads((d / "recipe.json").read_text())
        return r == rec and (d / "metrics.json").is_file()  # metrics.json is written only when training ends
    except (OSError, ValueError):
        return False


def run_one(a, method: str, seed: int, log) -> None:
    d = run_dir(Path(a.out), method, seed)
    rec = recipe(a, method, seed)
    if done(d, rec):
        log(f"[skip] {d.name}: already trained")
        return
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").unlink(missing_ok=True)
    cmd = train_cmd(a, method, seed)
    (d / "recipe.json").write_text(json.dumps(rec))
    (d / "command.txt").write_text(" ".join(cmd) + "\n")
    log(f"[start] {d.name}: {' '.join(cmd)}")
    t0 = time.time()
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    with open(d / "train.log", "w") as lf:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=lf, text=True, cwd=ROOT, env=env)
    if p.returncode != 0:
        log(f"[fail] {d.name}: exit {p.returncode}; see {d / 'train.log'}")
        return
    m = json.loads(p.stdout.strip().splitlines()[-1])
    log(f"[done] {d.name}: acc={m['test_accuracy']:.4f} train_s={m['train_seconds']:.0f} wall_s={time.time() - t0:.0f}")


def tp_one(a, seed: int, keep: float, log) -> dict | None:
    base = Path(a.tp_from.format(seed=seed)) if a.tp_from else run_dir(Path(a.out), "none", seed)
    if not (base / "metrics.json").is_file():
        return None
    d = Path(a.out) / f"tp_s{seed}_k{keep}"
    res_file = d / "tp_result.json"
    if res_file.is_file():
        return json.loads(res_file.read_text())
    cmd = CLI + ["prune", str(base), "--method", "tp", "--keep", str(keep), "--out", str(d), "--json",
                 "--threads", str(a.threads)]
    if a.tp_limit:
        cmd += ["--limit", str(a.tp_limit)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
    if p.returncode != 0:
        log(f"[fail] tp s{seed} k{keep}: {p.stderr.strip().splitlines()[-1:]}")
        return None
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r.update(seed=seed, command=" ".join(cmd[2:]))
    res_file.write_text(json.dumps(r))
    log(f"[tp] s{seed} keep={keep}: acc={r['test_accuracy']:.4f} (unpruned {r['baseline_accuracy']:.4f}) "
        f"token_ratio={r['token_ratio']:.3f}")
    return r


def fmt(vals: list[float], scale: float = 100.0, nd: int = 2) -> str:
    if not vals:
        return "-"
    m = statistics.mean(vals) * scale
    s = statistics.stdev(vals) * scale if len(vals) > 1 else 0.0
    return f"{m:.{nd}f} ± {s:.{nd}f}"


def collect(a) -> dict:
    out = Path(a.out)
    rows = {}
    for method in METHODS:
        accs, secs, seeds = [], [], []
        for seed in a.seed_list:
            d = run_dir(out, method, seed)
            if done(d, recipe(a, method, seed)):
                m = json.loads((d / "metrics.json").read_text())
                accs.append(m["test_accuracy"])
                secs.append(m["train_seconds"])
                seeds.append(seed)
        rows[method] = {"accuracy": accs, "train_seconds": secs, "seeds": seeds,
                        "command": " ".join(train_cmd(a, method, 0)[1:])}
    tp = []
    for seed in a.tp_seed_list:
        for k in a.tp_keep_list:
            f = out / f"tp_s{seed}_k{k}" / "tp_result.json"
            if f.is_file():
                tp.append(json.loads(f.read_text()))
    return {"recipe": {k: v for k, v in vars(a).items() if k not in ("seed_list", "tp_keep_list", "tp_seed_list")}, "methods": rows,
            "tp": tp}


def print_table(res: dict, a) -> str:
    rows = res["methods"]
    base = rows["none"]["accuracy"]
    base_m = statistics.mean(base) if base else None
    print(f"\nFashion-MNIST, {a.model}, keep (gamma) {a.keep}, {a.epochs} epochs, "
          f"train images {a.train_limit or 'all'}, test images 10000; accuracy % mean ± std over seeds")
    print(f"{'method':<22}{'seeds':>6}  {'accuracy %':>16}  {'Δ vs none':>10}  {'train s':>9}")
    kv = []
    for method in METHODS:
        r = rows[method]
        label = method + (f" (+{a.stata_align})" if method == "stata" and a.stata_align else "")
        acc = r["accuracy"]
        delta = f"{(statistics.mean(acc) - base_m) * 100:+.2f}" if (acc and base_m is not None) else "-"
        secs = f"{statistics.mean(r['train_seconds']):.0f}" if r["train_seconds"] else "-"
        print(f"{label:<22}{len(acc):>6}  {fmt(acc):>16}  {delta:>10}  {secs:>9}")
        if acc:
            kv.append(f"acc_{method}={statistics.mean(acc) * 100:.2f}")
    if res["tp"]:
        print("\nTP-Spikformer training-free pruning of the trained unpruned runs (blocks >= depth//3 pruned, "
              "unselected tokens skip the block)")
        print(f"(test images per evaluation: {res['tp'][0]['samples']})")
        print(f"{'seed':>4} {'keep':>6} {'accuracy %':>11} {'unpruned %':>11} {'token-blocks':>13} {'ratio':>7}")
        by_keep: dict[float, list[float]] = {}
        for r in sorted(res["tp"], key=lambda r: (r["seed"], -r["keep"])):
            print(f"{r['seed']:>4} {r['keep']:>6} {r['test_accuracy'] * 100:>11.2f} {r['baseline_accuracy'] * 100:>11.2f} "
                  f"{r['token_blocks']:>6}/{r['token_blocks_unpruned']:<6} {r['token_ratio']:>7.3f}")
            by_keep.setdefault(r["keep"], []).append(r["test_accuracy"])
        for k, v in sorted(by_keep.items(), reverse=True):
            kv.append(f"acc_tp_k{k}={statistics.mean(v) * 100:.2f}")
    return " ".join(kv)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--model", default="spikformer-small")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--stata-align", default="intra,inter", help="alignment losses for the stata rows ('' = none)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--warmup-epochs", type=int, default=0, help="0 = cosine decay from the first step")
    ap.add_argument("--train-limit", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    ap.add_argument("--workers", type=int, default=3, help="training processes in parallel")
    ap.add_argument("--tp-keep", default="0.9,0.7,0.5,0.3")
    ap.add_argument("--tp-from", default=None, help="unpruned run(s) for TP, '{seed}' expands (default: OUT/none_s{seed})")
    ap.add_argument("--tp-limit", type=int, default=None, help="evaluate TP on the first N test images only")
    ap.add_argument("--tp-seeds", default=None, help="seeds of the unpruned runs TP prunes (default: --seeds)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "ablation"))  # gitignored
    ap.add_argument("--table-only", action="store_true", help="do not train; print the table of finished runs")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a, a.child[0], int(a.child[1]))
        return 0
    a.seed_list = [int(s) for s in a.seeds.split(",") if s.strip()]
    a.tp_seed_list = [int(s) for s in (a.tp_seeds or a.seeds).split(",") if s.strip()]
    a.tp_keep_list = [float(k) for k in a.tp_keep.split(",") if k.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    Path(a.out).mkdir(parents=True, exist_ok=True)

    def log(s):
        print(f"{time.strftime('%H:%M:%S')} {s}", flush=True)

    if not a.table_only:
        # seed-major order: the first seed of every method finishes before the next seed starts
        jobs = [(m, s) for s in a.seed_list for m in methods]
        with ThreadPoolExecutor(max_workers=a.workers) as pool:
            list(pool.map(lambda j: run_one(a, j[0], j[1], log), jobs))
        for s in a.tp_seed_list:
            for k in a.tp_keep_list:
                tp_one(a, s, k, log)
    res = collect(a)
    (Path(a.out) / "results.json").write_text(json.dumps(res, indent=2))
    kv = print_table(res, a)
    print(f"results written to {Path(a.out) / 'results.json'}")
    print(kv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
