"""FROZEN REFERENCE — not part of the package. Do not edit, do not import outside tests.

The string-named SOP counter of ``stata_deploy/sops.py`` exactly as it was at commit 4fe29a6 (2026-12), before
the counter became a lowering of the IR (``stata_deploy/ir/count.py``). It rebuilds every layer from names like
``stem.stages.{i}.lif`` and repeats model.py's channel and pooling rules. ``tests/test_sops.py`` asserts that the IR
counter gives the same numbers, layer by layer. Only the entry point was renamed (``count_ops`` ->
``count_ops_reference``); the types (LayerOps, OpsReport, CountError) are the package's. Delete this file once the
equality contract of issue 13 is no longer needed (e.g. when a counting convention changes on purpose).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from stata_deploy.config import ModelConfig
from stata_deploy.pruning.masks import TokenMasks
from stata_deploy.results import RunResult
from stata_deploy.energy.counter import CountError, LayerOps, OpsReport

ATTENTIONS = ("ssa", "sdsa", "a2os2a")  # what this frozen counter knows (tests skip anything newer)
METHODS = ("none", "stata", "anchor", "random", "l1", "ssa", "tp")

# ------------------------------------------------------------------------------------------------ helpers
def _t(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu()
    return torch.from_numpy(np.asarray(a))


def _per_t(x: torch.Tensor) -> torch.Tensor:
    """Sum everything but dim 0 -> (T,) float64. Bool tensors are counted in int64; float tensors (integer-valued
    counts) are summed per (t, b) in their own dtype (exact below 2**24 per sample) and then in float64."""
    if x.dtype == torch.bool:
        return x.reshape(x.shape[0], -1).sum(1).to(torch.float64)
    if x.dim() < 2:
        return x.to(torch.float64)
    return x.reshape(x.shape[0], x.shape[1], -1).sum(-1).to(torch.float64).sum(1)


def _nz(x: torch.Tensor) -> torch.Tensor:
    return (x != 0).to(torch.float32)


def _conv_fanout_map(h: int, w: int, k: int = 3, pad: int = 1) -> torch.Tensor:
    """(H, W) number of output positions of a stride-1 k x k conv (padding pad) each input pixel reaches."""

    def valid(n):  # outputs o = i - d for kernel offsets d in [-pad, k - 1 - pad]
        return torch.tensor([sum(1 for d in range(-pad, k - pad) if 0 <= i - d < n) for i in range(n)],
                            dtype=torch.float64)

    return valid(h)[:, None] * valid(w)[None, :]


def _ceil_log2(k: int) -> int:
    return max(1, math.ceil(math.log2(k + 1)))


class _Counter:
    def __init__(self, cfg: ModelConfig, result: RunResult, B: int, T: int):
        self.cfg, self.result, self.B, self.T = cfg, result, B, T
        self.layers: list[LayerOps] = []

    def spikes(self, name: str) -> torch.Tensor:
        s = self.result.spikes.get(name)
        if s is None:
            raise CountError(f"the run result has no output for neuron layer {name!r} (was it recorded?)")
        return _t(s)

    def add(self, name, kind, neuron=None, fan_out=0, events=None, **counts) -> LayerOps:
        c = {f: (v.to(torch.float64).numpy() / self.B) for f, v in counts.items() if v is not None}
        ev = events.to(torch.float64).numpy() / self.B if events is not None else None
        lo = LayerOps(name, kind, neuron, fan_out, c, ev)
        self.layers.append(lo)
        return lo

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.T, dtype=torch.float64)

    # ---------------------------------------------------------------------------------------- neurons
    def neuron_counts(self, name: str, idle_tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Updates/spikes of neuron layer ``name``; idle_tokens (T,) = decaying token-slots summed over the batch."""
        s = self.spikes(name)  # (T, B, ...)
        per = s[0, 0].numel()  # neurons per sample per timestep
        upd = torch.full((self.T,), float(per * self.B), dtype=torch.float64)
        out = {"neuron_updates": upd, "spikes": _per_t(s != 0)}
        if idle_tokens is not None:
            feat = per // s.shape[2] if s.dim() > 2 else per
            out["idle_neuron_updates"] = idle_tokens.to(torch.float64) * feat
        return out

    # ------------------------------------------------------------------------------------- synaptic ops
    def conv(self, name, x, cout, neuron, idle=None):
        """3x3 conv, padding 1, stride 1 on x (T, B, C, H, W)."""
        fmap = _conv_fanout_map(x.shape[-2], x.shape[-1]).to(x.dtype if x.is_floating_point() else torch.float64)
        integer = (x == x.round()).flatten(2).all(-1)  # (T, B): this sample's input is integer-valued
        wabs = (x.abs() * fmap).flatten(2).sum(-1).to(torch.float64) * cout  # (T, B)
        wnz = (_nz(x) * fmap).flatten(2).sum(-1).to(torch.float64) * cout
        acs = (wabs * integer).sum(1)
        macs = (wnz * ~integer).sum(1)
        self.add(name, "conv", neuron, int(cout * 9), events=wnz.sum(1), macs=macs, acs=acs,
                 **(self.neuron_counts(neuron, idle) if neuron else {}))

    def linear(self, name, x, real_rows, fan_out, neuron, idle=None, kind="linear"):
        """Per-token Linear on x (T, B, n, Din) whose rows marked in real_rows (T, B, n) are real-valued (anchor):
        x holds only the integer part of those rows, and all Din entries of a real row count as non-zero."""
        din = x.shape[-1]
        memo = getattr(self, "_memo", None)
        if memo is not None and memo[0] is x:  # q, k, v (and fc1) read the same residual tensor: reduce it once
            absx, nzx = memo[1], memo[2]
        else:
            absx = x.abs().sum(-1).to(torch.float64)  # (T, B, n), row sums are exact in float32
            nzx = (x != 0).sum(-1).to(torch.float64)
            self._memo = (x, absx, nzx)
        if real_rows is not None and bool(real_rows.any()):
            r = real_rows.to(torch.float64)
            acs = (absx * (1 - r)).flatten(1).sum(1) * fan_out
            macs = (r * din).flatten(1).sum(1) * fan_out
            events = ((nzx * (1 - r)) + r * din).flatten(1).sum(1) * fan_out
        else:
            acs = absx.flatten(1).sum(1) * fan_out
            macs = self.zeros()
            events = nzx.flatten(1).sum(1) * fan_out
        self.add(name, kind, neuron, fan_out, events=events, macs=macs, acs=acs,
                 **(self.neuron_counts(neuron, idle) if neuron else {}))


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    T, B, N, D = x.shape
    return x.reshape(T, B, N, h, D // h).transpose(2, 3)  # (T, B, H, N, dh)


def _matmul_pairs(a_nz: torch.Tensor, b_nz: torch.Tensor) -> torch.Tensor:
    """Number of (i, k, j) with a[..., i, k] != 0 and b[..., k, j] != 0, per timestep: sum_k colnz(a)_k rownz(b)_k."""
    ca = a_nz.sum(-2, dtype=torch.float64)  # (..., K)
    rb = b_nz.sum(-1, dtype=torch.float64)  # (..., K)
    return _per_t(ca * rb)


# --------------------------------------------------------------------------------------------- counting
@torch.no_grad()
def count_ops_reference(cfg: ModelConfig, result: RunResult, masks: TokenMasks | None = None) -> OpsReport:
    """Count the operations of one batch run of the model described by ``cfg`` (see the module doc).

    ``masks``: the static masks the run used (None: dynamic pruning as configured in cfg, scorer included).
    """
    if result.inputs is None:
        raise CountError("the run result has no encoded input (RunResult.inputs): cannot count the first layer")
    x = _t(result.inputs)
    if x.dim() != 5:
        raise CountError(f"RunResult.inputs must be (T, B, C, H, W), got shape {tuple(x.shape)}")
    T, B = x.shape[:2]
    if T != cfg.T:
        raise CountError(f"the run result has T={T}, the model T={cfg.T}")
    c = _Counter(cfg, result, B, T)
    _count_model(c, cfg, x, masks)
    return OpsReport(c.layers, B, T)


def _count_model(c: _Counter, cfg: ModelConfig, x: torch.Tensor, masks: TokenMasks | None) -> None:
    T, B = c.T, c.B
    d = cfg.dim
    chans = [cfg.in_channels, d // 8, d // 4, d // 2, d]
    # ---------------------------------------------------------------------------------------- SPS stem
    for i in range(4):
        neuron = f"stem.stages.{i}.lif"
        c.conv(f"stem.stages.{i}.conv", x, chans[i + 1], neuron)
        x = c.spikes(neuron)
        if i >= 4 - cfg.pool_stages:
            y = torch.nn.functional.max_pool2d(x.flatten(0, 1).float(), 3, 2, 1)
            y = y.reshape(T, B, *y.shape[1:])
            c.add(f"stem.stages.{i}.pool", "pool", compares=_per_t(torch.ones_like(y)) * 8)
            x = y
    c.conv("stem.rpe", x, d, "stem.rpe_lif")
    x = (x + c.spikes("stem.rpe_lif")).flatten(3).transpose(2, 3).to(torch.float32)  # (T, B, N, D) in {0,1,2}
    n_fixed = 1 if cfg.anchor else 0
    if n_fixed:
        x = torch.cat([x.new_zeros(T, B, 1, d), x], 2)  # the anchor row's integer part (its real part is implicit)
    N = x.shape[2]
    real = torch.zeros(T, B, N, dtype=torch.bool)
    real[:, :, :n_fixed] = True

    # ------------------------------------------------------------------------------------------ blocks
    pr = cfg.prune
    kept = {int(s): _t(g).long() for s, g in c.result.kept.items()}
    if masks is not None:
        masks.check_model(cfg)
        sites = set(masks.sites)
        skip_mode = masks.mode == "skip"
    else:
        sites = set(pr.resolved_sites(cfg.depth)) if pr.active else set()
        skip_mode = pr.method == "tp"
    first = min(sites) if sites else cfg.depth
    pos = torch.arange(N).expand(T, B, N)  # global position of each slot
    prev_attn = None  # (q, k) of the previous block, per head, for the scorers
    for i in range(cfg.depth):
        p = f"blocks.{i}"
        if skip_mode and i >= first and (masks is None or i in sites):
            sel = _kept(kept, i, T, B)
            if masks is None:
                _score(c, p, "tp", x[:, :, n_fixed:], None, sel.shape[-1] - n_fixed, timestep_wise=False, grid=cfg.grid)
            ie = sel.unsqueeze(-1).expand(*sel.shape, d)
            xs = torch.gather(x, 2, ie)
            rs = torch.gather(real, 2, sel)
            xs, prev_attn = _count_block(c, cfg, p, xs, rs, None)
            x = x.scatter(2, ie, xs)
        else:
            if i in sites:
                g = _kept(kept, i, T, B)
                inv = torch.full((T, B, N), -1, dtype=torch.long)
                inv.scatter_(2, pos, torch.arange(pos.shape[-1]).expand_as(pos).contiguous())
                local = torch.gather(inv, 2, g)
                if bool((local < 0).any()):
                    raise CountError(f"site {i} keeps tokens that an earlier site dropped: the run result is inconsistent")
                if masks is None:
                    tw = pr.method == "stata"
                    _score(c, p, pr.method, x, prev_attn, g.shape[-1] - n_fixed, timestep_wise=tw, grid=cfg.grid,
                           n_fixed=n_fixed)
                x = torch.gather(x, 2, local.unsqueeze(-1).expand(*local.shape, d))
                real = torch.gather(real, 2, local)
                pos = g
            idle = None
            if i >= first and not skip_mode:
                # token-slots whose membrane decays: tokens present at another timestep but not at this one
                present = torch.zeros(B, N, dtype=torch.bool)
                for t in range(T):
                    present.scatter_(1, pos[t], True)
                union = present.sum(1, dtype=torch.float64)  # (B,)
                idle = (union.sum() - float(B * pos.shape[-1])).expand(T).clone()
                if float(idle.abs().sum()) == 0:
                    idle = None
            x, prev_attn = _count_block(c, cfg, p, x, real, idle)
    # --------------------------------------------------------------------------------------------- head
    img = x[:, :, n_fixed:] if n_fixed else x
    c.add("head.pool", "pool", acs=_per_t(img.abs()))  # token sum: each non-zero value accumulated (value-weighted)
    feat = img.sum(2)  # (T, B, D) token sum (the mean's 1/n folds into the head weights)
    nz = _per_t(_nz(feat)) * cfg.num_classes
    c.add("head", "head", None, cfg.num_classes, events=nz, macs=nz)


def _kept(kept: dict, i: int, T: int, B: int) -> torch.Tensor:
    if i not in kept:
        raise CountError(f"the run result has no kept tokens for pruning site {i}")
    g = kept[i]
    if g.dim() != 3 or g.shape[0] != T or g.shape[1] != B:
        raise CountError(f"kept tokens of site {i} must be (T={T}, B={B}, k), got {tuple(g.shape)}")
    return g


def _count_block(c: _Counter, cfg: ModelConfig, p: str, x: torch.Tensor, real: torch.Tensor, idle):
    """One block on slots x (T, B, n, D) (integer part; rows in ``real`` are real-valued). Returns the block output
    (integer part) and (q, k) per head for the next scorer."""
    d, h = cfg.dim, cfg.heads
    a = f"{p}.attn"
    neuron_idle = idle
    for br in ("q", "k", "v"):
        nm = f"{a}.{br}_lif"
        stateless = cfg.attention == "a2os2a" and br == "k"  # ReLU: no membrane, nothing decays
        c.linear(f"{a}.{br}", x, real, d, nm, None if stateless else neuron_idle)
    q = _heads(c.spikes(f"{a}.q_lif").float(), h)  # (T, B, H, n, dh)
    k = _heads(c.spikes(f"{a}.k_lif").float(), h)
    v = _heads(c.spikes(f"{a}.v_lif").float(), h)
    nn_ = c.neuron_counts
    if cfg.attention == "ssa":
        c.add(f"{a}.qk", "attention", attention_acs=_matmul_pairs(_nz(q), _nz(k).transpose(-1, -2)))
        attn = q @ k.transpose(-1, -2)  # (T, B, H, n, n) integers
        c.add(f"{a}.av", "attention", f"{a}.attn_lif", attention_acs=_matmul_pairs(_nz(attn), _nz(v)),
              **nn_(f"{a}.attn_lif", neuron_idle))
        y = c.spikes(f"{a}.attn_lif").float()
    elif cfg.attention == "sdsa":
        kv = _nz(k) * _nz(v)
        c.add(f"{a}.kv", "attention", attention_acs=_per_t(kv))
        c.add(f"{a}.kv_sum", "attention", f"{a}.attn_lif", attention_acs=_per_t(kv), **nn_(f"{a}.attn_lif"))
        s = c.spikes(f"{a}.attn_lif").float()  # (T, B, 1, D)
        T, B, _, D = s.shape
        gate = _heads(s, h)  # (T, B, H, 1, dh)
        yh = q * gate
        c.add(f"{a}.qkv_gate", "attention", attention_acs=_per_t(_nz(yh)))
        y = yh.transpose(2, 3).reshape(T, B, -1, D)
    elif cfg.attention == "a2os2a":
        kt = k.transpose(-1, -2)
        c.add(f"{a}.ktv", "attention", attention_acs=_matmul_pairs(_nz(kt), _nz(v)))
        ktv = kt @ v  # (T, B, H, dh, dh) real
        c.add(f"{a}.qktv", "attention", f"{a}.attn_lif", attention_acs=_matmul_pairs(_nz(q), _nz(ktv)),
              **nn_(f"{a}.attn_lif", neuron_idle))
        y = c.spikes(f"{a}.attn_lif").float()
    else:  # pragma: no cover - config validation rejects it
        raise CountError(f"no op counting for attention {cfg.attention!r}")
    c.linear(f"{a}.proj", y, None, d, f"{a}.proj_lif", neuron_idle)
    x = x + c.spikes(f"{a}.proj_lif").float()
    m = f"{p}.mlp"
    c.linear(f"{m}.fc1", x, real, d * cfg.mlp_ratio, f"{m}.fc1_lif", neuron_idle)
    c.linear(f"{m}.fc2", c.spikes(f"{m}.fc1_lif").float(), None, d, f"{m}.fc2_lif", neuron_idle)
    x = x + c.spikes(f"{m}.fc2_lif").float()
    return x, (q, k)


def _topk_compares(n: int, k: int) -> float:
    return float(n * _ceil_log2(k)) if k < n else 0.0


def _score(c: _Counter, p: str, method: str, x: torch.Tensor, prev, k_img: int, timestep_wise: bool, grid: int,
           n_fixed: int = 0) -> None:
    """The cost of a dynamic scorer at block ``p`` plus its top-k selection, as layer ``{p}.scorer``."""
    T, B = c.T, c.B
    zeros = c.zeros
    acs, macs, att = zeros(), zeros(), zeros()
    n_img = x.shape[2] - n_fixed
    sel = _topk_compares(n_img, k_img) * B
    compares = zeros()
    if timestep_wise:
        compares += sel
    else:
        compares[-1] += sel
    if method in ("stata", "anchor"):
        q, k = prev
        H, n = q.shape[2], q.shape[3]
        att += _matmul_pairs(_nz(q[:, :, :, :1]), _nz(k).transpose(-1, -2))  # Q_0 K^T per head
        acs += float(B * H * n)  # mean over heads
        acs += _per_t(_nz(x)) + float(2 * B * n)  # tie-break: token activity (|x| over channels), scaled, added
        if method == "anchor":
            acs += float(2 * B * n)  # mean over timesteps of the score and of the activity
    elif method == "ssa":
        q, k = prev
        H, n = q.shape[2], q.shape[3]
        acs += _per_t(_nz(q))  # sum over queries
        qs = q.sum(3, keepdim=True)
        att += _matmul_pairs(_nz(qs), _nz(k).transpose(-1, -2))
        acs += float(B * H * n) + float(B * n)  # mean over heads, over timesteps
    elif method == "l1":
        acs += _per_t(_nz(x)) + float(B * x.shape[2])  # |x| summed over channels, then over timesteps
    elif method == "random":
        pass
    elif method == "tp":
        C = x.shape[-1]
        nzx = _per_t(_nz(x))
        acs += nzx  # channel mean per timestep
        if T > 1:
            acs[1:] += float(2 * B * n_img)  # |m_t - m_{t-1}| and its mean over t
        acs += nzx  # mean over t
        xbar = x.sum(0)  # (B, N, C)
        fmap = _conv_fanout_map(grid, grid)
        box = float(fmap.sum()) * B  # 3x3 box filter (count_include_pad=False): one add per window element
        acs[-1] += float(_nz(xbar).sum()) + box
        macs[-1] += float(B * n_img * C) + float(B * n_img * 5)  # norm squares; cos: ctx*s, |ctx|, sqrt, prod, div
        macs[-1] += float(B * n_img * 3 * 2) + float(B * n_img)  # two softmaxes (exp, add, div) and their sum
    else:
        raise CountError(f"no op counting for pruning method {method!r}")
    c.add(f"{p}.scorer", "scorer", acs=acs, macs=macs, attention_acs=att, compares=compares)
