"""Token sparsification: scorers, top-k selection, STATA alignment losses, and the one mask format.

Token positions: the block sequence holds ``n_full`` tokens; with an anchor token it sits at position 0 and is
never pruned. Slots always hold tokens in ascending position order.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .attention import AttnInfo
from .errors import StataError
from .neurons import LIFSchedule, TokenIndex
from .registry import Registry

# ----------------------------------------------------------------------------------------------- scorers
# A scorer returns (scores, timestep_wise): scores (T, B, n) if timestep-wise else (B, n), over current slots.
ScoreFn = Callable[..., tuple[torch.Tensor, bool]]
SCORERS: Registry[ScoreFn] = Registry("pruning method")


def _need_info(info: AttnInfo | None, method: str) -> AttnInfo:
    if info is None:
        raise StataError(f"pruning method {method!r} needs the previous block's attention")
    return info


def _tie_break(primary: torch.Tensor, x: torch.Tensor, info: AttnInfo) -> torch.Tensor:
    """primary + a tie-break by token activity (l1 of x over channels) that never reorders distinct primaries.

    The anchor row of spiking Q, K is a multiple of scale/heads (integer dot products of binary spikes), and the
    anchor's Q is often silent: many tokens then tie, most at exactly 0, and top-k would keep whichever positions it
    meets first (a fixed corner of the image). Among tied tokens the more active one wins; the added term is below
    1e-3 * scale / heads, so a strictly higher anchor score always wins.
    """
    act = x.detach().abs().sum(-1)  # (T, B, n) or (B, n), same shape as primary
    tie = act / (act.amax(-1, keepdim=True) + 1.0)  # in [0, 1)
    return primary + tie * (1e-3 * info.scale / info.q.shape[2])


@SCORERS.register("stata")
def score_stata(x, info, generator=None, grid=None):
    """Timestep-wise anchor token: the anchor's attention row per timestep, mean over heads (ties: activity)."""
    info = _need_info(info, "stata")
    return _tie_break(info.anchor_row(), x, info), True


@SCORERS.register("anchor")
def score_anchor(x, info, generator=None, grid=None):
    """Anchor token without the timestep-wise split (AT): anchor row averaged over timesteps (ties: activity)."""
    info = _need_info(info, "anchor")
    return _tie_break(info.anchor_row().mean(0), x.mean(0), info), False


@SCORERS.register("random")
def score_random(x, info, generator=None, grid=None):
    T, B, n, _ = x.shape
    return torch.rand((B, n), generator=generator, device=x.device), False


@SCORERS.register("l1")
def score_l1(x, info, generator=None, grid=None):
    """l1-norm of each token, averaged over timesteps."""
    return x.abs().sum(-1).mean(0), False


@SCORERS.register("ssa")
def score_ssa(x, info, generator=None, grid=None):
    """Mean attention a token receives (over queries, heads, timesteps)."""
    return _need_info(info, "ssa").mean_received().mean(0), False


@SCORERS.register("tp")
def score_tp(x, info, generator=None, grid=None, kernel: int = 3):
    """TP-Spikformer's spatiotemporal criterion on image tokens x (T, B, N, C) laid out on a grid x grid.

    temporal: softmax_n(mean_t |mean_c x_t - mean_c x_{t-1}|); spatial: softmax_n(-cos(x̄_n, ctx_n)) where the
    context is TP's all-ones C x C k x k conv of x̄ = mean_t x: every output channel equals the box-filtered channel
    sum, computed here as channel sum + box filter (same result, C x fewer MACs).
    """
    T, B, N, C = x.shape
    if grid is None or grid * grid != N:
        raise StataError("tp scoring needs the full image token grid")
    if T > 1:
        m = x.mean(-1)  # (T, B, N)
        temporal = (m[1:] - m[:-1]).abs().mean(0)
    else:
        temporal = x.new_zeros(B, N)
    xbar = x.mean(0)  # (B, N, C)
    csum = xbar.sum(-1).reshape(B, 1, grid, grid)
    ctx = F.avg_pool2d(csum, kernel, stride=1, padding=kernel // 2, count_include_pad=False) * kernel * kernel
    ctx = ctx.reshape(B, N)  # every context channel equals this value
    cos = (ctx * xbar.sum(-1)) / (ctx.abs() * math.sqrt(C) * xbar.norm(dim=-1) + 1e-6)
    return temporal.softmax(-1) + (-cos).softmax(-1), False


# --------------------------------------------------------------------------------------------- selection
def num_keep(n_img: int, keep: float) -> int:
    return max(1, math.ceil(keep * n_img - 1e-9))


def select_topk(scores: torch.Tensor, timestep_wise: bool, T: int, keep: float, n_fixed: int) -> torch.Tensor:
    """Local slot indices to keep: (T, B, k) ascending; the first ``n_fixed`` slots (anchor) always kept."""
    if not timestep_wise:
        scores = scores.unsqueeze(0).expand(T, *scores.shape)
    img = scores[..., n_fixed:]
    k = num_keep(img.shape[-1], keep)
    top = img.topk(k, dim=-1).indices + n_fixed
    top, _ = top.sort(-1)
    if n_fixed:
        fixed = torch.arange(n_fixed, device=top.device).expand(*top.shape[:-1], n_fixed)
        top = torch.cat([fixed, top], -1)
    return top


def compose(index: TokenIndex | None, local: torch.Tensor, n_full: int, timestep_wise: bool) -> TokenIndex:
    """Global index after selecting ``local`` slots (T, B, k) from the slots described by ``index``."""
    if index is None:
        g = local
        tw = timestep_wise
    else:
        g = torch.gather(index.idx.expand(local.shape[0], local.shape[1], -1), 2, local)
        tw = timestep_wise or index.timestep_wise
    return TokenIndex(g, n_full, tw)


def gather_slots(x: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """x (T, B, n, D), local (T, B, k) -> (T, B, k, D)."""
    return torch.gather(x, 2, local.unsqueeze(-1).expand(*local.shape, x.shape[-1]))


# -------------------------------------------------------------------------------------------- the masks
@dataclass
class TokenMasks:
    """Static per-timestep token masks: the one mask format for training, export and every runtime.

    sites: block index -> bool array (T, n_full) of kept tokens (positions in the full block sequence, anchor at 0
    when present). mode: "drop" (pruned tokens leave the network) or "skip" (TP: unselected tokens skip the block).
    """

    sites: dict[int, np.ndarray]
    n_full: int
    T: int
    mode: str = "drop"
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("drop", "skip"):
            raise StataError(f"mask mode must be 'drop' or 'skip', got {self.mode!r}")
        prev = None
        for s in sorted(self.sites):
            m = np.asarray(self.sites[s], dtype=bool)
            if m.shape != (self.T, self.n_full):
                raise StataError(f"mask for site {s} has shape {m.shape}, expected ({self.T}, {self.n_full})")
            counts = m.sum(1)
            if len(set(counts.tolist())) != 1 or counts[0] == 0:
                raise StataError(f"mask for site {s} must keep the same non-zero number of tokens at every timestep")
            if self.mode == "drop" and prev is not None and (m & ~prev).any():
                raise StataError(f"mask for site {s} keeps tokens that an earlier site dropped")
            self.sites[s] = m
            prev = m if self.mode == "drop" else None

    def kept(self, site: int) -> int:
        return int(self.sites[site][0].sum())

    def final_mask(self) -> np.ndarray:
        """(T, n_full) tokens present after the last site (drop mode)."""
        m = np.ones((self.T, self.n_full), dtype=bool)
        if self.mode == "drop":
            for s in sorted(self.sites):
                m &= self.sites[s]
        return m

    def to_json(self) -> dict:
        return {
            "n_full": self.n_full,
            "T": self.T,
            "mode": self.mode,
            "meta": self.meta,
            "sites": {str(s): m.astype(int).tolist() for s, m in sorted(self.sites.items())},
        }

    @classmethod
    def from_json(cls, d: dict) -> "TokenMasks":
        try:
            return cls(
                sites={int(s): np.asarray(m, dtype=bool) for s, m in d["sites"].items()},
                n_full=int(d["n_full"]),
                T=int(d["T"]),
                mode=d.get("mode", "drop"),
                meta=d.get("meta", {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StataError(f"not a valid token mask description ({e})") from None

    def save(self, path: str | Path) -> None:
        from .fileio import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> "TokenMasks":
        from .fileio import read_json

        p = Path(path)
        masks = cls.from_json(read_json(p, "mask file"))
        if not masks.sites or all(m.all() for m in masks.sites.values()):  # a file that prunes nothing is a mistake
            raise StataError(f"mask file {p} keeps every token at every site (nothing is pruned): use the model "
                             "without masks")
        return masks

    def check_model(self, cfg) -> None:
        """Raise if these masks do not fit model config ``cfg``: shapes and sites, the anchor token (position 0) kept
        everywhere, at least one image token kept at every site and timestep."""
        if self.T != cfg.T or self.n_full != cfg.num_tokens:
            raise StataError(
                f"masks are for T={self.T}, {self.n_full} tokens; the model has T={cfg.T}, {cfg.num_tokens} tokens"
            )
        first = 1 if getattr(cfg, "anchor", False) else 0
        for s, m in sorted(self.sites.items()):
            if not 0 <= s < cfg.depth:
                raise StataError(f"mask site {s} is not a block of this model (depth {cfg.depth})")
            if first and not m[:, 0].all():
                bad = np.flatnonzero(~m[:, 0]).tolist()
                raise StataError(f"mask for site {s} drops the anchor token (position 0) at timesteps {bad}; "
                                 "the anchor is never pruned")
            if not m[:, first:].any(axis=1).all():
                raise StataError(f"mask for site {s} keeps no image token at some timestep")

    def check_weights(self, weights_sha256: str | None, path, run) -> None:
        """Refuse masks calibrated for other weights than the run's (``meta['weights_sha256']``)."""
        have = self.meta.get("weights_sha256")
        if have and weights_sha256 and have != weights_sha256:
            raise StataError(f"{path} was calibrated for other weights (sha256 {have[:12]}..., the run's are "
                             f"{weights_sha256[:12]}...): regenerate it with `stata-deploy calibrate {run}`")


def local_from_mask(index: TokenIndex | None, mask: np.ndarray, B: int, device) -> torch.Tensor:
    """Local slot indices (T, B, k) selecting the tokens of ``mask`` (T, n_full) from the current slots."""
    g = torch.as_tensor(np.stack([np.flatnonzero(m) for m in mask]), device=device)  # (T, k)
    if index is None:
        return g.unsqueeze(1).expand(-1, B, -1)
    cur = index.idx[:, 0]  # (T, n) static masks: same slots for every sample
    local = torch.searchsorted(cur.contiguous(), g)
    return local.unsqueeze(1).expand(-1, B, -1)


# ------------------------------------------------------------------------------------- static plans
class SitePlan:
    """What static masks fix at one site, precomputed: the slots to gather and the token index after it.

    ``positions`` (T, k): global positions kept (ascending per timestep); ``local`` (T, k): their slot numbers among
    the slots present before the site (drop mode) or in the full sequence (skip mode); ``gather_tw``: ``local``
    differs between timesteps; ``tw``: ``positions`` differ between timesteps (the neurons after the site then
    follow ``schedule``; otherwise the slots are the neurons, as without pruning).
    """

    def __init__(self, site: int, positions: np.ndarray, local: np.ndarray, n_full: int, mode: str):
        self.site, self.positions, self.local, self.n_full, self.mode = site, positions, local, n_full, mode
        self.T, self.k = positions.shape
        self.gather_tw = bool((local != local[:1]).any())
        self.tw = bool((positions != positions[:1]).any())
        self.schedule = LIFSchedule(positions) if (self.tw and mode == "drop") else None
        self._cache: dict = {}

    def _tensor(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._cache:
            a = self.local if name == "local" else self.positions
            self._cache[key] = torch.as_tensor(a, device=device)
        return self._cache[key]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, B, n, D) -> the kept slots (T, B, k, D)."""
        local = self._tensor("local", x.device)
        if not self.gather_tw:
            return x.index_select(2, local[0])
        if torch.is_grad_enabled() and x.requires_grad:
            T, B, _, D = x.shape
            return torch.gather(x, 2, local.view(T, 1, self.k, 1).expand(T, B, self.k, D))
        out = x.new_empty((x.shape[0], x.shape[1], self.k, *x.shape[3:]))
        for t in range(x.shape[0]):
            torch.index_select(x[t], 1, local[t], out=out[t])
        return out

    def put_back(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Skip mode: x (T, B, N, D) with the kept slots replaced by the block's output y (T, B, k, D)."""
        local = self._tensor("local", x.device)
        if not self.gather_tw:
            return x.index_copy(2, local[0], y)
        T, B, _, D = x.shape
        return x.scatter(2, local.view(T, 1, self.k, 1).expand(T, B, self.k, D), y)

    def kept(self, B: int, device) -> torch.Tensor:
        """(T, B, k) global kept positions (the ``ModelOutput.kept`` format)."""
        return self._tensor("positions", device).unsqueeze(1).expand(self.T, B, self.k)

    def index(self, B: int, device) -> TokenIndex:
        """The token index of the slots after this site (drop mode) or inside the block (skip mode: dense)."""
        if self.mode == "skip":
            return TokenIndex(self.kept(B, device), self.n_full, False)
        return TokenIndex(self.kept(B, device), self.n_full, self.tw, self.schedule)


class StaticPlan:
    """Index tensors and neuron schedules for a ``TokenMasks`` object, computed once (``static_plan``)."""

    def __init__(self, masks: TokenMasks):
        self.mode, self.T, self.n_full = masks.mode, masks.T, masks.n_full
        self.sites: dict[int, SitePlan] = {}
        prev = None  # (T, n) global positions of the slots present (drop mode), None = all tokens
        for s in sorted(masks.sites):
            pos = np.stack([np.flatnonzero(r) for r in masks.sites[s]]).astype(np.int64)
            if self.mode == "drop" and prev is not None:
                local = np.stack([np.searchsorted(prev[t], pos[t]) for t in range(self.T)]).astype(np.int64)
            else:
                local = pos
            self.sites[s] = SitePlan(s, pos, local, self.n_full, self.mode)
            if self.mode == "drop":
                prev = pos
        self.checked: set = set()

    def check_model(self, masks: TokenMasks, cfg) -> None:
        key = (cfg.T, cfg.num_tokens, cfg.anchor, cfg.depth)
        if key not in self.checked:
            masks.check_model(cfg)
            self.checked.add(key)


def _fingerprint(masks: TokenMasks) -> tuple:
    return (masks.mode, masks.T, masks.n_full,
            tuple((s, m.shape, np.asarray(m, dtype=bool).tobytes()) for s, m in sorted(masks.sites.items())))


def static_plan(masks: TokenMasks, cfg=None) -> StaticPlan:
    """The ``StaticPlan`` of ``masks``, cached on the object (rebuilt if its masks were edited); with ``cfg`` the
    masks are checked against the model once."""
    fp = _fingerprint(masks)
    cached = getattr(masks, "_static_plan", None)
    if cached is None or cached[0] != fp:
        cached = (fp, StaticPlan(masks))
        object.__setattr__(masks, "_static_plan", cached)
    plan = cached[1]
    if cfg is not None:
        plan.check_model(masks, cfg)
    return plan


# ------------------------------------------------------------------------------------------ alignment
def intra_alignment(maps: torch.Tensor) -> torch.Tensor:
    """Intra-Alignment: split maps (T, B, H, n, n) along timesteps and heads, sort by l2 norm, pull the bottom
    half toward the (detached) top half. Zero when all maps are identical."""
    T, B, H, n, _ = maps.shape
    units = maps.permute(1, 0, 2, 3, 4).reshape(B, T * H, n * n)
    if T * H < 2:
        return maps.new_zeros(())
    order = units.norm(dim=-1).argsort(dim=-1, descending=True)
    units = torch.gather(units, 1, order.unsqueeze(-1).expand_as(units))
    half = (T * H) // 2
    top, bottom = units[:, :half], units[:, T * H - half :]
    return F.mse_loss(bottom, top.detach())


def inter_alignment(shallow: list[torch.Tensor], deep: torch.Tensor) -> torch.Tensor:
    """Inter-Alignment: the deepest map (detached, head-mean, interpolated) supervises each shallower one."""
    teacher = deep.mean(2).detach()  # (T, B, n_d, n_d)
    loss = deep.new_zeros(())
    for m in shallow:
        student = m.mean(2)  # (T, B, n_s, n_s)
        T, B, n, _ = student.shape
        t = F.interpolate(teacher.reshape(T * B, 1, *teacher.shape[-2:]), size=(n, n), mode="bilinear", align_corners=False)
        loss = loss + F.mse_loss(student, t.reshape(T, B, n, n))
    return loss


SCHEDULES = ("per-timestep", "fixed")


@torch.no_grad()
def calibrate_masks(model, batches, progress=None, schedule: str = "per-timestep") -> TokenMasks:
    """Freeze static masks: per site (and, with ``schedule="per-timestep"``, per timestep) keep the tokens most
    often kept by dynamic top-k on the calibration batches (later sites restricted to what earlier sites keep).

    ``schedule="fixed"``: the same tokens at every timestep (counts summed over T). A fixed schedule is entirely
    structural, so a pruned NIR file is exact for a reader that ignores our metadata."""
    if schedule not in SCHEDULES:
        raise StataError(f"unknown mask schedule {schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    cfg = model.cfg
    if not cfg.prune.active:
        raise StataError("this model has no pruning configured (method none or keep 1.0): nothing to calibrate")
    model.eval()
    T, n_full = cfg.T, cfg.num_tokens
    counts: dict[int, np.ndarray] = {}
    for xb in batches:
        out = model(xb)
        for site, g in out.kept.items():  # g: (T, B, k) global positions
            c = counts.setdefault(site, np.zeros((T, n_full), dtype=np.int64))
            gi = g.cpu().numpy()
            for t in range(T):
                np.add.at(c[t], gi[t].reshape(-1), 1)
        if progress is not None:
            progress.update(1)
    mode = "skip" if cfg.prune.method == "tp" else "drop"
    sites: dict[int, np.ndarray] = {}
    allowed = np.ones((T, n_full), dtype=bool)
    fixed = 1 if cfg.anchor else 0
    n_present = cfg.num_image_tokens
    for site in sorted(counts):
        k = num_keep(n_present, cfg.prune.keep)
        m = np.zeros((T, n_full), dtype=bool)
        for t in range(T):
            c = (counts[site].sum(0) if schedule == "fixed" else counts[site][t]).astype(float)
            c[~allowed[t]] = -1
            c[:fixed] = -1
            order = np.argsort(-c, kind="stable")[:k]
            m[t, order] = True
            m[t, :fixed] = True
        sites[site] = m
        if mode == "drop":
            allowed = m
            n_present = k
    return TokenMasks(sites, n_full, T, mode, meta={"method": cfg.prune.method, "keep": cfg.prune.keep,
                                                    "schedule": schedule})
