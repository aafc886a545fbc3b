"""export: a trained run (+ its static masks) -> a file, through any exporter in the EXPORTERS registry."""
from __future__ import annotations

import time
from pathlib import Path

import click

from .main import emit, main, set_threads, threads_option
from ..errors import StataError


def resolve_masks(run_dir: Path, cfg, choice: str | None, weights_sha256: str | None = None):
    """(TokenMasks | None, dynamic: bool) for --masks static|dynamic|PATH (None: RUN/masks.json when present).
    Masks calibrated for other weights (their ``weights_sha256`` differs) are refused."""
    from ..pruning.masks import TokenMasks

    default = run_dir / "masks.json"
    if choice == "dynamic":
        if not cfg.prune.active:
            raise StataError("--masks dynamic: this model has no pruning configured, there is nothing dynamic to export")
        return None, True
    if choice in (None, "static"):
        if not default.is_file():
            if choice == "static" and cfg.prune.active:
                raise StataError(f"no static masks at {default}: run `stata-deploy calibrate {run_dir}` first "
                                 "(or pass --masks dynamic or --masks FILE)")
            return None, False
        path = default
    else:
        path = Path(choice)
    masks = TokenMasks.load(path)
    masks.check_weights(weights_sha256, path, run_dir)
    try:
        masks.check_model(cfg)
        if cfg.prune.active:
            want = "skip" if cfg.prune.method == "tp" else "drop"
            if masks.mode != want:
                raise StataError(f"masks are in {masks.mode!r} mode, a {cfg.prune.method} model needs {want!r}")
    except StataError as e:
        raise StataError(f"mask file {path} does not match the model: {e}") from None
    return masks, False


@main.command()
@click.argument("run", type=click.Path())
@click.option("--to", "target", required=True, metavar="NAME",
              help="Exporter name: onnx | nir | netx (any installed in the stata_deploy.exporters registry).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Output file (default: RUN/model<suffix>).")
@click.option("--masks", "masks_opt", default=None, metavar="static|dynamic|PATH",
              help="Token masks: static (RUN/masks.json, the default when present), dynamic (top-k in the graph, "
                   "ONNX only), or a masks.json path.")
@click.option("--split", is_flag=True, help="Ask the exporter to split the graph at host operations (split=True).")
@click.option("--part", type=click.Choice(["full", "stem"]), default=None,
              help="netx: the part to write (default full; netx holds sequential networks only, so 'stem' writes the "
                   "SPS stem's convolutions and neurons).")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as one JSON object.")
@threads_option
def export(run, target, out, masks_opt, split, part, as_json, threads):
    """Export a trained run to a deployable file, with its static per-timestep token masks embedded.

    \b
    Examples:
      stata-deploy export runs/a --to onnx                 # runs/a/model.onnx, masks from runs/a/masks.json
      stata-deploy export runs/a --to nir --out a.nir
      stata-deploy export runs/a --to onnx --masks dynamic --out a-dyn.onnx
      stata-deploy export runs/a --to netx --part stem     # lava-dl netx: the sequential stem (pool_stages=0)
    A failed export leaves no file behind.
    """
    from ..train.checkpoint import load_model, resolve_run
    from ..fileio import check_output
    from ..registry import EXPORTERS

    set_threads(threads)
    exporter_cls = EXPORTERS.get(target)
    run_dir = resolve_run(run)
    model, meta = load_model(run_dir)
    masks, dynamic = resolve_masks(run_dir, model.cfg, masks_opt, meta.get("weights_sha256"))
    exporter = exporter_cls()
    if split and "split" not in exporter.accepts:
        raise StataError(f"--split does not apply to the {target} exporter (only to: nir)")
    if part and "part" not in exporter.accepts:
        raise StataError(f"--part does not apply to the {target} exporter (only to: netx)")
    out_path = check_output(Path(out) if out else run_dir / f"model{exporter.suffix}",
                            suffixes=(exporter.suffix,), what=f"{target} output")
    options = {"weights_sha256": meta.get("weights_sha256")}
    if dynamic:
        options["dynamic_masks"] = True
    if split:
        options["split"] = True
    if part:
        options["part"] = part
    t0 = time.perf_counter()
    summary = exporter.export(model, masks, out_path, **options)  # atomic (stata_deploy.fileio): no partial file
    summary = {"path": str(out_path), **(summary or {}), "exporter": target,
               "masks": "static" if masks is not None else ("dynamic" if dynamic else "none"),
               "seconds": time.perf_counter() - t0}
    notes = summary.get("notes") or []
    human = f"wrote {summary['path']} ({target}, masks {summary['masks']})" + "".join(f"\n  note: {n}" for n in notes)
    emit(summary, as_json, human)
