"""Training and evaluation: the Python API the CLI wraps.

    from stata_deploy.train import TrainConfig, train
    result = train(TrainConfig(dataset="digits", model="spikformer-tiny", prune="stata", keep=0.5, out="runs/a"))
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .config import PruneConfig, make_config
from .data import Dataset, batches, load_dataset
from .errors import ConfigError, StataError
from .model import build_model
from .pruning import TokenMasks


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
    device: str = "auto"
    train_limit: int | None = None  # use only the first N training images (quick runs)
    resume: bool = False
    progress: bool = True
    checkpoint_every: int = 0  # steps; 0 = only at the end of each epoch

    def validate(self) -> "TrainConfig":
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"learning rate must be a positive number, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was requested but no CUDA device is available")
        return self


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_config_for(tc: TrainConfig, ds: Dataset):
    prune = PruneConfig(method=tc.prune, keep=tc.keep, sites=tc.sites, align=list(tc.align))
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


def save_train_state(out: Path, model, opt, epoch: int, step: int, gen: torch.Generator, history: list) -> None:
    tensors, meta = _optimizer_state(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.data"] = gen.get_state()
    ckpt.save_model(out, model)
    ckpt.save_tensors(out / "train_state.safetensors", tensors)
    ckpt.atomic_write_json(out / "train_state.json", {**meta, "epoch": epoch, "step": step, "history": history})


def train(tc: TrainConfig, ds: Dataset | None = None, log=print) -> dict:
    """Train a model; writes config.json, model.safetensors, metrics.json, metrics.jsonl into ``tc.out``."""
    from tqdm import tqdm

    tc.validate()
    ds = ds if ds is not None else load_dataset(tc.dataset, T=tc.T or 4)
    cfg = model_config_for(tc, ds)
    out = Path(tc.out)
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    model = build_model(cfg).to(device)
    model.generator = torch.Generator().manual_seed(tc.seed + 1)
    xtr, ytr = ds.x_train, ds.y_train
    if tc.train_limit:
        xtr, ytr = xtr[: tc.train_limit], ytr[: tc.train_limit]
    steps_per_epoch = math.ceil(len(ytr) / tc.batch_size)
    total = steps_per_epoch * tc.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    gen = torch.Generator().manual_seed(tc.seed)
    start_epoch, step, history = 0, 0, []
    if tc.resume:
        if not (out / "train_state.json").is_file():
            raise StataError(f"--resume: no training state in {out} (train_state.json missing)")
        loaded, _ = ckpt.load_model(out, map_location=str(device))
        if loaded.cfg.to_dict() != cfg.to_dict():
            raise StataError(f"--resume: the model in {out} was trained with a different configuration")
        model.load_state_dict(loaded.state_dict())
        st = ckpt.read_json(out / "train_state.json", "training state")
        tens = ckpt.load_tensors(out / "train_state.safetensors")
        _load_optimizer_state(opt, tens, st)
        torch.set_rng_state(tens["rng.torch"])
        gen.set_state(tens["rng.data"])
        start_epoch, step, history = st["epoch"], st["step"], st.get("history", [])
        log(f"resuming from epoch {start_epoch} (step {step})")
    else:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StataError(f"cannot create output folder {out}: {e.strerror or e}") from None
    extra = {"train": dataclasses.asdict(tc), "dataset": ds.describe()}
    t0 = time.perf_counter() - (history[-1]["train_seconds"] if history else 0.0)
    warmup = tc.warmup_epochs * steps_per_epoch
    for epoch in range(start_epoch, tc.epochs):
        model.train()
        run_loss, run_correct, seen = 0.0, 0, 0
        bar = tqdm(batches(xtr, ytr, tc.batch_size, shuffle=True, generator=gen), total=steps_per_epoch,
                   desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not tc.progress, leave=False)
        for xb, yb in bar:
            xb, yb = xb.to(device), yb.to(device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, tc.lr)
            with torch.autocast(device.type, enabled=use_amp):
                o = model(xb, align=bool(tc.align))
                loss = F.cross_entropy(o.logits, yb, label_smoothing=tc.label_smoothing)
                if o.aux_loss is not None:
                    loss = loss + o.aux_loss
            if not torch.isfinite(loss):
                raise StataError(f"training diverged: loss is {loss.item()} at step {step} (lower --lr?)")
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            step += 1
            run_loss += loss.item() * len(yb)
            run_correct += (o.logits.argmax(-1) == yb).sum().item()
            seen += len(yb)
            bar.set_postfix(loss=f"{run_loss / seen:.3f}", acc=f"{run_correct / seen:.3f}")
        ev = evaluate(model, ds.x_test, ds.y_test, device=device)
        rec = {
            "epoch": epoch + 1,
            "train_loss": run_loss / seen,
            "train_accuracy": run_correct / seen,
            **{k: ev[k] for k in ("test_accuracy", "test_loss")},
            "lr": opt.param_groups[0]["lr"],
            "train_seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        log(json.dumps(rec))
        save_train_state(out, model, opt, epoch + 1, step, gen, history)
        ckpt.save_model(out, model, extra)
        ckpt.atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    final = history[-1]
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
        "params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
    }
    ckpt.atomic_write_json(out / "metrics.json", metrics)
    return metrics
