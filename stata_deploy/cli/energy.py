"""energy: synaptic-operation counts and energy per inference on a hardware profile, vs an unpruned baseline."""
from __future__ import annotations

import math
from pathlib import Path

import click

from .main import emit, main, set_threads, threads_option
from ..errors import StataError


PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _set_ratio(res: dict, key: str, a: float, b: float, why_undefined: str) -> None:
    """res[key] = a / b, or None with the reason in res['null_reasons'] (strict JSON has no NaN)."""
    r = a / b if b else math.nan
    if math.isfinite(r):
        res[key] = r
    else:
        res[key] = None
        res.setdefault("null_reasons", {})[key] = why_undefined


def _fmt_ratio(r) -> str:
    return "undefined" if r is None else f"{r:.4f}"


def _masks_for(run: str, model, mode: str, weights_sha256: str | None = None):
    """Static masks (RUN/masks.json) when asked for and the model prunes; None means dynamic pruning."""
    if mode != "static" or not model.cfg.prune.active:
        return None
    from ..train.checkpoint import resolve_run
    from ..pruning.masks import TokenMasks

    p = resolve_run(run) / "masks.json"
    if not p.is_file():
        raise StataError(f"--masks static needs {p}: run `stata-deploy calibrate {run}` first")
    masks = TokenMasks.load(p)
    masks.check_weights(weights_sha256, p, run)
    masks.check_model(model.cfg)
    return masks


def measure(run: str, x, y, masks_mode: str = "dynamic", batch_size: int = 64, progress: bool = False):
    """Run the torch reference on x and count ops. Returns (model, OpsReport, accuracy, masks)."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from ..train.checkpoint import load_model
    from ..inference import run_torch
    from ..energy.counter import OpsReport, count_ops

    model, meta = load_model(run)
    masks = _masks_for(run, model, masks_mode, meta.get("weights_sha256"))
    reports, correct = [], 0
    n = len(x)
    for i in tqdm(range(0, n, batch_size), desc=f"count {Path(run).name}", disable=not progress, leave=False):
        xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size]))
        if xb.dim() == 5:
            xb = xb.transpose(0, 1)  # (B, T, C, H, W) event sequences -> (T, B, C, H, W)
        res = run_torch(model, xb, masks=masks)
        reports.append(count_ops(model.cfg, res, masks))
        correct += int((res.predictions == y[i : i + batch_size]).sum())
    return model, OpsReport.merge(reports), correct / max(1, n), masks


def _summary(rep, en, acc, masks) -> dict:
    return {
        "energy_mj": en.total_mj,
        "macs": rep.macs,
        "acs": rep.acs,
        "attention_ops": rep.attention_ops,
        "attention_acs": rep.attention_acs,
        "attention_macs": rep.attention_macs,
        "compares": rep.compares,
        "neuron_updates": rep.neuron_updates,
        "idle_neuron_updates": rep.idle_neuron_updates,
        "spikes": rep.spikes,
        "firing_rate": rep.firing_rate,
        "sops": rep.sops,
        "events": rep.events,
        "accuracy": acc,
        "masks": "static" if masks is not None else "dynamic",
        "energy_by_op_mj": en.by_op_mj,
    }


def _layers(rep, en) -> list[dict]:
    out = []
    for l, e in zip(rep.layers, en.layers):
        d = l.to_dict()
        d["energy_mj"] = e["energy_mj"]
        d["energy_by_op_mj"] = e["by_op_mj"]
        out.append(d)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (v == 0 or 1e-2 <= abs(v) < 1e7):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{v:.3e}"


def table(layers: list[dict], total: dict) -> str:
    head = f"{'layer':30s} {'kind':9s} {'MACs':>12s} {'ACs':>12s} {'attn ops':>12s} {'spikes':>10s} {'rate':>6s} {'energy mJ':>11s}"
    rows = [head, "-" * len(head)]
    for l in layers:
        fr = l["firing_rate"]
        rows.append(f"{l['name'][:30]:30s} {l['kind']:9s} {_fmt(l['macs']):>12s} {_fmt(l['acs']):>12s} "
                    f"{_fmt(l['attention_ops']):>12s} {_fmt(l['spikes']):>10s} {('-' if fr is None else f'{fr:.3f}'):>6s} "
                    f"{l['energy_mj']:11.3e}")
    rows.append("-" * len(head))
    fr = total["firing_rate"]
    rows.append(f"{'total per inference':30s} {'':9s} {_fmt(total['macs']):>12s} {_fmt(total['acs']):>12s} "
                f"{_fmt(total['attention_ops']):>12s} {_fmt(total['spikes']):>10s} {('-' if fr is None else f'{fr:.3f}'):>6s} "
                f"{total['energy_mj']:11.3e}")
    return "\n".join(rows)


def plot_layers(path: str, layers: list[dict], base_layers: list[dict] | None, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [l["name"] for l in (base_layers or [])]
    for l in layers:
        if l["name"] not in names:
            names.append(l["name"])
    mine = {l["name"]: l["energy_mj"] for l in layers}
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(8, 0.28 * len(names)), 4.5))
    if base_layers is not None:
        base = {l["name"]: l["energy_mj"] for l in base_layers}
        ax.bar(x - 0.2, [base.get(n, 0.0) for n in names], 0.4, label="unpruned (baseline)", color="#9aa5b1")
        ax.bar(x + 0.2, [mine.get(n, 0.0) for n in names], 0.4, label="pruned", color="#d9534f")
        ax.legend()
    else:
        ax.bar(x, [mine.get(n, 0.0) for n in names], 0.6, color="#d9534f")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("energy per inference (mJ)")
    ax.set_title(title)
    fig.tight_layout()
    from ..fileio import write_via_buffer

    try:
        write_via_buffer(Path(path), lambda buf: fig.savefig(buf, dpi=120, format=Path(path).suffix[1:].lower()))
    finally:
        plt.close(fig)


@main.command()
@click.argument("run", type=click.Path())
@click.option("--hardware", default="45nm", show_default=True,
              help="Profile: 45nm | loihi | spinnaker2 | truenorth, or a .toml/.json profile file.")
@click.option("--baseline", default=None, type=click.Path(), help="An unpruned run to compare with (ops_ratio, energy_ratio).")
@click.option("--dataset", default=None, help="Dataset (default: the one the run was trained on).")
@click.option("--limit", default=256, show_default=True, type=click.IntRange(1, None), help="Test images to count on.")
@click.option("--masks", "masks_mode", default="dynamic", show_default=True, type=click.Choice(["static", "dynamic"]),
              help="static: RUN/masks.json (from calibrate), no scorer cost; dynamic: the model's own top-k.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1, 1 << 16))
@click.option("--plot", "plot_path", default=None, type=click.Path(dir_okay=False), help="Bar plot of energy per layer (PNG).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@threads_option
def energy(run, hardware, baseline, dataset, limit, masks_mode, batch_size, plot_path, as_json, threads):
    """Count synaptic operations (MACs, ACs, attention products, neuron updates, spikes) on test images with the
    torch reference and estimate the energy per inference on a hardware profile.

    \b
    Examples:
      stata-deploy energy runs/a --hardware 45nm
      stata-deploy energy runs/a --hardware loihi --baseline runs/base --plot energy.png
      stata-deploy energy runs/a --hardware my_chip.toml --masks static --json
    Counting conventions: stata_deploy/energy/counter.py. Profiles and their sources: stata_deploy/energy/hardware/.
    """
    from ..train.checkpoint import load_config
    from ..energy.profiles import estimate_energy, load_profile
    from .train import _load_eval_data, check_data_fits

    from ..fileio import check_output

    set_threads(threads)
    profile = load_profile(hardware)  # fail fast on a bad profile
    if plot_path:
        check_output(plot_path, suffixes=PLOT_SUFFIXES, what="--plot")
    cfg, meta = load_config(run)
    ds = _load_eval_data(meta, dataset, cfg.T)
    check_data_fits(cfg, ds)
    x, y = ds.x_test[:limit], ds.y_test[:limit]
    _, rep, acc, masks = measure(run, x, y, masks_mode, batch_size, progress=not as_json)
    en = estimate_energy(rep, profile)
    res = {"run": str(run), "hardware": profile.name, "citation": profile.citation, "dataset": ds.name,
           "samples": rep.samples, **_summary(rep, en, acc, masks), "not_costed": en.not_costed,
           "layers": _layers(rep, en)}
    base_layers = None
    if baseline:
        bcfg, _ = load_config(baseline)
        check_data_fits(bcfg, ds)
        _, brep, bacc, bmasks = measure(baseline, x, y, masks_mode, batch_size, progress=not as_json)
        ben = estimate_energy(brep, profile)
        base_layers = _layers(brep, ben)
        res["baseline"] = {"run": str(baseline), **_summary(brep, ben, bacc, bmasks)}
        _set_ratio(res, "ops_ratio", rep.sops, brep.sops, "the baseline performs 0 operations")
        _set_ratio(res, "energy_ratio", en.total_mj, ben.total_mj, f"the baseline costs 0 mJ on {profile.name}")
    if plot_path:
        plot_layers(plot_path, res["layers"], base_layers,
                    f"{Path(run).name} on {profile.name}" + (f" vs {Path(baseline).name}" if baseline else ""))
        res["plot"] = str(plot_path)
    lines = [f"{run} on {profile.name} ({res['samples']} images from {ds.name}, {res['masks']} masks, "
             f"accuracy {acc:.4f})", table(res["layers"], res), "",
             f"energy per inference: {en.total_mj:.4e} mJ   ops (MAC+AC+attention) {rep.sops:,.0f}   "
             f"attention ops {rep.attention_ops:,.0f}   neuron updates {rep.neuron_updates:,.0f}"]
    if en.not_costed:
        lines.append("not costed by this profile (explicit 0): " + ", ".join(f"{k} ({v})" for k, v in en.not_costed.items()))
    if baseline:
        lines.append(f"vs {baseline}: ops_ratio {_fmt_ratio(res['ops_ratio'])}  "
                     f"energy_ratio {_fmt_ratio(res['energy_ratio'])}")
    if plot_path:
        lines.append(f"plot written to {plot_path}")
    lines.append(f"profile source: {profile.citation}")
    emit(res, as_json, "\n".join(lines))
