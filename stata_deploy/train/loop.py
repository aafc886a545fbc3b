"""Training and evaluation: the Python API the CLI wraps.

    from stata_deploy.train.loop import TrainConfig, train
    result = train(TrainConfig(dataset="digits", model="spikformer-tiny", prune="stata", keep=0.5, out="runs/a"))

Multi-process (DistributedDataParallel): launch the same call under torchrun (or ``stata-deploy train --nproc N``);
``batch_size`` stays the global batch. See ``stata_deploy.train.distributed`` for the exact semantics.

Crash safety: a training checkpoint (weights, optimizer, loop position, data-order and RNG states) is written every
``checkpoint_every`` steps and at the end of every epoch into OUT/checkpoints (atomic, sha256-verified, the two
newest kept). ``resume=True`` continues from the newest checkpoint that verifies; on CPU in a single process the
resumed run ends with bitwise the same weights as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from ..fileio import check_run_out, remove_if_empty
from . import distributed as dist_
from ..config import ANCHOR_METHODS, PruneConfig, make_config
from .data import Dataset, batches, load_dataset
from ..errors import ConfigError, StataError
from ..nn.model import build_model
from ..pruning.masks import TokenMasks


@dataclass
class TrainConfig:
    dataset: str = "digits"
    model: str = "spikformer-tiny"
    out: str = "runs/default"
    epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    seed: int = 0
    T: int | None = None
    attention: str | None = None
    prune: str = "none"
    keep: float = 1.0
    sites: list[int] | None = None
    align: list[str] = field(default_factory=list)
    anchor_grad: bool | None = None  # stata/anchor: straight-through gradient to the anchor (None: on)
    intra_weight: float | None = None  # weight of the intra-alignment loss (None: PruneConfig's default)
    inter_weight: float | None = None  # weight of the inter-alignment loss (None: PruneConfig's default)
    device: str = "auto"
    train_limit: int | None = None  # use only the first N training images (quick runs)
    resume: bool = False
    force: bool = False  # replace an existing run folder (without it, a non-empty --out is refused)
    progress: bool = True
    checkpoint_every: int = 0  # steps; 0 = only at the end of each epoch
    nproc: int = 1  # informational: processes requested (the launcher starts them; train() reads torchrun's env)

    def validate(self) -> "TrainConfig":
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not (0 < self.lr <= 10.0):  # also rejects NaN; larger values overflow float32 inside AdamW
            raise ConfigError(f"learning rate must be in (0, 10], got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint interval must be >= 0 steps, got {self.checkpoint_every}")
        if not (0.0 <= self.weight_decay < 1.0) or not math.isfinite(self.weight_decay):
            raise ConfigError(f"weight decay must be in [0, 1), got {self.weight_decay}")
        if not (0.0 <= self.label_smoothing < 1.0) or not math.isfinite(self.label_smoothing):
            raise ConfigError(f"label smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup epochs must be >= 0, got {self.warmup_epochs}")
        if self.anchor_grad is not None and self.prune not in ANCHOR_METHODS:
            raise ConfigError(f"--{'' if self.anchor_grad else 'no-'}anchor-grad applies to the anchor-token methods "
                              f"({', '.join(ANCHOR_METHODS)}), not to --prune {self.prune}")
        for loss in ("intra", "inter"):
            if getattr(self, f"{loss}_weight") is not None and loss not in self.align:
                raise ConfigError(f"--{loss}-weight weights the {loss}-alignment loss: add --align {loss} "
                                  f"(given: --align {','.join(self.align) or '(none)'})")
        if self.train_limit is not None and self.train_limit < 1:
            raise ConfigError(f"train limit must be >= 1, got {self.train_limit}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but no CUDA device is available")
        return self


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_config_for(tc: TrainConfig, ds: Dataset):
    weights = {f"{k}_weight": getattr(tc, f"{k}_weight") for k in ("intra", "inter")
               if getattr(tc, f"{k}_weight") is not None}
    prune = PruneConfig(method=tc.prune, keep=tc.keep, sites=tc.sites, align=list(tc.align),
                        anchor_grad=True if tc.anchor_grad is None else tc.anchor_grad, **weights)
    cfg = make_config(
        tc.model,
        img_size=ds.img_size,
        in_channels=ds.in_channels,
        num_classes=ds.num_classes,
        T=ds.x_train.shape[1] if ds.is_sequence else tc.T,
        attention=tc.attention,
        prune=prune,
    )
    return cfg


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warmup then cosine decay to 1% of base."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@torch.no_grad()
def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 256, masks: TokenMasks | None = None,
             device: torch.device | str = "cpu", progress: bool = False) -> dict:
    """Accuracy of ``model`` on (x, y); with ``masks`` the static masks are used instead of dynamic top-k."""
    from tqdm import tqdm

    model.eval()
    correct, n, loss_sum = 0, 0, 0.0
    it = batches(x, y, batch_size)
    if progress:
        it = tqdm(it, total=math.ceil(len(y) / batch_size), desc="eval", leave=False)
    for xb, yb in it:
        xb, yb = xb.to(device), yb.to(device)
        out = model(xb, masks=masks)
        loss_sum += F.cross_entropy(out.logits, yb, reduction="sum").item()
        correct += (out.logits.argmax(-1) == yb).sum().item()
        n += len(yb)
    return {"test_accuracy": correct / n, "test_loss": loss_sum / n, "samples": n}


def _optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, state_meta = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                state_meta[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": state_meta}


def _load_optimizer_state(opt, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# Fields of TrainConfig that may differ between a run and its --resume (they do not change the result).
RESUME_FREE = ("resume", "force", "progress", "out", "device", "checkpoint_every", "nproc")


def _resume_mismatch(saved: dict, tc: TrainConfig) -> list[str]:
    now = dataclasses.asdict(tc)
    diffs = []
    for k, v in now.items():
        if k in RESUME_FREE or k not in saved:
            continue
        if saved[k] != v and not (isinstance(v, list) and list(saved[k] or []) == v):
            diffs.append(f"{k}={saved[k]!r} (now {v!r})")
    return diffs


def _scorer_seed(seed: int, rank: int) -> int:
    return seed + 1 + dist_.RANDOM_SCORER_RANK_STRIDE * rank


@dataclass
class _Loop:
    """Where the training loop is; saved in every training checkpoint."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # next batch within the epoch
    step: int = 0  # optimizer steps done
    run: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # epoch sums over all ranks: loss, correct, seen
    history: list = field(default_factory=list)
    elapsed: float = 0.0


def _save_checkpoint(out: Path, raw, opt, loop: _Loop, epoch_rng: torch.Tensor, tc: TrainConfig, cfg, world: int) -> None:
    tensors, opt_meta = _optimizer_state(opt)
    tensors.update({f"model.{k}": v for k, v in raw.state_dict().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data_epoch"] = epoch_rng
    if raw.generator is not None:
        tensors["rng.scorer"] = raw.generator.get_state()
    state = {**dataclasses.asdict(loop), "optimizer": opt_meta, "train": dataclasses.asdict(tc),
             "model": cfg.to_dict(), "world": world}
    ckpt.save_train_checkpoint(out, loop.step, tensors, state)
    _test_pause_after(loop.step)


def _test_pause_after(step: int) -> None:
    """Test hook (tests/test_resume.py): with STATA_TEST_PAUSE_AFTER_STEP=k, training blocks for good right after
    the checkpoint of step k is written, so a test can kill the run at exactly that point on any machine."""
    k = os.environ.get("STATA_TEST_PAUSE_AFTER_STEP")
    if k and int(k) == step:
        while True:
            time.sleep(1)


def _restore_checkpoint(out: Path, raw, opt, tc: TrainConfig, cfg, env: dist_.DistEnv, gen: torch.Generator,
                        log) -> _Loop:
    tensors, state, path = ckpt.load_latest_train_checkpoint(out, warn=log if env.is_main else None)
    if state.get("model") != cfg.to_dict():
        raise StataError(f"--resume: the checkpoint in {out} is for a different model configuration")
    diffs = _resume_mismatch(state.get("train", {}), tc)
    if diffs:
        raise StataError(f"--resume: options differ from the run in {out}: {', '.join(diffs[:4])}")
    sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = raw.state_dict()
    if set(sd) != set(expected) or any(sd[k].shape != expected[k].shape for k in sd):
        raise StataError(f"--resume: the weights in {path} do not match the model")
    raw.load_state_dict(sd)
    try:
        _load_optimizer_state(opt, tensors, state["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise StataError(f"--resume: the optimizer state in {path} does not fit ({e})") from None
    torch.set_rng_state(tensors["rng.torch"])
    gen.set_state(tensors["rng.data_epoch"])
    loop = _Loop(**{f.name: state[f.name] for f in dataclasses.fields(_Loop)})
    if raw.generator is not None:
        if env.rank == 0 and "rng.scorer" in tensors:
            raw.generator.set_state(tensors["rng.scorer"])
        else:  # other ranks' scorer streams are not saved: re-seed them from (seed, rank, step)
            raw.generator.manual_seed(_scorer_seed(tc.seed, env.rank) + 1_000_003 * loop.step)
    if not env.is_main:
        loop.run = [0.0, 0.0, 0.0]  # rank 0 carries the epoch sums so far
    log(f"resuming from {path.name}: epoch {loop.epoch + 1}, batch {loop.batch}, step {loop.step}")
    return loop


def _evaluate_ranks(raw, x, y, env: dist_.DistEnv, device, batch_size: int = 256) -> dict:
    """``evaluate`` with the test set split over ranks and the sums all-reduced (identical to evaluate() on 1 rank)."""
    if not env.enabled:
        return evaluate(raw, x, y, batch_size=batch_size, device=device)
    dist_.broadcast_buffers(env, raw)
    a, b = dist_.shard(len(y), env.rank, env.world)
    if b > a:
        ev = evaluate(raw, x[a:b], y[a:b], batch_size=batch_size, device=device)
        sums = [ev["test_accuracy"] * ev["samples"], ev["test_loss"] * ev["samples"], ev["samples"]]
    else:
        sums = [0.0, 0.0, 0.0]
    correct, loss, n = dist_.all_sum(env, sums, device)
    return {"test_accuracy": round(correct) / n, "test_loss": loss / n, "samples": int(n)}


def train(tc: TrainConfig, ds: Dataset | None = None, log=print) -> dict:
    """Train a model; writes config.json, model.safetensors, metrics.json, metrics.jsonl (and checkpoints/) into
    ``tc.out``. Under torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 alone writes files and logs."""
    tc.validate()
    env, device = dist_.setup(tc.device)
    out = Path(tc.out)
    existed = out.exists()
    try:
        return _train(tc, ds, log if env.is_main else (lambda s: None), env, device)
    except BaseException:
        if env.is_main and not existed:
            remove_if_empty(out)  # a failed fresh run leaves no empty run folder behind
        raise
    finally:
        dist_.teardown(env)


def _prepare_out(out: Path, resume: bool, force: bool = False) -> None:
    check_run_out(out, force=force, resume=resume)
    if resume:
        if not out.is_dir():
            raise StataError(f"--resume: run folder not found: {out}")
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StataError(f"cannot create output folder {out}: {e.strerror or e}") from None
    try:  # fail now, not after an hour of training, if the folder cannot be written
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".write-test.")
        try:
            os.write(fd, b"stata-deploy write test\n")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as e:
        raise StataError(f"output folder {out} is not writable: {e.strerror or e}") from None
    if not resume:  # a fresh run in an old folder: stale checkpoints must not be resumed later
        for _, p in ckpt.list_train_checkpoints(out):
            p.unlink()


def _train(tc: TrainConfig, ds: Dataset | None, log, env: dist_.DistEnv, device: torch.device) -> dict:
    from tqdm import tqdm

    ds = ds if ds is not None else load_dataset(tc.dataset, T=tc.T or 4)
    cfg = model_config_for(tc, ds)
    out = Path(tc.out)
    if env.is_main:
        _prepare_out(out, tc.resume, tc.force)
    dist_.barrier(env)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    raw = build_model(cfg).to(device)
    raw.generator = torch.Generator().manual_seed(_scorer_seed(tc.seed, env.rank))
    xtr, ytr = ds.x_train, ds.y_train
    if tc.train_limit:
        xtr, ytr = xtr[: tc.train_limit], ytr[: tc.train_limit]
    n = len(ytr)
    B = tc.batch_size
    steps_per_epoch = math.ceil(n / B)
    total = steps_per_epoch * tc.epochs
    opt = torch.optim.AdamW(raw.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    gen = torch.Generator().manual_seed(tc.seed)
    loop = _Loop()
    if tc.resume:
        loop = _restore_checkpoint(out, raw, opt, tc, cfg, env, gen, log)
    model = dist_.wrap(raw, env, device)
    if env.enabled:
        log(f"data parallel: {env.world} processes ({dist_.backend_for(device)}), global batch {B}")
    extra = {"train": dataclasses.asdict(tc), "dataset": ds.describe()}
    t0 = time.perf_counter() - loop.elapsed
    warmup = tc.warmup_epochs * steps_per_epoch
    every = tc.checkpoint_every
    while loop.epoch < tc.epochs:
        epoch_rng = gen.get_state()  # a resumed epoch redraws the same permutation from here
        perm = torch.randperm(n, generator=gen).numpy()
        model.train()
        bar = tqdm(range(loop.batch, steps_per_epoch), total=steps_per_epoch, initial=loop.batch,
                   desc=f"epoch {loop.epoch + 1}/{tc.epochs}", disable=not (tc.progress and env.is_main), leave=False)
        local = [0.0, 0.0, 0.0]  # this rank's loss sum, correct, seen since the epoch (re)started
        for b in bar:
            sel, w = dist_.local_part(perm[b * B : (b + 1) * B], env.rank, env.world)
            xb = torch.from_numpy(np.ascontiguousarray(xtr[sel]))
            if xb.dim() == 5:
                xb = xb.transpose(0, 1)
            xb, yb = xb.to(device), torch.from_numpy(ytr[sel]).to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(loop.step, total, warmup, tc.lr)
            with torch.autocast(device.type, enabled=use_amp):
                o = model(xb, align=bool(tc.align))
                if env.enabled:
                    wt = torch.from_numpy(w).to(device)
                    n_global = min(B, n - b * B)
                    per = F.cross_entropy(o.logits, yb, label_smoothing=tc.label_smoothing, reduction="none")
                    ce_sum = (per * wt).sum()
                    loss = ce_sum * (env.world / n_global)  # DDP's gradient mean over ranks -> global batch mean
                else:
                    loss = F.cross_entropy(o.logits, yb, label_smoothing=tc.label_smoothing)
                    ce_sum = loss.detach() * len(yb)
                if o.aux_loss is not None:
                    loss = loss + o.aux_loss
            if not dist_.all_true(env, bool(torch.isfinite(loss)), device):
                raise StataError(f"training diverged: the loss is not finite at step {loop.step} (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            loop.step += 1
            hit = (o.logits.argmax(-1) == yb).float()
            local[0] += ce_sum.item()
            local[1] += (hit * torch.from_numpy(w).to(device)).sum().item() if env.enabled else hit.sum().item()
            local[2] += float(w.sum())
            if env.is_main:
                bar.set_postfix(loss=f"{local[0] / local[2]:.3f}", acc=f"{local[1] / local[2]:.3f}")
            if every and loop.step % every == 0 and b + 1 < steps_per_epoch:
                sums = dist_.all_sum(env, local, device)
                if env.is_main:
                    snap = _Loop(loop.epoch, b + 1, loop.step, [r + s for r, s in zip(loop.run, sums)],
                                 loop.history, time.perf_counter() - t0)
                    _save_checkpoint(out, raw, opt, snap, epoch_rng, tc, cfg, env.world)
        bar.close()
        sums = dist_.all_sum(env, local, device)
        run = [r + s for r, s in zip(loop.run, sums)]
        ev = _evaluate_ranks(raw, ds.x_test, ds.y_test, env, device)
        rec = {
            "epoch": loop.epoch + 1,
            "train_loss": run[0] / run[2],
            "train_accuracy": run[1] / run[2],
            **{k: ev[k] for k in ("test_accuracy", "test_loss")},
            "lr": opt.param_groups[0]["lr"],
            "train_seconds": time.perf_counter() - t0,
        }
        loop.history.append(rec)
        loop.epoch, loop.batch, loop.run = loop.epoch + 1, 0, [0.0, 0.0, 0.0]
        loop.elapsed = rec["train_seconds"]
        log(json.dumps(rec))
        if env.is_main:
            ckpt.save_model(out, raw, extra)
            ckpt.atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in loop.history))
            _save_checkpoint(out, raw, opt, loop, gen.get_state(), tc, cfg, env.world)
    final = loop.history[-1]
    metrics = {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "epochs": tc.epochs,
        "train_seconds": final["train_seconds"],
        "dataset": tc.dataset,
        "model": tc.model,
        "attention": cfg.attention,
        "prune": tc.prune,
        "keep": tc.keep,
        "params": sum(p.numel() for p in raw.parameters()),
        "device": str(device),
        "world_size": env.world,
        "global_batch": B,
    }
    if env.is_main:
        if tc.resume and not (out / "model.safetensors").is_file():
            ckpt.save_model(out, raw, extra)
        ckpt.atomic_write_json(out / "metrics.json", metrics)
    dist_.barrier(env)
    return metrics
