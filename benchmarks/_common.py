"""Shared helpers for the benchmarks: an analytic MAC counter, a FlopCounterMode cross-check, timing and peak-RSS
utilities, and the key=value headline line.

MAC counting (forward, per sample, all T timesteps): only weight/activation products are counted — convolutions,
linear layers and the attention matrix products (Q K^T and (Q K^T) V for SSA; the Hadamard/sum forms for SDSA;
K^T V and Q (K^T V) for A²OS²A). Neuron updates, BN, pooling and the scoring of tokens are not MACs (the anchor-row
score is 1 x n x D per timestep and is listed separately). The counter follows the model's own token bookkeeping:
tokens per block come from the pruning sites and ``num_keep`` exactly as ``SpikingTransformer.forward`` uses them.
"""
from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# glibc malloc settings used on BOTH sides of every A/B (DESIGN.md section 4: they move step times 15-20%).
# MALLOC_MMAP_MAX_=0: big tensors come from the heap instead of fresh mmaps (no page-fault storm every step);
# MALLOC_TRIM_THRESHOLD_: do not hand freed heap back to the OS between steps.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}


def ensure_malloc_env(mode: str) -> None:
    """Re-exec this script with the malloc settings of ``mode`` ('tuned' or 'default') if they are not active.

    glibc reads these variables at process start, so they cannot be changed from inside Python."""
    want = MALLOC_ENV if mode == "tuned" else {}
    have = {k: os.environ.get(k) for k in MALLOC_ENV}
    if all(have[k] == want.get(k) for k in MALLOC_ENV):
        return
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    env.update(want)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def malloc_desc() -> str:
    return " ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ) or "glibc defaults"


# --------------------------------------------------------------------------------------------- MACs
@dataclass
class MacReport:
    total: float  # forward MACs per sample (all timesteps)
    stem: float
    blocks: list[float]
    head: float
    tokens_per_block: list[int]
    scoring: float = 0.0  # anchor-row / attention-row scoring products (not in total)
    parts: dict = field(default_factory=dict)


def tokens_per_block(cfg) -> list[int]:
    """Slots each block computes on, following SpikingTransformer.forward (drop mode; tp: selected tokens)."""
    from stata_deploy.pruning.scorers import num_keep

    pr = cfg.prune
    n_fixed = 1 if cfg.anchor else 0
    n_img = cfg.num_image_tokens
    sites = set(pr.resolved_sites(cfg.depth)) if pr.active else set()
    out = []
    first = min(sites) if sites else cfg.depth
    for i in range(cfg.depth):
        if pr.method == "tp" and pr.active and i >= first:
            out.append(n_fixed + num_keep(cfg.num_image_tokens, pr.keep))  # selected; n_img stays full
            continue
        if i in sites:
            n_img = num_keep(n_img, pr.keep)
        out.append(n_fixed + n_img)
    return out


def count_macs(cfg) -> MacReport:
    """Analytic forward MACs per sample for a ModelConfig (see module doc)."""
    T, D = cfg.T, cfg.dim
    chans = [cfg.in_channels, D // 8, D // 4, D // 2, D]
    res = cfg.img_size
    stem = 0.0
    for i in range(4):
        stem += res * res * 9 * chans[i] * chans[i + 1]  # conv before the stage's pool
        if i >= 4 - cfg.pool_stages:
            res //= 2
    stem += cfg.grid * cfg.grid * 9 * D * D  # relative-position conv
    toks = tokens_per_block(cfg)
    hid = D * cfg.mlp_ratio
    dh = D // cfg.heads
    blocks = []
    scoring = 0.0
    for i, n in enumerate(toks):
        lin = 4 * n * D * D + 2 * n * D * hid
        if cfg.attention == "ssa":
            att = 2 * cfg.heads * n * n * dh
        elif cfg.attention == "a2os2a":
            att = 2 * cfg.heads * n * dh * dh
        else:  # sdsa: K ⊙ V (n D) and Q ⊙ kv (n D)
            att = 2 * n * D
        blocks.append(float(lin + att))
        if cfg.prune.active and (i + 1) in set(cfg.prune.resolved_sites(cfg.depth)):
            scoring += n * D  # the anchor row (1 x n x dh per head) feeding the next site
    head = D * cfg.num_classes  # the head runs on the token mean of every timestep
    total = T * (stem + sum(blocks) + head)
    return MacReport(total, T * stem, [T * b for b in blocks], T * head, toks, T * scoring)


def flopcounter_macs(model, x) -> float:
    """Forward MACs per sample measured with torch.utils.flop_counter (matmul/conv/bmm only)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    model.train(was)
    return fc.get_total_flops() / 2 / x.shape[0]


# ------------------------------------------------------------------------------------------- timing
def add_shape_args(ap) -> None:
    """The model/input shape options of the training benchmarks: the paper's 4-384 at 32x32, T=4, batch 32."""
    ap.add_argument("--preset", default="spikformer-4-384")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--classes", type=int, default=10)


def paired_rounds(fns: dict, rounds: int, warmup: int, inner: int) -> dict:
    """{key: [round time, ...]}: every round times every fn ``inner`` times (fastest call), rotating the order."""
    keys = list(fns)
    out = {k: [] for k in keys}
    for r in range(warmup + rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        for k in order:
            ts = []
            for _ in range(inner):
                t0 = time.perf_counter()
                fns[k]()
                ts.append(time.perf_counter() - t0)
            if r >= warmup:
                out[k].append(min(ts))
    return out


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set: VmHWM of its address space.

    Not ``getrusage().ru_maxrss``: Linux carries that over fork + execve, so a child started by a process that had
    reached 6 GB would report 6 GB whatever it used itself. VmHWM belongs to the address space that execve creates.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: the best there is


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Stopwatch:
    """Wall time (``seconds``) and CPU time of this process (``cpu_seconds``, all threads) of a block. On a shared,
    oversubscribed machine the CPU time of a single-threaded step is far less disturbed by other jobs than its wall
    time (it still includes cache/memory-bandwidth interference)."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.c0 = time.process_time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0


def headline(pairs: dict) -> str:
    """The benchmark's last line: key=value pairs."""
    def f(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k}={f(v)}" for k, v in pairs.items())


def utc() -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime())
