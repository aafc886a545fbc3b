"""Model configuration (a dataclass serialised as JSON) and the preset registry."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .errors import ConfigError
from .registry import Registry

ATTENTION_KINDS = ("ssa", "sdsa", "a2os2a")
PRUNE_METHODS = ("none", "stata", "anchor", "random", "l1", "ssa", "tp")


@dataclass
class PruneConfig:
    """Token sparsification settings.

    method: one of PRUNE_METHODS; keep: gamma in (0, 1], fraction of image tokens kept at each site
    (of the tokens present there); sites: block indices before which tokens are pruned (default: every 3
    blocks from block L//3, at least block 1); align: STATA alignment losses to use ("intra", "inter").
    """

    method: str = "none"
    keep: float = 1.0
    sites: list[int] | None = None
    align: list[str] = field(default_factory=list)
    align_sites: list[int] | None = None
    intra_weight: float = 1e-2
    inter_weight: float = 1e-2

    def validate(self, depth: int) -> None:
        if self.method not in PRUNE_METHODS:
            raise ConfigError(f"unknown pruning method {self.method!r}; choose one of: {', '.join(PRUNE_METHODS)}")
        if not (isinstance(self.keep, (int, float)) and 0.0 < float(self.keep) <= 1.0) or math.isnan(self.keep):
            raise ConfigError(f"keep ratio must be in (0, 1], got {self.keep}")
        for s in self.resolved_sites(depth):
            if not 1 <= s < depth:
                raise ConfigError(f"pruning site {s} must be a block index in [1, {depth - 1}]")
        for a in self.align:
            if a not in ("intra", "inter"):
                raise ConfigError(f"unknown alignment {a!r}; choose from intra, inter")

    def resolved_sites(self, depth: int) -> list[int]:
        if self.sites is not None:
            return sorted(set(int(s) for s in self.sites))
        first = max(1, depth // 3)
        return list(range(first, depth, 3)) if depth > 1 else []

    def resolved_align_sites(self, depth: int) -> list[int]:
        if self.align_sites is not None:
            return sorted(set(self.align_sites))
        return sorted({0, min(depth - 1, depth // 3 + 1), depth - 1})

    @property
    def active(self) -> bool:
        return self.method != "none" and self.keep < 1.0


@dataclass
class ModelConfig:
    """A spiking vision transformer (Spikformer layout).

    img_size/in_channels: input; T: timesteps; dim: embedding width D; depth: blocks L; heads; mlp_ratio;
    pool_stages: max-pools in the SPS stem (token grid = img_size / 2**pool_stages); attention: ssa|sdsa|a2os2a;
    anchor: prepend a learnable anchor token (required by stata/anchor scoring).
    """

    name: str = "custom"
    img_size: int = 8
    in_channels: int = 1
    num_classes: int = 10
    T: int = 4
    dim: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    pool_stages: int = 0
    attention: str = "ssa"
    anchor: bool = False
    attn_scale: float = 0.125
    prune: PruneConfig = field(default_factory=PruneConfig)

    @property
    def grid(self) -> int:
        return self.img_size // (2**self.pool_stages)

    @property
    def num_image_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        return self.num_image_tokens + (1 if self.anchor else 0)

    def validate(self) -> "ModelConfig":
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"unknown attention {self.attention!r}; choose one of: {', '.join(ATTENTION_KINDS)}")
        for name in ("img_size", "in_channels", "num_classes", "T", "dim", "depth", "heads", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.dim % self.heads or self.dim % 8:
            raise ConfigError(f"dim {self.dim} must be divisible by heads ({self.heads}) and by 8")
        if self.img_size % (2**self.pool_stages) or self.grid < 1:
            raise ConfigError(f"img_size {self.img_size} must be divisible by 2**pool_stages ({2**self.pool_stages})")
        self.prune.validate(self.depth)
        if self.prune.method in ("stata", "anchor") and not self.anchor:
            self.anchor = True
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError("model config must be a JSON object")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(sorted(unknown))}")
        prune = d.pop("prune", {}) or {}
        pknown = {f.name for f in dataclasses.fields(PruneConfig)}
        if set(prune) - pknown:
            raise ConfigError(f"unknown prune config keys: {', '.join(sorted(set(prune) - pknown))}")
        return cls(**d, prune=PruneConfig(**prune)).validate()

    def replace(self, **kw) -> "ModelConfig":
        d = self.to_dict()
        prune = d.pop("prune")
        prune.update(kw.pop("prune", {}))
        d.update(kw)
        return ModelConfig.from_dict({**d, "prune": prune})


PRESETS: Registry[dict] = Registry("model preset")

# Tiny / small: tests, the demo, Fashion-MNIST. Paper shapes: speed benchmarks.
PRESETS.register("spikformer-tiny", dict(dim=32, depth=2, heads=2, T=4, pool_stages=0))
PRESETS.register("spikformer-small", dict(dim=32, depth=2, heads=4, T=4, pool_stages=2, img_size=28))  # F-MNIST (28x28 -> 7x7 tokens)
PRESETS.register("sdt-tiny", dict(dim=32, depth=2, heads=2, T=4, pool_stages=0, attention="sdsa"))
PRESETS.register("a2os2a-tiny", dict(dim=32, depth=2, heads=2, T=4, pool_stages=0, attention="a2os2a"))
PRESETS.register("spikformer-4-384", dict(dim=384, depth=4, heads=12, T=4, pool_stages=2, img_size=32, in_channels=3))
PRESETS.register("spikformer-8-768", dict(dim=768, depth=8, heads=12, T=4, pool_stages=4, img_size=224, in_channels=3))


def make_config(preset: str, **overrides) -> ModelConfig:
    """Build a validated config from a preset name and overrides (None values are ignored)."""
    base = dict(PRESETS.get(preset))
    prune = overrides.pop("prune", None)
    base.update({k: v for k, v in overrides.items() if v is not None})
    cfg = ModelConfig(name=preset, **base)
    if prune is not None:
        cfg.prune = prune if isinstance(prune, PruneConfig) else PruneConfig(**prune)
    return cfg.validate()
