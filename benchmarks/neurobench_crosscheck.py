"""Cross-check our op counter against NeuroBench 2.3's SynapticOperations on the same model and inputs.

Run it in the separate NeuroBench venv (NeuroBench pulls snntorch, tonic, torchaudio: never into .venv):

    bash scripts/install_neurobench.sh            # creates .venv-nb
    .venv-nb/bin/python benchmarks/neurobench_crosscheck.py [--run RUN_DIR] [--limit 32]

NeuroBench hooks only nn.Linear / nn.Conv*: per forward call, AC if every input value is in {-1, 0, 1} else MAC;
Effective = nonzero(input) x nonzero(weight) products (bias excluded), divided by the number of samples.
Our counter: ``events`` (nonzero input x fan-out) of every Conv/Linear must equal NeuroBench's Effective_ACs +
Effective_MACs exactly (weights are non-zero). Where our AC/MAC split and totals differ, the script says why.
Last line: key=value headline.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def build(args, attention, prune):
    from stata_deploy.train.checkpoint import load_model
    from stata_deploy.config import PruneConfig, make_config
    from stata_deploy.nn.model import build_model

    if args.run:
        model, _ = load_model(args.run)
        return model
    torch.manual_seed(args.seed)
    cfg = make_config("spikformer-tiny", attention=attention, depth=2, prune=PruneConfig(**prune))
    model = build_model(cfg).eval()
    with torch.no_grad():  # untrained weights, livelier BN so every layer spikes (30-60 % firing)
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.weight.mul_(2.0)
                m.bias.uniform_(0.0, 2.5)
    return model


def neurobench_counts(model, x, y):
    from neurobench.metrics.utils.layers import single_layer_MACs
    from neurobench.metrics.workload import SynapticOperations
    from neurobench.models import TorchModel

    nb = TorchModel(model)
    nb.register_hooks()
    names = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad():
        preds = nb(x)
        per_layer = {}
        for hook in nb.connection_hooks:  # the same per-call computation SynapticOperations does, kept per layer
            name = names[id(hook.layer)]
            name = name[: -len(".linear")] if name.endswith(".linear") else name
            name = name[: -len(".conv")] if name.endswith(".conv") else name  # ConvBN.conv -> our layer name
            ops, spiking = 0, True
            for inp in hook.inputs:
                o, s = single_layer_MACs(inp[0] if len(inp) == 1 else inp, hook.layer)
                ops += o
                spiking = spiking and bool(s)
            per_layer[name] = (ops / len(y), "AC" if spiking else "MAC")
        metric = SynapticOperations()
        total = metric(nb, preds, (x, y))
    nb.cleanup_hooks()
    return total, per_layer


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="A trained run folder (default: untrained tiny models, 4 variants).")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)

    from stata_deploy.train.data import load_dataset
    from stata_deploy.inference import run_torch
    from stata_deploy.energy.counter import count_ops

    ds = load_dataset("digits")
    x = torch.from_numpy(ds.x_test[: args.limit])
    y = torch.from_numpy(ds.y_test[: args.limit])
    variants = [("run", None, None)] if args.run else [
        ("ssa", "ssa", dict(method="none")),
        ("ssa-stata0.5", "ssa", dict(method="stata", keep=0.5)),
        ("sdsa", "sdsa", dict(method="none")),
        ("a2os2a", "a2os2a", dict(method="none")),
    ]
    headline = {}
    all_match = True
    for tag, attention, prune in variants:
        model = build(args, attention, prune)
        nb_total, nb_layers = neurobench_counts(model, x, y)
        rep = count_ops(model.cfg, run_torch(model, x))
        print(f"\n== {tag}: {args.limit} digits test images, per sample ==")
        print(f"{'layer':24s} {'NB kind':7s} {'NB effective':>13s} {'our events':>12s} {'our ACs':>12s} {'our MACs':>11s}  note")
        ours_events = 0.0
        mism = 0
        for name, (nb_ops, kind) in nb_layers.items():
            lo = rep.layer(name)
            ours_events += lo.events
            same = abs(lo.events - nb_ops) < 1e-6 * max(1.0, nb_ops)
            mism += not same
            note = "" if same else "MISMATCH"
            if kind == "MAC" and lo.acs > 0:
                note += " NB: MAC (residual integers / anchor row); ours: value-weighted ACs" + (
                    f" + {lo.macs:,.0f} MACs (anchor row)" if lo.macs else "")
            elif lo.acs + lo.macs != lo.events:
                note += " value-weighted"
            print(f"{name:24s} {kind:7s} {nb_ops:13,.1f} {lo.events:12,.1f} {lo.acs:12,.1f} {lo.macs:11,.1f}  {note}")
        nb_eff = nb_total["Effective_ACs"] + nb_total["Effective_MACs"]
        conv_lin = [l for l in rep.layers if l.kind in ("conv", "linear", "head")]
        ours_acmac = sum(l.acs + l.macs for l in conv_lin)
        match = abs(nb_eff - ours_events) < 1e-6 * max(1.0, nb_eff) and mism == 0
        all_match &= match
        print(f"NeuroBench: Effective_ACs {nb_total['Effective_ACs']:,.1f}  Effective_MACs {nb_total['Effective_MACs']:,.1f}"
              f"  sum {nb_eff:,.1f}  Dense {nb_total['Dense']:,.1f}")
        print(f"ours (Conv/Linear): events {ours_events:,.1f} ({'EQUAL' if match else 'DIFFERENT'}); "
              f"ACs {sum(l.acs for l in conv_lin):,.1f} + MACs {sum(l.macs for l in conv_lin):,.1f} = {ours_acmac:,.1f} "
              f"(value-weighted: x{ours_acmac / max(1.0, ours_events):.3f} of events)")
        extra = rep.sops - ours_acmac
        print(f"not seen by NeuroBench: attention ops {rep.attention_ops:,.1f} ({rep.attention_ops / rep.sops:.1%} of our total "
              f"{rep.sops:,.1f}); head token-pool ACs {rep.layer('head.pool').acs:,.1f}; scorer ops "
              f"{sum(l.ops for l in rep.layers if l.kind == 'scorer'):,.1f}; (extra {extra:,.1f})")
        print(f"NeuroBench AC/MAC split: AC {nb_total['Effective_ACs']:,.1f} / MAC {nb_total['Effective_MACs']:,.1f}; ours "
              f"AC {rep.acs:,.1f} / MAC {rep.macs:,.1f}: NeuroBench calls every layer fed by the residual stream (values"
              f" 0..2+2L) a MAC layer; we count those spike counts as value-weighted ACs")
        key = tag.replace("-", "_").replace(".", "")
        headline[f"{key}_nb_effective"] = round(nb_eff, 1)
        headline[f"{key}_ours_events"] = round(ours_events, 1)
        headline[f"{key}_attn_share"] = round(rep.attention_ops / rep.sops, 4)
    print()
    print(" ".join(f"{k}={v}" for k, v in headline.items()) + f" match={int(all_match)}")


if __name__ == "__main__":
    main()
