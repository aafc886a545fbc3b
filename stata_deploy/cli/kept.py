"""kept: which image patches each scorer keeps at each timestep, drawn on a few test images (dynamic top-k and, when
the run has them, its static masks) — where STATA looks, and how its timestep-wise sets differ."""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from .main import emit, main, set_threads, threads_option
from ..errors import StataError


def kept_positions(model, x, masks=None) -> dict[int, np.ndarray]:
    """site -> (T, B, k) kept token positions (anchor excluded, image tokens numbered from 0) of model on x."""
    import torch

    n_fixed = 1 if model.cfg.anchor else 0
    with torch.no_grad():
        out = model(torch.as_tensor(x), masks=masks)
    res = {}
    for s, g in sorted(out.kept.items()):
        g = np.sort(g.cpu().numpy(), -1)[..., n_fixed:] - n_fixed  # the anchor (position 0) is always kept
        res[s] = g
    return res


def _kept_batched(model, x, masks=None, batch: int = 64) -> dict[int, np.ndarray]:
    """``kept_positions`` over x in batches of ``batch`` images, joined along the image axis."""
    parts = [kept_positions(model, x[i:i + batch], masks) for i in range(0, len(x), batch)]
    return {s: np.concatenate([p[s] for p in parts], 1) for s in parts[0]}


def patch_ink(x: np.ndarray, grid: int) -> np.ndarray:
    """(B, grid * grid) share of each image's ink in each patch: the intensity above the image's darkest pixel
    (channels averaged), summed per patch, divided by the image's total (rows sum to 1; a blank image counts each
    patch equally)."""
    g = np.asarray(x, np.float64).mean(1)  # (B, H, W)
    g = g - g.min(axis=(1, 2), keepdims=True)
    B, H, W = g.shape
    ph, pw = H // grid, W // grid
    ink = g[:, :ph * grid, :pw * grid].reshape(B, grid, ph, grid, pw).sum((2, 4)).reshape(B, grid * grid)
    tot = ink.sum(1, keepdims=True)
    return np.where(tot > 0, ink / np.where(tot > 0, tot, 1), 1.0 / (grid * grid))


def ink_in_kept(ink: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """(T,) mean over images of the ink share in the kept patches: ink (B, P) from ``patch_ink``, kept (T, B, k)
    image-token positions. Compare with k / P: above it, the scorer keeps the object more than the background."""
    return np.take_along_axis(ink[None], kept.astype(np.int64), -1).sum(-1).mean(-1)


def _panel(img: np.ndarray, keep: np.ndarray, grid: int) -> np.ndarray:
    """An RGB view of img (C, H, W) with the patches not in ``keep`` (image-token indices) dimmed and tinted."""
    g = img.mean(0) if img.shape[0] != 3 else img.transpose(1, 2, 0)
    rgb = np.repeat(g[..., None], 3, -1) if g.ndim == 2 else g
    rgb = (rgb - rgb.min()) / max(1e-9, float(rgb.max() - rgb.min()))
    H, W = rgb.shape[:2]
    ph, pw = H // grid, W // grid
    mask = np.zeros((grid, grid), bool)
    k = keep[(keep >= 0) & (keep < grid * grid)]
    mask.flat[k] = True
    m = np.kron(mask, np.ones((ph, pw), bool))
    out = rgb.copy()
    out[~m] = 0.25 * out[~m] + np.array([0.45, 0.05, 0.05])
    return out


@main.command("kept")
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--plot", "plot_path", required=True, type=click.Path(dir_okay=False), help="PNG (or .pdf/.svg) to write.")
@click.option("--images", default=3, show_default=True, type=click.IntRange(1, 16), help="Test images to draw.")
@click.option("--dataset", default=None, help="Dataset (default: the first run's).")
@click.option("--site", default=None, type=int, help="Pruning site to draw (default: each run's first).")
@click.option("--measure", default=256, show_default=True, type=click.IntRange(0, None),
              help="Test images over which to measure how much of the image's ink the kept patches hold (0: skip).")
@click.option("--json", "as_json", is_flag=True)
@threads_option
def kept_cmd(runs, plot_path, images, dataset, site, measure, as_json, threads):
    """Draw which patches each run's scorer keeps at every timestep on a few test images: one row per image and run
    (dynamic top-k; a second row with the static masks when RUN/masks.json exists), one column per timestep.
    Kept patches are shown as they are, dropped ones dimmed red. Over --measure test images it also reports the
    share of the image's ink (intensity above its darkest pixel) in the kept patches, beside the share of patches
    kept: above it, the scorer keeps the object more than the background.

    \b
    Examples:
      stata-deploy kept runs/stata --plot kept.png
      stata-deploy kept runs/stata runs/anchor runs/l1 --images 2 --plot scorers.png
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..train.checkpoint import load_model
    from ..fileio import check_output, write_via_buffer
    from ..pruning.masks import TokenMasks
    from .energy import PLOT_SUFFIXES
    from .train import _load_eval_data, check_data_fits

    set_threads(threads)
    out = check_output(plot_path, suffixes=PLOT_SUFFIXES, what="--plot")
    loaded = []
    for r in runs:
        model, meta = load_model(r)
        if not model.cfg.prune.active:
            raise StataError(f"{r} has no token pruning (prune none): it keeps every patch; nothing to draw")
        masks = None
        if (Path(r) / "masks.json").is_file():
            masks = TokenMasks.load(Path(r) / "masks.json")
            masks.check_weights(meta.get("weights_sha256"), Path(r) / "masks.json", r)
            masks.check_model(model.cfg)
        loaded.append((r, model, meta, masks))
    cfg0 = loaded[0][1].cfg
    ds = _load_eval_data(loaded[0][2], dataset, cfg0.T)
    x = ds.x_test[:images]
    xm = ds.x_test[:measure]
    xall = ds.x_test[:max(images, measure)]  # one pass per run over the drawn and the measured images
    rows, summary, lines = [], {}, []
    for r, model, _, masks in loaded:
        check_data_fits(model.cfg, ds)
        for label, m in (("dynamic", None), ("static", masks)):
            if label == "static" and m is None:
                continue
            kept = _kept_batched(model, xall, m)
            s = site if site is not None else min(kept)
            if s not in kept:
                raise StataError(f"{r}: site {s} is not a pruning site (sites: {sorted(kept)})")
            rows.append((f"{Path(r).name} {model.cfg.prune.method} ({label})", kept[s][:, :images], model.cfg.grid))
            T = kept[s].shape[0]
            sets = [set(kept[s][t, 0].tolist()) for t in range(T)]
            stats = summary[f"{Path(r).name}:{label}"] = {
                "site": s, "kept_per_timestep": len(sets[0]),
                "same_tokens_every_timestep": all(st == sets[0] for st in sets),
                "jaccard_t0_vs_t": [len(sets[0] & st) / max(1, len(sets[0] | st)) for st in sets]}
            if len(xm):
                P = model.cfg.grid ** 2
                share = ink_in_kept(patch_ink(xm, model.cfg.grid), kept[s][:, :len(xm)])
                stats.update(measured_images=len(xm), kept_patch_share=len(sets[0]) / P,
                           ink_share_in_kept_per_timestep=share.tolist())
                lines.append(f"  {rows[-1][0]}: keeps {len(sets[0])} of {P} patches ({len(sets[0]) / P:.0%}), holding "
                             f"{share.mean():.0%} of the image's ink (t = 0..{T - 1}: "
                             f"{' / '.join(f'{v:.0%}' for v in share)}; {len(xm)} test images)")
    T = cfg0.T
    fig, axes = plt.subplots(len(rows) * images, T, figsize=(1.6 * T, 1.6 * len(rows) * images), squeeze=False)
    for i in range(images):
        for j, (label, kept, grid) in enumerate(rows):
            ax_row = axes[i * len(rows) + j]
            for t in range(T):
                ax = ax_row[t]
                ax.imshow(_panel(np.asarray(x[i]), kept[t, i], grid), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if t == 0:
                    ax.set_ylabel(f"img {i}\n{label}", fontsize=6)
                if i == 0 and j == 0:
                    ax.set_title(f"t = {t}", fontsize=8)
    fig.suptitle("kept patches per timestep (dropped: dimmed red)", fontsize=9)
    fig.tight_layout()
    try:
        write_via_buffer(out, lambda buf: fig.savefig(buf, dpi=130, format=out.suffix[1:].lower()))
    finally:
        plt.close(fig)
    res = {"plot": str(out), "images": images, "rows": [r[0] for r in rows], "runs": summary}
    emit(res, as_json, "\n".join([f"wrote {out}: {len(rows)} row(s) x {images} image(s) x {T} timesteps", *lines]))
