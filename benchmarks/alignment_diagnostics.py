"""Do STATA's alignment losses move the model? Their size and their gradients next to the classification loss.

STATA (ICML 2024) adds two losses on the attention maps of the alignment sites (``stata_deploy.pruning.alignment``):
intra (per image, the maps of all timesteps and heads sorted by l2 norm: the weaker half pulled toward the stronger
half) and inter (the deepest site's head-mean map supervises each shallower one), weighted by ``intra_weight`` and
``inter_weight`` (default 1e-2 each). A claim like "+intra helps" needs the losses to reach the weights at all. For
each run, on ``--limit`` training images (eval-mode BatchNorm: nothing in the run changes), this script measures:

    ce            the training loss (cross-entropy with the run's label smoothing)
    intra, inter  each alignment loss, unweighted, and its weight
    g_ce          l2 norm of the gradient of ce over every parameter (surrogate gradients through the spikes)
    g_intra/g_ce  the weighted intra loss's gradient norm relative to ce's (same for inter): ~0 = no effect
    cos_intra     cosine between the weighted intra gradient and ce's (> 0 helps ce's descent, < 0 fights it)
    zero_maps     share of (image, timestep, head) attention maps that are all zero at the alignment sites
                  (intra pulls toward the top half; zero maps have no norm to sort by)

    python benchmarks/alignment_diagnostics.py RUN [RUN ...] [--limit 256] [--align intra,inter]

``--align`` measures the losses on a run trained without them (what they would have been at its weights). The last
line is key=value pairs (``<run>_<field>``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _flat_grad(model, loss):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def diagnose(model, x, y, label_smoothing: float) -> dict:
    """The measures of the module docstring for one model (its config's alignment settings) on images x, labels y."""
    import torch
    import torch.nn.functional as F

    from stata_deploy.pruning.alignment import inter_alignment, intra_alignment

    pr = model.cfg.prune
    captured = {}
    finish = model._finish

    def capture(x_, n_fixed, kept, maps, per_block):  # the attention maps the forward hands to the losses
        captured.update(maps)
        return finish(x_, n_fixed, kept, maps, per_block)

    model._finish = capture
    try:
        out = model(torch.as_tensor(x), align=True)
    finally:
        del model._finish
    if not captured:
        raise SystemExit("error: the run has no alignment sites (train with --align, or pass --align here)")
    order = sorted(captured)
    ce = F.cross_entropy(out.logits, torch.as_tensor(y), label_smoothing=label_smoothing)
    intra = sum(intra_alignment(captured[s]) for s in order)
    inter = inter_alignment([captured[s] for s in order[:-1]], captured[order[-1]]) if len(order) > 1 \
        else ce.new_zeros(())
    g_ce = _flat_grad(model, ce)
    res = dict(ce=ce.item(), intra=float(intra.detach()), inter=float(inter.detach()), w_intra=pr.intra_weight,
               w_inter=pr.inter_weight, g_ce=float(g_ce.norm()), sites=order)
    for name, loss, w in (("intra", intra, pr.intra_weight), ("inter", inter, pr.inter_weight)):
        if not loss.requires_grad:
            res[f"g_{name}/g_ce"], res[f"cos_{name}"] = 0.0, 0.0
            continue
        g = _flat_grad(model, w * loss)
        res[f"g_{name}/g_ce"] = float(g.norm() / g_ce.norm())
        res[f"cos_{name}"] = float(F.cosine_similarity(g, g_ce, dim=0)) if g.norm() > 0 else 0.0
    zero = torch.cat([captured[s].flatten(-2).abs().sum(-1).reshape(-1) == 0 for s in order])  # per map
    res["zero_maps"] = float(zero.double().mean())
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--limit", type=int, default=256, help="training images measured (one batch)")
    ap.add_argument("--align", default=None, help="e.g. intra,inter: measure these losses whatever the run used")
    a = ap.parse_args(argv)
    import torch

    from stata_deploy.cli.train import check_data_fits
    from stata_deploy.errors import StataError
    from stata_deploy.train.checkpoint import load_model
    from stata_deploy.train.data import load_dataset

    kv = {}
    for run in a.runs:
        try:
            model, meta = load_model(run)
            ds = load_dataset(meta["train"]["dataset"], T=model.cfg.T)
            check_data_fits(model.cfg, ds)
        except (StataError, KeyError) as e:
            print(f"error: {run}: {e}", file=sys.stderr)
            return 2
        if a.align is not None:
            align = [s for s in a.align.split(",") if s]
            model.cfg = dataclasses.replace(model.cfg, prune=dataclasses.replace(model.cfg.prune, align=align))
        model.eval()
        torch.manual_seed(0)
        x, y = ds.x_train[: a.limit], ds.y_train[: a.limit]
        d = diagnose(model, x, y, float(meta["train"].get("label_smoothing", 0.0)))
        name = Path(run).name
        print(f"\n{name}: {model.cfg.prune.method}, align {model.cfg.prune.align} at sites {d['sites']}, "
              f"{len(x)} training images")
        print(f"  ce {d['ce']:.4f} | intra {d['intra']:.4g} (x {d['w_intra']:g}) | inter {d['inter']:.4g} "
              f"(x {d['w_inter']:g}) | |grad ce| {d['g_ce']:.4g}")
        print(f"  weighted gradient / ce's: intra {d['g_intra/g_ce']:.3g} (cos {d['cos_intra']:+.3f}), "
              f"inter {d['g_inter/g_ce']:.3g} (cos {d['cos_inter']:+.3f}); all-zero attention maps "
              f"{d['zero_maps']:.3f}")
        kv.update({f"{name}_{k.replace('/', '_over_')}": round(v, 5) for k, v in d.items() if k != "sites"})
    print(" ".join(f"{k}={v}" for k, v in kv.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
