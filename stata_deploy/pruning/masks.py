"""Static per-timestep token masks (the one mask format) and the index plans they compile to."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import StataError
from ..nn.neurons import LIFSchedule, TokenIndex

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
        from ..fileio import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> "TokenMasks":
        from ..fileio import read_json

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

