"""train, eval, prune (training-free TP), calibrate, presets."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import click

from .main import emit, main, set_threads, threads_option
from ..config import ATTENTION_KINDS, PRESETS, PRUNE_METHODS
from ..errors import StataError


def _keep(ctx, param, value):
    if value is None:
        return value
    if not (0.0 < value <= 1.0) or math.isnan(value):
        raise click.BadParameter(f"must be in (0, 1], got {value}")
    return value


def _csv(ctx, param, value):
    if value is None or value == "":
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def _sites(ctx, param, value):
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated block indices, got {value!r}") from None


@main.command()
@click.option("--dataset", default="digits", show_default=True,
              help="digits | fashion-mnist | idx:DIR | npz:FILE | folder:DIR | <name>-events (derived)")
@click.option("--model", "preset", default="spikformer-tiny", show_default=True,
              type=click.Choice(PRESETS.names()), help="Model preset.")
@click.option("--attention", type=click.Choice(ATTENTION_KINDS), default=None, help="Override the attention kind.")
@click.option("--prune", default="none", show_default=True, type=click.Choice(PRUNE_METHODS), help="Token pruning method.")
@click.option("--keep", default=1.0, show_default=True, type=float, callback=_keep, help="Keep ratio gamma in (0, 1].")
@click.option("--sites", default=None, callback=_sites, help="Pruning sites (block indices), e.g. 1,4. Default: every 3 blocks from L//3.")
@click.option("--align", default="", callback=_csv, help="STATA alignment losses: intra,inter.")
@click.option("--intra-weight", default=None, type=float,
              help="Weight of the intra-alignment loss (default 0.01; needs --align intra). At 0.01 its gradient is "
                   "~0.1 % of the classification loss's (benchmarks/alignment_diagnostics.py).")
@click.option("--inter-weight", default=None, type=float,
              help="Weight of the inter-alignment loss (default 0.01; needs --align inter).")
@click.option("--anchor-grad/--no-anchor-grad", default=None,
              help="stata/anchor: train the anchor's Q through the kept tokens' scores (straight-through; default "
                   "on). Without it the anchor's Q gets no gradient and stays silent (benchmarks/anchor_diagnostics.py).")
@click.option("--epochs", default=12, show_default=True, type=click.IntRange(1, 100000))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 1 << 16))
@click.option("--lr", default=3e-3, show_default=True, type=float)
@click.option("--T", "T", default=None, type=click.IntRange(1, 64), help="Timesteps (default: the preset's).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--train-limit", default=None, type=click.IntRange(1, None), help="Use only the first N training images.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest good checkpoint "
              "(same options required; a corrupted newest checkpoint falls back to the previous one).")
@click.option("--force", is_flag=True, help="Replace an existing run in --out (without it a non-empty --out is refused).")
@click.option("--checkpoint-every", default=0, show_default=True, type=click.IntRange(0, None),
              help="Also write a training checkpoint every N optimizer steps (0: only at the end of each epoch).")
@click.option("--nproc", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Data-parallel processes on this machine (DistributedDataParallel; gloo on CPU, nccl on CUDA). "
                   "--batch-size is the global batch. Same as: torchrun --nproc_per_node=N -m stata_deploy train ...")
@click.option("--quiet", is_flag=True, help="No progress bar or per-epoch lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the final metrics as one JSON object.")
@threads_option
@click.pass_context
def train(ctx, dataset, preset, attention, prune, keep, sites, align, intra_weight, inter_weight, anchor_grad, epochs,
          batch_size, lr, T, seed,
          train_limit,
          device, out, resume, force, checkpoint_every, nproc, quiet, as_json, threads):
    """Train a spiking transformer, optionally with token pruning.

    \b
    Examples:
      stata-deploy train --out runs/base
      stata-deploy train --prune stata --keep 0.5 --align intra,inter --out runs/stata
      stata-deploy train --dataset fashion-mnist --model spikformer-small --epochs 5 --out runs/fm
      stata-deploy train --checkpoint-every 50 --out runs/a   # after a crash: add --resume
      stata-deploy train --nproc 2 --out runs/ddp             # or: torchrun --nproc_per_node=2 -m stata_deploy train ...
    Writes OUT/config.json, OUT/model.safetensors, OUT/metrics.json, OUT/metrics.jsonl and OUT/checkpoints/.
    """
    from ..train.loop import TrainConfig, train as run_train

    tc = TrainConfig(dataset=dataset, model=preset, out=out, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                     T=T, attention=attention, prune=prune, keep=keep, sites=sites, align=align, anchor_grad=anchor_grad,
                     intra_weight=intra_weight, inter_weight=inter_weight,
                     device=device,
                     train_limit=train_limit, resume=resume, force=force, progress=not quiet,
                     checkpoint_every=checkpoint_every, nproc=nproc)
    tc.validate()
    from ..fileio import check_run_out

    if os.environ.get("RANK", "0") == "0":
        check_run_out(out, force=force, resume=resume)  # before any data is loaded
    if nproc > 1:
        from ..train.distributed import env_world_size, launch

        if env_world_size() > 1:
            raise StataError("--nproc cannot be used inside torchrun (it already started the processes)")
        argv = _relaunch_args(ctx)
        code = launch(nproc, argv, threads)
        if code:
            raise SystemExit(code)
        return
    set_threads(threads)
    log = (lambda s: None) if (quiet or as_json) else (lambda s: click.echo(s, err=True))
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 talks
        log, tc.progress = (lambda s: None), False
    metrics = run_train(tc, log=log)
    if os.environ.get("RANK", "0") != "0":
        return
    emit(metrics, as_json, f"test accuracy {metrics['test_accuracy']:.4f} after {metrics['epochs']} epochs "
                           f"({metrics['train_seconds']:.1f} s); run saved in {out}")


def _relaunch_args(ctx) -> list[str]:
    """The train command line for the worker processes: the same options, without --nproc."""
    argv = ["train"]
    for p in ctx.command.params:
        if not isinstance(p, click.Option) or p.name in ("nproc",):
            continue
        v = ctx.params.get(p.name)
        flag = p.opts[0]
        if p.is_flag:
            if v:
                argv.append(flag)
        elif v is not None and v != [] and v != "":
            if p.name == "sites":
                v = ",".join(str(i) for i in v)
            elif p.name == "align":
                v = ",".join(v)
            argv += [flag, str(v)]
    return argv


def _load_eval_data(meta: dict, dataset: str | None, T: int):
    from ..train.data import load_dataset

    name = dataset or meta.get("train", {}).get("dataset") or "digits"
    return load_dataset(name, T=T)


def check_data_fits(cfg, ds) -> None:
    shape = tuple(ds.x_test.shape[-3:])
    want = (cfg.in_channels, cfg.img_size, cfg.img_size)
    if shape != want:
        raise StataError(f"dataset {ds.name!r} has images of shape {shape}, the model expects {want}")
    if ds.num_classes > cfg.num_classes:
        raise StataError(f"dataset {ds.name!r} has {ds.num_classes} classes, the model only {cfg.num_classes}")


@main.command("eval")
@click.argument("run", type=click.Path())
@click.option("--dataset", default=None, help="Dataset (default: the one the run was trained on).")
@click.option("--masks", "masks_path", default=None, type=click.Path(), help="Evaluate with static masks (masks.json).")
@click.option("--limit", default=None, type=click.IntRange(1, None), help="Only the first N test images.")
@click.option("--json", "as_json", is_flag=True)
@threads_option
def eval_cmd(run, dataset, masks_path, limit, as_json, threads):
    """Evaluate a trained run on its test set.

    \b
    Example:
      stata-deploy eval runs/a --json
    """
    from ..train.checkpoint import load_model
    from ..pruning.masks import TokenMasks
    from ..train.loop import evaluate

    set_threads(threads)
    model, meta = load_model(run)
    masks = TokenMasks.load(masks_path) if masks_path else None
    if masks is not None:
        masks.check_weights(meta.get("weights_sha256"), masks_path, run)
        masks.check_model(model.cfg)
    ds = _load_eval_data(meta, dataset, model.cfg.T)
    check_data_fits(model.cfg, ds)
    x, y = ds.x_test[:limit], ds.y_test[:limit]
    t0 = time.perf_counter()
    res = evaluate(model, x, y, masks=masks, progress=not as_json)
    res.update(seconds=time.perf_counter() - t0, dataset=ds.name, masks="static" if masks else "dynamic")
    emit(res, as_json, f"test accuracy {res['test_accuracy']:.4f} on {res['samples']} images")


@main.command()
@click.argument("run", type=click.Path())
@click.option("--method", default="tp", show_default=True, type=click.Choice(["tp"]), help="Training-free method.")
@click.option("--keep", required=True, type=float, callback=_keep, help="Keep ratio per block.")
@click.option("--start", default=None, type=click.IntRange(1, None), help="First pruned block (default: depth//3, at least 1).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the pruned run.")
@click.option("--force", is_flag=True, help="Replace an existing run in --out.")
@click.option("--dataset", default=None)
@click.option("--limit", default=None, type=click.IntRange(1, None))
@click.option("--json", "as_json", is_flag=True)
@threads_option
def prune(run, method, keep, start, out, force, dataset, limit, as_json, threads):
    """Training-free token pruning of a trained checkpoint (TP-Spikformer's criterion with block-level early
    stopping). Evaluates the pruned model and saves its config (weights are unchanged).

    \b
    Example:
      stata-deploy prune runs/base --method tp --keep 0.5 --out runs/base-tp50
    """
    from ..train import checkpoint as ckpt
    from ..fileio import check_run_out, remove_if_empty
    from ..nn.model import with_prune
    from ..train.loop import evaluate

    set_threads(threads)
    check_run_out(out, force=force, source=ckpt.resolve_run(run))  # before any work
    model, meta = ckpt.load_model(run)
    if model.cfg.prune.active:
        raise StataError(f"{run} is already pruned ({model.cfg.prune.method}); start from an unpruned run")
    depth = model.cfg.depth
    first = start if start is not None else max(1, depth // 3)
    if first >= depth:
        raise StataError(f"--start {first} is past the last block ({depth - 1})")
    pruned = with_prune(model, method=method, keep=keep, sites=list(range(first, depth)))
    cfg = pruned.cfg
    ds = _load_eval_data(meta, dataset, cfg.T)
    check_data_fits(cfg, ds)
    x, y = ds.x_test[:limit], ds.y_test[:limit]
    base = evaluate(model, x, y, progress=not as_json)
    res = evaluate(pruned, x, y, progress=not as_json)
    n = cfg.num_tokens
    k = math.ceil(keep * cfg.num_image_tokens - 1e-9)
    token_blocks_full = depth * n
    token_blocks = first * n + (depth - first) * k
    out_metrics = {
        "test_accuracy": res["test_accuracy"],
        "baseline_accuracy": base["test_accuracy"],
        "method": method,
        "keep": keep,
        "sites": cfg.prune.sites,
        "token_blocks": token_blocks,
        "token_blocks_unpruned": token_blocks_full,
        "token_ratio": token_blocks / token_blocks_full,
        "samples": res["samples"],
        "out": out,
    }
    existed = Path(out).exists()
    try:
        ckpt.save_model(Path(out), pruned, {k2: v for k2, v in meta.items()
                                            if k2 not in ("format", "model", "weights_sha256")})
        ckpt.atomic_write_json(Path(out) / "metrics.json", {**meta.get("metrics", {}), **out_metrics,
                                                             "dataset": ds.name, "model": cfg.name, "prune": method})
    except BaseException:
        if not existed:
            remove_if_empty(out)
        raise
    emit(out_metrics, as_json, f"{method} keep {keep}: accuracy {res['test_accuracy']:.4f} "
                               f"(unpruned {base['test_accuracy']:.4f}), block-token work {out_metrics['token_ratio']:.2%}")


@main.command()
@click.argument("run", type=click.Path())
@click.option("--dataset", default=None, help="Calibration data (default: the run's dataset, training split).")
@click.option("--samples", default=256, show_default=True, type=click.IntRange(1, None), help="Calibration images.")
@click.option("--out", "out_path", default=None, type=click.Path(dir_okay=False), help="Default: RUN/masks.json")
@click.option("--schedule", default="per-timestep", show_default=True, type=click.Choice(["per-timestep", "fixed"]),
              help="per-timestep: a token set per timestep (STATA's); fixed: the same tokens at every timestep "
                   "(exact in standard NIR for readers that ignore metadata).")
@click.option("--json", "as_json", is_flag=True)
@threads_option
def calibrate(run, dataset, samples, out_path, schedule, as_json, threads):
    """Freeze static token masks from calibration data and compare static vs dynamic accuracy.

    \b
    Examples:
      stata-deploy calibrate runs/stata                     # writes runs/stata/masks.json
      stata-deploy calibrate runs/stata --schedule fixed    # same tokens at every timestep
    """
    from tqdm import tqdm

    from ..train.checkpoint import load_model, resolve_run
    from ..train.data import batches
    from ..fileio import check_output
    from ..pruning.calibration import calibrate_masks
    from ..train.loop import evaluate

    set_threads(threads)
    path = check_output(Path(out_path) if out_path else resolve_run(run) / "masks.json", suffixes=(".json",),
                        what="masks file")  # before any work
    model, meta = load_model(run)
    if not model.cfg.prune.active:
        raise StataError(f"{run} has no token pruning configured (prune none): nothing to calibrate")
    ds = _load_eval_data(meta, dataset, model.cfg.T)
    check_data_fits(model.cfg, ds)
    xc, yc = ds.x_train[:samples], ds.y_train[:samples]
    it = (xb for xb, _ in batches(xc, yc, 64))
    bar = tqdm(total=math.ceil(len(yc) / 64), desc="calibrate", disable=as_json, leave=False)
    try:
        masks = calibrate_masks(model, it, progress=bar, schedule=schedule)
    finally:
        bar.close()  # clear the bar, also on failure, so an error starts on a clean line
    dyn = evaluate(model, ds.x_test, ds.y_test)
    stat = evaluate(model, ds.x_test, ds.y_test, masks=masks)
    masks.meta.update(calibration_samples=len(yc), dynamic_accuracy=dyn["test_accuracy"],
                      static_accuracy=stat["test_accuracy"], weights_sha256=meta.get("weights_sha256"))
    masks.save(path)
    res = {"masks": str(path), "sites": {str(s): masks.kept(s) for s in masks.sites}, "mode": masks.mode,
           "schedule": schedule,
           "dynamic_accuracy": dyn["test_accuracy"], "static_accuracy": stat["test_accuracy"],
           "calibration_samples": len(yc)}
    emit(res, as_json, f"static masks ({schedule}) saved to {path}: accuracy static {stat['test_accuracy']:.4f} vs dynamic "
                       f"{dyn['test_accuracy']:.4f}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def presets(as_json):
    """List model presets with their parameter counts."""
    from ..config import make_config
    from ..nn.model import build_model, count_params

    rows = {}
    for name in PRESETS.names():
        cfg = make_config(name)
        rows[name] = {**PRESETS.get(name), "params": count_params(build_model(cfg)), "tokens": cfg.num_image_tokens}
    emit(rows, as_json, "\n".join(f"{n:18s} {json.dumps(r)}" for n, r in rows.items()))
