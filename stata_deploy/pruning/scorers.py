"""Token scorers (a registry: the pruning methods) and top-k selection over the current slots."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import StataError
from ..nn.attention import AttnInfo
from ..nn.neurons import TokenIndex
from ..registry import Registry

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


def top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest values along the last axis, best first; among equal values the lower index wins.

    ``torch.topk`` leaves the order of ties to its implementation (on CPU it keeps the *higher* indices of a run of
    equal values), ONNX's TopK fixes it to the lower index first. Scores tie often (spike counts, the anchor's
    binary attention row), so the rule decides which tokens are kept: torch uses a stable descending sort here, and
    under ONNX export TopK, whose tie rule is the same, so ONNX Runtime keeps the same tokens as torch.
    """
    if torch.onnx.is_in_onnx_export():
        return values.topk(k, dim=-1).indices  # ONNX TopK: "the element with the lower index appears first"
    return values.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def select_topk(scores: torch.Tensor, timestep_wise: bool, T: int, keep: float, n_fixed: int) -> torch.Tensor:
    """Local slot indices to keep: (T, B, k) ascending; the first ``n_fixed`` slots (anchor) always kept; ties
    between equal scores go to the lower slot (``top_indices``)."""
    if not timestep_wise:
        scores = scores.unsqueeze(0).expand(T, *scores.shape)
    img = scores[..., n_fixed:]
    k = num_keep(img.shape[-1], keep)
    top = top_indices(img, k) + n_fixed
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

