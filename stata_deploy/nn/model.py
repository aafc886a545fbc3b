"""Spiking vision transformer (Spikformer layout) with token pruning sites.

x (T, B, C, H, W) -> SPS stem -> tokens (T, B, N, D) [+ anchor at 0] -> L blocks -> mean over tokens -> head.
At a pruning site the tokens are scored, the top ceil(gamma * n) kept and the rest gathered out, so every later
block computes on fewer tokens. With static ``TokenMasks`` the kept sets come from the masks instead: their index
tensors and neuron schedules are computed once per masks object (``pruning.masks.static_plan``), so a forward with static
masks does only work that shrinks with the kept tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .attention import ATTENTIONS, AttnInfo, LinearBN
from ..config import ModelConfig
from .neurons import LIF, TokenIndex
from ..pruning.scorers import SCORERS, compose, gather_slots, select_topk
from ..pruning.masks import TokenMasks, static_plan
from ..pruning.alignment import inter_alignment, intra_alignment


class ConvBN(nn.Module):
    """Conv2d 3x3 + BatchNorm2d applied per timestep. x: (T, B, C, H, W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[:2]
        y = self.bn(self.conv(x.flatten(0, 1)))
        return y.reshape(T, B, *y.shape[1:])


class MaxPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        T, B = x.shape[:2]
        y = self.pool(x.flatten(0, 1))
        return y.reshape(T, B, *y.shape[1:])


class SPS(nn.Module):
    """Spiking patch splitting: 4 x (conv3x3 + BN + LIF [+ maxpool]), then a relative-position conv branch."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.dim
        chans = [cfg.in_channels, d // 8, d // 4, d // 2, d]
        self.stages = nn.ModuleList()
        for i in range(4):
            stage = nn.Module()
            stage.conv = ConvBN(chans[i], chans[i + 1])
            stage.lif = LIF()
            stage.pool = MaxPool() if i >= 4 - cfg.pool_stages else None
            self.stages.append(stage)
        self.rpe = ConvBN(d, d)
        self.rpe_lif = LIF()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for st in self.stages:
            x = st.lif(st.conv(x))
            if st.pool is not None:
                x = st.pool(x)
        x = x + self.rpe_lif(self.rpe(x))  # (T, B, D, g, g), values in {0, 1, 2}
        return x.flatten(3).transpose(2, 3)  # (T, B, N, D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.dim * cfg.mlp_ratio
        self.fc1 = LinearBN(cfg.dim, h, bias=True)
        self.fc1_lif = LIF()
        self.fc2 = LinearBN(h, cfg.dim, bias=True)
        self.fc2_lif = LIF()

    def forward(self, x, index=None):
        return self.fc2_lif(self.fc2(self.fc1_lif(self.fc1(x), index)), index)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = ATTENTIONS.get(cfg.attention)(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, index: TokenIndex | None = None) -> tuple[torch.Tensor, AttnInfo]:
        a, info = self.attn(x, index)
        x = x + a
        x = x + self.mlp(x, index)
        return x, info


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, classes), mean over timesteps
    logits_t: torch.Tensor  # (T, B, classes)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # site -> (T, B, k) global kept positions
    aux_loss: torch.Tensor | None = None  # alignment losses (weighted), when requested
    tokens_per_block: list[int] = field(default_factory=list)  # slots computed per block (tp: selected)


class SpikingTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.stem = SPS(cfg)
        self.anchor = nn.Parameter(torch.zeros(1, 1, 1, cfg.dim)) if cfg.anchor else None
        if self.anchor is not None:
            nn.init.trunc_normal_(self.anchor, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.generator: torch.Generator | None = None  # for the random scorer

    # --------------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Direct encoding: (B, C, H, W) images are repeated over T; (T, B, C, H, W) inputs pass as they are."""
        if x.dim() == 4:
            return x.unsqueeze(0).expand(self.cfg.T, *x.shape)
        return x

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.encode(x))  # (T, B, N, D)
        if self.anchor is not None:
            T, B = x.shape[:2]
            x = torch.cat([self.anchor.expand(T, B, 1, -1), x], 2)
        return x

    def forward(self, x: torch.Tensor, masks: TokenMasks | None = None, align: bool = False) -> ModelOutput:
        if masks is not None:
            return self._forward_static(x, masks, align)
        cfg, pr = self.cfg, self.cfg.prune
        x = self.tokens(x)  # (T, B, N, D)
        T, B, N, _ = x.shape
        n_fixed = 1 if cfg.anchor else 0
        sites = set(pr.resolved_sites(cfg.depth)) if pr.active else set()
        first = min(sites) if sites else cfg.depth
        skips = range(first, cfg.depth) if pr.method == "tp" else ()  # TP: every block from the first site on

        def select(i, x, index, info):
            scores, tw = SCORERS.get(pr.method)(x, info, generator=self.generator, grid=cfg.grid)
            local = select_topk(scores.detach(), tw, T, pr.keep, n_fixed)
            x = gather_slots(x, local)
            if self.training and pr.anchor_grad and cfg.anchor and scores.requires_grad:
                x = _score_gradient(x, scores, local, tw)
            return x, compose(index, local, N, tw)

        return self._blocks(x, align, sites, skips, select, None)

    def _forward_static(self, x: torch.Tensor, masks: TokenMasks, align: bool) -> ModelOutput:
        """Forward with static masks: the kept slots are gathered with precomputed indices; after a site whose
        tokens differ between timesteps the neurons follow the site's precomputed schedule (neurons.LIFSchedule).
        Skip mode (TP): the kept tokens of a site go through its block, the others keep their input."""
        plan = static_plan(masks, self.cfg)
        x = self.tokens(x)  # (T, B, N, D)
        B = x.shape[1]

        def select(i, x, index, info):
            sp = plan.sites[i]
            return sp.gather(x), sp.index(B, x.device)

        return self._blocks(x, align, plan.sites, plan.sites if plan.mode == "skip" else (), select, masks)

    def _blocks(self, x, align, sites, skips, select, masks) -> ModelOutput:
        """The block loop of both forwards, from the tokens x (T, B, N, D). A block in ``skips`` is a TP skip block
        (``_skip_block``, with ``masks`` static or None dynamic); before any other block in ``sites``,
        ``select(i, x, index, info)`` (``info`` of the block before) gives the kept slots and their ``TokenIndex``."""
        cfg, pr = self.cfg, self.cfg.prune
        n_fixed = 1 if cfg.anchor else 0
        align_sites = set(pr.resolved_align_sites(cfg.depth)) if (align and pr.align) else set()
        index: TokenIndex | None = None
        info: AttnInfo | None = None
        kept: dict[int, torch.Tensor] = {}
        maps: dict[int, torch.Tensor] = {}
        per_block: list[int] = []
        for i, blk in enumerate(self.blocks):
            if i in skips:
                x, info, kept[i] = self._skip_block(blk, x, i, masks, n_fixed)
                per_block.append(kept[i].shape[-1])
            else:
                if i in sites:
                    x, index = select(i, x, index, info)
                    kept[i] = index.idx
                x, info = blk(x, index)
                per_block.append(x.shape[2])
            if i in align_sites:
                maps[i] = info.attention_map()
        return self._finish(x, n_fixed, kept, maps, per_block)

    def _finish(self, x, n_fixed, kept, maps, per_block) -> ModelOutput:
        pr = self.cfg.prune
        img = x[:, :, n_fixed:] if n_fixed else x
        logits_t = self.head(img.mean(2))  # (T, B, classes)
        aux = None
        if maps:
            aux = x.new_zeros(())
            order = sorted(maps)
            if "intra" in pr.align:
                aux = aux + pr.intra_weight * sum(intra_alignment(maps[s]) for s in order)
            if "inter" in pr.align and len(order) > 1:
                aux = aux + pr.inter_weight * inter_alignment([maps[s] for s in order[:-1]], maps[order[-1]])
        return ModelOutput(logits_t.mean(0), logits_t, kept, aux, per_block)

    def _skip_block(self, blk, x, i, masks, n_fixed):
        """TP block-level early stopping: selected tokens go through the block; the rest keep their input (dynamic
        selection; with static ``masks`` the site's precomputed plan)."""
        cfg = self.cfg
        T, B, N, D = x.shape
        if masks is not None:
            sp = static_plan(masks, cfg).sites[i]
            y, info = blk(sp.gather(x), sp.index(B, x.device))
            return sp.put_back(x, y), info, sp.kept(B, x.device)
        img = x[:, :, n_fixed:]
        scores, _ = SCORERS.get("tp")(img, None, grid=cfg.grid)
        local = select_topk(torch.cat([scores.new_zeros(B, n_fixed), scores], 1), False, T, cfg.prune.keep, n_fixed)
        index = TokenIndex(local, N, False)
        y, info = blk(gather_slots(x, local), index)
        out = x.scatter(2, local.unsqueeze(-1).expand(*local.shape, D), y)
        return out, info, local


def _score_gradient(x: torch.Tensor, scores: torch.Tensor, local: torch.Tensor, tw: bool) -> torch.Tensor:
    """x (T, B, k, D) gathered slots times (1 + s - s.detach()) of their scores: the forward value is x exactly
    (s - s.detach() is 0.0), the backward gives each kept token's score the gradient <dL/dx_j, x_j> — a
    straight-through path from the loss to the scorer's inputs (the anchor's Q), which top-k alone cuts."""
    s = scores if tw else scores.unsqueeze(0).expand(x.shape[0], *scores.shape)  # (T, B, n)
    s = torch.gather(s, 2, local)  # (T, B, k)
    return x * (1 + (s - s.detach())).unsqueeze(-1)


def build_model(cfg: ModelConfig) -> SpikingTransformer:
    return SpikingTransformer(cfg)


def with_prune(model: SpikingTransformer, **prune) -> SpikingTransformer:
    """The same weights under other pruning settings (e.g. training-free TP on a trained model), in eval mode."""
    other = build_model(model.cfg.replace(prune=prune))
    other.load_state_dict(model.state_dict())
    return other.eval()


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
