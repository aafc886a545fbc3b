"""OPs ratio and energy ratio vs the unpruned model for STATA at gamma in {0.2, 0.5, 0.8, 1.0} (45nm and loihi).

    .venv/bin/python benchmarks/energy_table.py --base RUN_DIR [--limit 128]      # a trained run with an anchor token
    .venv/bin/python benchmarks/energy_table.py --train-epochs 3                  # trains a small base first

The same trained weights are evaluated at every gamma with dynamic STATA pruning (training-free; the paper fine-tunes
per gamma, so accuracies here are a lower bound), so the ratios isolate what pruning saves. Paper (Table 6):
gamma 0.2 -> 54.87 % OPs, 57.92 % power. Last line: key=value headline.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="Trained run folder (model with an anchor token, e.g. trained with --prune stata).")
    ap.add_argument("--train-epochs", type=int, default=3, help="Without --base: epochs to train a tiny base on digits.")
    ap.add_argument("--out", default="runs/energy_table_base")
    ap.add_argument("--gammas", default="0.2,0.5,0.8,1.0")
    ap.add_argument("--method", default="stata")
    ap.add_argument("--limit", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dataset", default=None, help="Test data (default: the dataset the base run was trained on).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from stata_deploy.train.checkpoint import load_model
    from stata_deploy.train.data import load_dataset
    from stata_deploy.energy.profiles import estimate_energy, load_profile
    from stata_deploy.inference import run_torch
    from stata_deploy.nn.model import build_model
    from stata_deploy.energy.counter import OpsReport, count_ops

    from stata_deploy.cli.train import check_data_fits

    base_dir = args.base
    if base_dir is None:
        from stata_deploy.train.loop import TrainConfig, train

        train(TrainConfig(dataset="digits", model="spikformer-tiny", prune="stata", keep=1.0, epochs=args.train_epochs,
                          out=args.out, progress=False), ds=load_dataset("digits"), log=lambda s: None)
        base_dir = args.out
    base, meta = load_model(base_dir)
    dataset = args.dataset or meta.get("train", {}).get("dataset") or "digits"  # the data the run was trained on
    ds = load_dataset(dataset, T=base.cfg.T)
    check_data_fits(base.cfg, ds)
    x, y = ds.x_test[: args.limit], ds.y_test[: args.limit]
    profiles = [load_profile("45nm"), load_profile("loihi")]
    rows = []
    for g in [float(v) for v in args.gammas.split(",")]:
        cfg = base.cfg.replace(prune={"method": args.method, "keep": g, "sites": None})
        model = build_model(cfg)
        model.load_state_dict(base.state_dict())
        model.eval()
        reps, correct = [], 0
        for i in range(0, len(x), 64):
            xb = torch.from_numpy(x[i : i + 64])
            res = run_torch(model, xb)
            reps.append(count_ops(cfg, res))
            correct += int((res.predictions == y[i : i + 64]).sum())
        rep = OpsReport.merge(reps)
        rows.append((g, rep, correct / len(y), [estimate_energy(rep, p).total_mj for p in profiles], cfg))
    ref = next(r for r in rows if r[0] == 1.0) if any(r[0] == 1.0 for r in rows) else rows[-1]
    print(f"base {base_dir}; {len(y)} {ds.name} test images; method {args.method} (dynamic), sites "
          f"{rows[0][4].prune.resolved_sites(rows[0][4].depth)}, depth {rows[0][4].depth}")
    print(f"{'gamma':>6s} {'acc':>6s} {'OPs/inf':>12s} {'OPs ratio':>9s} {'attn ops':>10s} {'E 45nm mJ':>11s} "
          f"{'ratio':>7s} {'E loihi mJ':>11s} {'ratio':>7s}")
    head = {}
    for g, rep, acc, (e45, elo), _ in rows:
        r_ops = rep.sops / ref[1].sops
        r45, rlo = e45 / ref[3][0], elo / ref[3][1]
        print(f"{g:6.2f} {acc:6.3f} {rep.sops:12,.0f} {r_ops:9.2%} {rep.attention_ops:10,.0f} {e45:11.4e} {r45:7.2%} "
              f"{elo:11.4e} {rlo:7.2%}")
        if g != 1.0:
            head[f"ops_g{g}"] = round(r_ops, 4)
            head[f"e45_g{g}"] = round(r45, 4)
            head[f"eloihi_g{g}"] = round(rlo, 4)
    print("paper Table 6 (CIFAR, 4-384): gamma 0.2 -> OPs 54.87 %, power 57.92 %")
    print(" ".join(f"{k}={v}" for k, v in head.items()))


if __name__ == "__main__":
    main()
