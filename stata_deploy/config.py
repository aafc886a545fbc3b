"""Model configuration (a dataclass serialised as JSON) and the preset registry."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError
from .registry import Registry

ATTENTION_KINDS = ("ssa", "sdsa", "a2os2a")
PRUNE_METHODS = ("none", "stata", "anchor", "random", "l1", "ssa", "tp")
ANCHOR_METHODS = ("stata", "anchor")  # the methods that score by an anchor token (and so need one)

# Bounds of every model config field (inclusive). They are checked with strict types (a JSON ``true`` is not an
# integer, a string is not a number) before any model is built, so a config.json typo or a hand-edited value fails
# with one line naming the field instead of allocating gigabytes first. The paper shapes (8-768 at 224x224) are far
# inside them.
MAX_CLASSES = 10_000  # also the bound on dataset labels (stata_deploy.train.data)
MAX_T = 64  # timesteps (the same bound as `train --T`)
INT_LIMITS: dict[str, tuple[int, int]] = {
    "img_size": (1, 1024),
    "in_channels": (1, 64),
    "num_classes": (1, MAX_CLASSES),
    "T": (1, MAX_T),
    "dim": (8, 4096),
    "depth": (1, 64),
    "heads": (1, 64),
    "mlp_ratio": (1, 16),
    "pool_stages": (0, 4),  # max-pools in the 4-stage SPS stem
}
ATTN_SCALE_LIMITS = (0.0, 100.0)  # (exclusive, inclusive)
LOSS_WEIGHT_MAX = 1000.0  # intra_weight / inter_weight in [0, LOSS_WEIGHT_MAX]
MAX_IMAGE_TOKENS = 16_384  # (img_size / 2**pool_stages)**2: SSA builds (N, N) maps per head and timestep
MAX_PARAMS = 1_000_000_000  # estimated parameters (4 GB of float32 weights, before optimizer state)


def is_int(v) -> bool:
    """An integer, strictly: bool (an int subclass in Python, ``true`` in JSON) and floats are not."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def is_number(v) -> bool:
    """A real number, strictly: bool and strings are not."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def show(v) -> str:
    """A value as it reads in config.json (true, "big", 1e+07), for messages."""
    import json

    try:
        return json.dumps(v.item() if isinstance(v, np.generic) else v)
    except (TypeError, ValueError):
        return repr(v)


def check_int(name: str, v, lo: int, hi: int) -> int:
    """``v`` as an int in [lo, hi], else a ConfigError naming ``name``."""
    if not is_int(v) or not lo <= v <= hi:
        what = f"a positive integer (at most {hi})" if lo == 1 else f"an integer in [{lo}, {hi}]"
        raise ConfigError(f"{name} must be {what}, got {show(v)}")
    return int(v)


def check_number(name: str, v, lo: float, hi: float, lo_open: bool = False) -> float:
    """``v`` as a finite float in [lo, hi] (or (lo, hi]), else a ConfigError naming ``name``."""
    ok = is_number(v) and math.isfinite(float(v)) and (lo < float(v) if lo_open else lo <= float(v)) and float(v) <= hi
    if not ok:
        raise ConfigError(f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {show(v)}")
    return float(v)


def estimate_params(cfg: "ModelConfig") -> int:
    """Parameters of ``build_model(cfg)`` from the config alone (weights of the convs/linears, BN, biases)."""
    d, m = cfg.dim, cfg.mlp_ratio
    chans = [cfg.in_channels, d // 8, d // 4, d // 2, d, d]  # 4 SPS stages + the relative-position conv
    stem = sum(9 * a * b + 2 * b for a, b in zip(chans[:-1], chans[1:]))
    attn = 4 * (d * d + 2 * d) + d  # q, k, v, proj: Linear without bias + BatchNorm; proj's bias
    mlp = (m * d * d + 3 * m * d) + (m * d * d + 3 * d)  # fc1, fc2: Linear with bias + BatchNorm
    block = attn + mlp
    return stem + cfg.depth * block + d * cfg.num_classes + cfg.num_classes + (d if cfg.anchor else 0)


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
    anchor_grad: bool = True  # stata/anchor: train the anchor's Q through the kept tokens' scores (see model.py)

    def validate(self, depth: int) -> None:
        if not isinstance(self.method, str) or self.method not in PRUNE_METHODS:
            raise ConfigError(f"unknown pruning method {self.method!r}; choose one of: {', '.join(PRUNE_METHODS)}")
        if not (is_number(self.keep) and 0.0 < float(self.keep) <= 1.0):  # NaN fails the comparison
            raise ConfigError(f"keep ratio must be in (0, 1], got {show(self.keep)}")
        self.keep = float(self.keep)
        for name in ("sites", "align_sites"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, (list, tuple)) or len(v) > max(depth, 1) or not all(is_int(s) for s in v):
                raise ConfigError(f"prune {name} must be a list of block indices (integers), got {show(v)}")
            setattr(self, name, [int(s) for s in v])
        for s in self.resolved_sites(depth):
            if not 1 <= s < depth:
                raise ConfigError(f"pruning site {s} must be a block index in [1, {depth - 1}]")
        for s in self.align_sites or []:
            if not 0 <= s < depth:
                raise ConfigError(f"alignment site {s} must be a block index in [0, {depth - 1}]")
        if not isinstance(self.align, (list, tuple)):
            raise ConfigError(f"prune align must be a list of names (intra, inter), got {self.align!r}")
        for a in self.align:
            if a not in ("intra", "inter"):
                raise ConfigError(f"unknown alignment {a!r}; choose from intra, inter")
        self.align = list(self.align)
        if not isinstance(self.anchor_grad, (bool, np.bool_)):
            raise ConfigError(f"prune anchor_grad must be true or false, got {show(self.anchor_grad)}")
        self.anchor_grad = bool(self.anchor_grad)
        for name in ("intra_weight", "inter_weight"):
            setattr(self, name, check_number(f"prune {name}", getattr(self, name), 0.0, LOSS_WEIGHT_MAX))

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
        """Check every field (strict types, the bounds in INT_LIMITS and friends) and the model's size; normalise
        numpy scalars to Python ones. Raises ConfigError naming the field. Nothing is allocated."""
        if not isinstance(self.name, str) or len(self.name) > 200:
            raise ConfigError(f"name must be a string (at most 200 characters), got {self.name!r}")
        if not isinstance(self.attention, str) or self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"unknown attention {self.attention!r}; choose one of: {', '.join(ATTENTION_KINDS)}")
        for name, (lo, hi) in INT_LIMITS.items():
            setattr(self, name, check_int(name, getattr(self, name), lo, hi))
        if not isinstance(self.anchor, (bool, np.bool_)):
            raise ConfigError(f"anchor must be true or false, got {show(self.anchor)}")
        self.anchor = bool(self.anchor)
        self.attn_scale = check_number("attn_scale", self.attn_scale, *ATTN_SCALE_LIMITS, lo_open=True)
        if not isinstance(self.prune, PruneConfig):
            raise ConfigError(f"prune must be a pruning config object, got {self.prune!r}")
        if self.dim % self.heads or self.dim % 8:
            raise ConfigError(f"dim {self.dim} must be divisible by heads ({self.heads}) and by 8")
        if self.img_size % (2**self.pool_stages) or self.grid < 1:
            raise ConfigError(f"img_size {self.img_size} must be divisible by 2**pool_stages ({2**self.pool_stages})")
        if self.num_image_tokens > MAX_IMAGE_TOKENS:
            raise ConfigError(f"img_size {self.img_size} with pool_stages {self.pool_stages} gives "
                              f"{self.num_image_tokens} tokens (a {self.grid}x{self.grid} grid); at most "
                              f"{MAX_IMAGE_TOKENS} are supported: raise pool_stages or lower img_size")
        n = estimate_params(self)
        if n > MAX_PARAMS:
            raise ConfigError(f"model too large: dim {self.dim}, depth {self.depth}, mlp_ratio {self.mlp_ratio}, "
                              f"num_classes {self.num_classes} give ~{n / 1e9:.1f}e9 parameters (limit "
                              f"{MAX_PARAMS / 1e9:.0f}e9)")
        self.prune.validate(self.depth)
        if self.prune.method in ANCHOR_METHODS and not self.anchor:
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
        prune = d.pop("prune", {})
        if prune is None:
            prune = {}
        if not isinstance(prune, dict):
            raise ConfigError(f"prune must be a JSON object, got {prune!r}")
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
