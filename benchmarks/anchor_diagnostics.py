"""Does the anchor decide what STATA keeps? Per timestep, on trained runs: how often the anchor token's spiking Q is
silent, how many kept tokens the activity tie-break decided, and how close the kept set is to plain activity top-k.

STATA scores token j at timestep t by the anchor's attention row, mean over heads of (Q_anchor,t . K_j,t) * scale
(``stata_deploy.pruning.scorers.score_stata``). Q and K are binary spikes, so the row is a multiple of scale/heads and
is exactly 0 for every token when the anchor's Q does not fire at t. Ties are broken by token activity (the l1 of the
token over channels, ``_tie_break``), which can never reorder distinct anchor scores. This script measures, for each
run (``--prune stata`` or ``anchor``), on the first ``--limit`` test images, at the (first) pruning site:

    q_silent    share of images whose anchor Q is all zero at t (every head): the anchor row is 0 for all tokens
    q_rate      firing rate of the anchor's Q at t (over heads and channels)
    tie_kept    share of kept image tokens whose anchor score equals the best DROPPED token's anchor score: without
                the tie-break they would be a coin toss; with it, activity decided them
    vs_l1       overlap |kept ∩ activity top-k| / k at t (activity = the tie-break's own l1, at the same timestep):
                1.0 means STATA kept exactly what activity alone keeps
    jaccard0    Jaccard index of the kept set at t with the kept set at t = 0 (timestep-wise sets differ where < 1)

    python benchmarks/anchor_diagnostics.py RUN [RUN ...] [--dataset fashion-mnist] [--limit 500]

The last line is key=value pairs (per run and timestep: ``<run>_t<t>_<field>``, shares in 0..1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def record_scorer_inputs(model, x):
    """Run ``model`` on x with its own scorer wrapped: returns (calls, output), calls = [(x_slots, info, scores)]
    for every pruning-site call in order (the scorer itself is unchanged)."""
    import torch

    import stata_deploy.nn.model as model_mod

    calls = []
    real = model_mod.SCORERS

    class Recorder:
        def get(self, name):
            fn = real.get(name)

            def wrapped(xs, info, **kw):
                scores, tw = fn(xs, info, **kw)
                calls.append((xs.detach(), info, scores.detach(), tw))
                return scores, tw

            return wrapped

    model_mod.SCORERS = Recorder()
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(x))
    finally:
        model_mod.SCORERS = real
    return calls, out


def diagnose(model, x) -> dict:
    """Per-timestep diagnostics (lists of length T) at the first pruning site of ``model`` on images x."""
    import torch

    from stata_deploy.pruning.scorers import num_keep, top_indices

    cfg = model.cfg
    if cfg.prune.method not in ("stata", "anchor") or not cfg.anchor:
        raise SystemExit(f"error: {cfg.prune.method!r} runs have no anchor token to diagnose (use stata or anchor runs)")
    calls, _ = record_scorer_inputs(model, x)
    xs, info, scores, tw = calls[0]  # the scorer's own inputs and output at the first site
    T, B, n, _ = xs.shape
    k = num_keep(n - 1, cfg.prune.keep)
    row = info.anchor_row()  # (T, B, n): the anchor's attention row, no tie-break
    if cfg.prune.method == "anchor":
        row = row.mean(0, keepdim=True).expand(T, B, n)  # AT: one row for every timestep
    qa = info.q[:, :, :, 0]  # (T, B, H, dh): the anchor's Q spikes
    act = xs.abs().sum(-1)  # (T, B, n)
    if not tw:
        scores = scores.unsqueeze(0).expand(T, B, n)
    img = slice(1, None)  # slot 0 is the anchor, always kept
    out = {f: [] for f in ("q_silent", "q_rate", "tie_kept", "vs_l1", "jaccard0")}
    kept0 = None
    for t in range(T):
        top = top_indices(scores[t, :, img], k)  # (B, k) image-slot indices, the model's tie rule
        kept = torch.zeros(B, n - 1, dtype=torch.bool).scatter_(1, top, True)
        r = row[t, :, img]
        best_dropped = torch.where(kept, torch.full_like(r, -torch.inf), r).amax(-1, keepdim=True)
        tie = (r == best_dropped) & kept
        l1 = torch.zeros_like(kept).scatter_(1, top_indices(act[t, :, img], k), True)
        kept0 = kept if kept0 is None else kept0
        inter = (kept & kept0).sum(-1).double()
        union = (kept | kept0).sum(-1).double()
        out["q_silent"].append(float((qa[t].reshape(B, -1).sum(-1) == 0).double().mean()))
        out["q_rate"].append(float(qa[t].double().mean()))
        out["tie_kept"].append(float(tie.sum() / kept.sum()))
        out["vs_l1"].append(float((kept & l1).sum() / kept.sum()))
        out["jaccard0"].append(float((inter / union).mean()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--dataset", default=None, help="default: the run's own dataset")
    ap.add_argument("--limit", type=int, default=500)
    a = ap.parse_args(argv)
    import torch

    from stata_deploy.errors import StataError
    from stata_deploy.cli.train import _load_eval_data, check_data_fits
    from stata_deploy.train.checkpoint import load_model

    kv = {}
    for run in a.runs:
        try:
            model, meta = load_model(run)
            ds = _load_eval_data(meta, a.dataset, model.cfg.T)  # the run's own dataset unless --dataset
            check_data_fits(model.cfg, ds)
        except StataError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        model.eval()
        x = ds.x_test[: a.limit]
        torch.manual_seed(0)
        d = diagnose(model, x)
        name = Path(run).name
        print(f"\n{name}: {model.cfg.prune.method}, keep {model.cfg.prune.keep}, {len(x)} test images, site "
              f"{model.cfg.prune.resolved_sites(model.cfg.depth)[0]}")
        print(f"{'t':>3}" + "".join(f"{f:>10}" for f in d))
        for t in range(len(d["q_silent"])):
            print(f"{t:>3}" + "".join(f"{d[f][t]:>10.3f}" for f in d))
            kv.update({f"{name}_t{t}_{f}": round(d[f][t], 3) for f in d})
    print(" ".join(f"{k}={v}" for k, v in kv.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
