"""A Spikformer written on SpikingJelly 2.0.0 (the peer of ``benchmarks/peer_speed.py``), from the paper's description.

Zhou et al., "Spikformer: When Spiking Neural Network Meets Transformer" (ICLR 2023), CIFAR layout:

* SPS stem: 4 stages conv3x3 -> BN -> LIF (channels D/8, D/4, D/2, D), a 3x3/2 max-pool after the LIF of the last
  ``pool_stages`` stages; then the relative-position embedding ``x + LIF(BN(conv3x3(x)))``; tokens (T, B, N, D).
* ``depth`` blocks ``x = x + SSA(x); x = x + MLP(x)``. SSA: Q, K, V = LIF(BN(Linear(x))) (no bias), per head
  ``(Q K^T) V * scale`` (no softmax), the attention LIF (threshold 0.5), then LIF(BN(Linear(.))) (bias).
  MLP: LIF(BN(Linear(D, 4D))) then LIF(BN(Linear(4D, D))) (biases).
* head: mean over tokens, Linear, mean of the per-timestep logits over T.

Every neuron is ``spikingjelly.activation_based.neuron.LIFNode(tau=2.0, decay_input=True, v_reset=0.0,
surrogate_function=surrogate.Sigmoid(alpha=4.0), detach_reset=True, step_mode='m')`` — the same tau, thresholds,
hard reset and surrogate as ``stata_deploy.nn.neurons.LIF`` (read there: ``TAU``, ``V_TH``, ``ATTN_V_TH``,
``ALPHA``). SpikingJelly's neurons keep their membrane between calls: ``run`` (and every training step of the
benchmark) ends with ``functional.reset_net``.

The layers around the neurons are the plain torch layers on ``flatten(0, 1)`` (as the official Spikformer code does:
``nn.Conv2d``/``nn.BatchNorm2d`` on (T*B, C, H, W), ``nn.Linear`` on tokens) and in the same layout as ours (BN1d on
(T*B*N, D)), so the two models compute the same numbers and the benchmark compares the neurons and the framework
around them, not a layout choice. (The official code runs BN1d on a transposed (T*B, D, N) copy: that costs the
SpikingJelly side extra copies, so ours is the conservative choice for the ratios.)

Modules are declared in the order of their counterparts in ``stata_deploy.nn.model.SpikingTransformer`` (unpruned,
no anchor): ``copy_weights`` maps the two state dicts one to one (checking every shape).

``neuron=`` replaces LIFNode by another factory ``f(v_threshold) -> module`` (``TorchLIF`` below: the same equations
in plain torch); the tests use it to check the wiring (shapes, parameter count, logits and spikes against ours)
where SpikingJelly is not installed. The benchmark always runs the real LIFNode.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

TAU = 2.0  # stata_deploy.nn.neurons: TAU, V_TH, V_RESET, ATTN_V_TH, ALPHA (checked equal in the tests)
V_TH = 1.0
V_RESET = 0.0
ATTN_V_TH = 0.5
ALPHA = 4.0

INSTALL_HINT = "bash scripts/install_peers.sh"  # pip install --no-deps spikingjelly==2.0.0 loguru==0.7.3
SJ_VERSION = "2.0.0"


def sj_available() -> bool:
    try:
        import spikingjelly.activation_based.neuron  # noqa: F401
    except ImportError:
        return False
    return True


def sj_lif(v_threshold: float) -> nn.Module:
    """SpikingJelly's multi-step LIF with our constants."""
    from spikingjelly.activation_based import neuron, surrogate

    return neuron.LIFNode(tau=TAU, decay_input=True, v_threshold=v_threshold, v_reset=V_RESET,
                          surrogate_function=surrogate.Sigmoid(alpha=ALPHA), detach_reset=True, step_mode="m")


class _TorchLIFFn(torch.autograd.Function):
    """Heaviside with the sigmoid surrogate: d/du sigmoid(alpha * u) = alpha * s * (1 - s)."""

    @staticmethod
    def forward(ctx, u):
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype)

    @staticmethod
    def backward(ctx, g):
        (u,) = ctx.saved_tensors
        s = torch.sigmoid(ALPHA * u)
        return g * (1 - s) * s * ALPHA


class TorchLIF(nn.Module):
    """SpikingJelly LIFNode's equations in plain torch (decay_input, hard reset, detach_reset), stateless per call:
    ``H = V + (X - (V - V_reset)) / tau``, ``S = H >= V_th``, ``V = S * V_reset + (1 - S) * H``. For tests only."""

    def __init__(self, v_threshold: float):
        super().__init__()
        self.v_threshold = v_threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = torch.full_like(x[0], V_RESET)
        out = []
        for xt in x:
            h = v + (xt - (v - V_RESET)) / TAU
            s = _TorchLIFFn.apply(h - self.v_threshold)
            sd = s.detach()
            v = sd * V_RESET + (1 - sd) * h
            out.append(s)
        return torch.stack(out)


def torch_lif(v_threshold: float) -> nn.Module:
    return TorchLIF(v_threshold)


def _seq(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-frame layer to (T, B, ...) through flatten(0, 1)."""
    T, B = x.shape[:2]
    y = fn(x.flatten(0, 1))
    return y.reshape(T, B, *y.shape[1:])


class ConvBNLIF(nn.Module):
    def __init__(self, cin: int, cout: int, neuron, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.lif = neuron(V_TH)
        self.pool = nn.MaxPool2d(3, 2, 1) if pool else None

    def forward(self, x):
        x = self.lif(_seq(lambda z: self.bn(self.conv(z)), x))
        return _seq(self.pool, x) if self.pool is not None else x


class SPS(nn.Module):
    def __init__(self, dim: int, in_channels: int, pool_stages: int, neuron):
        super().__init__()
        chans = [in_channels, dim // 8, dim // 4, dim // 2, dim]
        self.stages = nn.ModuleList(ConvBNLIF(chans[i], chans[i + 1], neuron, i >= 4 - pool_stages) for i in range(4))
        self.rpe_conv = nn.Conv2d(dim, dim, 3, padding=1, bias=False)
        self.rpe_bn = nn.BatchNorm2d(dim)
        self.rpe_lif = neuron(V_TH)

    def forward(self, x):  # (T, B, C, H, W) -> (T, B, N, D)
        for st in self.stages:
            x = st(x)
        x = x + self.rpe_lif(_seq(lambda z: self.rpe_bn(self.rpe_conv(z)), x))
        return x.flatten(3).transpose(2, 3)


class LinearBNLIF(nn.Module):
    """Linear over tokens, BN1d over channels (on (T*B*N, D)), LIF. x: (T, B, N, Din) -> (T, B, N, Dout)."""

    def __init__(self, din: int, dout: int, bias: bool, neuron, v_threshold: float = V_TH):
        super().__init__()
        self.linear = nn.Linear(din, dout, bias=bias)
        self.bn = nn.BatchNorm1d(dout)
        self.lif = neuron(v_threshold)

    def forward(self, x):
        y = self.linear(x)
        shp = y.shape
        return self.lif(self.bn(y.reshape(-1, shp[-1])).reshape(shp))


class SSA(nn.Module):
    def __init__(self, dim: int, heads: int, scale: float, neuron):
        super().__init__()
        self.heads, self.scale = heads, scale
        self.q = LinearBNLIF(dim, dim, False, neuron)
        self.k = LinearBNLIF(dim, dim, False, neuron)
        self.v = LinearBNLIF(dim, dim, False, neuron)
        self.attn_lif = neuron(ATTN_V_TH)
        self.proj = LinearBNLIF(dim, dim, True, neuron)

    def forward(self, x):
        T, B, N, D = x.shape
        h = self.heads

        def heads(z):
            return z.reshape(T, B, N, h, D // h).transpose(2, 3)  # (T, B, H, N, dh)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        y = ((q @ k.transpose(-1, -2)) @ v) * self.scale
        y = self.attn_lif(y.transpose(2, 3).reshape(T, B, N, D))
        return self.proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, neuron):
        super().__init__()
        self.fc1 = LinearBNLIF(dim, hidden, True, neuron)
        self.fc2 = LinearBNLIF(hidden, dim, True, neuron)

    def forward(self, x):
        return self.fc2(self.fc1(x))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, scale, neuron):
        super().__init__()
        self.attn = SSA(dim, heads, scale, neuron)
        self.mlp = MLP(dim, dim * mlp_ratio, neuron)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class SJSpikformer(nn.Module):
    """Spikformer on SpikingJelly neurons. forward: (B, C, H, W) images (repeated over T) or (T, B, C, H, W) ->
    (logits (B, classes), per-timestep logits (T, B, classes))."""

    def __init__(self, *, img_size: int, in_channels: int, num_classes: int, T: int, dim: int, depth: int,
                 heads: int, mlp_ratio: int = 4, pool_stages: int = 2, attn_scale: float = 0.125, neuron=None):
        super().__init__()
        neuron = sj_lif if neuron is None else neuron
        self.T = T
        self.stem = SPS(dim, in_channels, pool_stages, neuron)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, attn_scale, neuron) for _ in range(depth))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 4:
            x = x.unsqueeze(0).expand(self.T, *x.shape)
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        logits_t = self.head(x.mean(2))
        return logits_t.mean(0), logits_t


def from_config(cfg, neuron=None) -> SJSpikformer:
    """The reference of the same shapes as ``stata_deploy`` ModelConfig ``cfg`` (SSA, unpruned, no anchor)."""
    if cfg.attention != "ssa":
        raise ValueError(f"the SpikingJelly reference is a Spikformer (SSA); config has attention {cfg.attention!r}")
    return SJSpikformer(img_size=cfg.img_size, in_channels=cfg.in_channels, num_classes=cfg.num_classes, T=cfg.T,
                        dim=cfg.dim, depth=cfg.depth, heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                        pool_stages=cfg.pool_stages, attn_scale=cfg.attn_scale, neuron=neuron)


def reset(model: nn.Module) -> None:
    """SpikingJelly's ``functional.reset_net`` (no-op for the stateless ``TorchLIF`` stand-in)."""
    if any(not isinstance(m, TorchLIF) for _, m in lif_modules(model)):
        from spikingjelly.activation_based import functional

        functional.reset_net(model)


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward, then reset every neuron's state (SpikingJelly's usage)."""
    try:
        return model(x)
    finally:
        reset(model)


def lif_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The neuron modules in forward order (LIFNode or the stand-in)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, TorchLIF) or type(m).__name__ == "LIFNode":
            out.append((name, m))
    return out


def copy_weights(ours: nn.Module, ref: SJSpikformer) -> None:
    """Copy the parameters and BN buffers of our unpruned SpikingTransformer into the reference (declaration order,
    every shape checked). Raises ValueError when the two do not line up."""
    a = [(k, v) for k, v in ours.state_dict().items()]
    b = [(k, v) for k, v in ref.state_dict().items()]
    if len(a) != len(b):
        raise ValueError(f"state dicts differ in length: ours {len(a)}, reference {len(b)} (an anchor token? the "
                         "reference is the unpruned model)")
    out = {}
    for (ka, va), (kb, vb) in zip(a, b, strict=True):
        if va.shape != vb.shape or ka.rsplit(".", 1)[-1] != kb.rsplit(".", 1)[-1]:
            raise ValueError(f"{ka} {tuple(va.shape)} does not match reference {kb} {tuple(vb.shape)}")
        out[kb] = va.detach().clone()
    ref.load_state_dict(out)


def _record(modules: list[nn.Module], out: list) -> list:
    """Forward hooks appending each module's output (in call order) to ``out``."""
    return [m.register_forward_hook(lambda mod, inp, o: out.append(o.detach().clone())) for m in modules]


def parity(ours: nn.Module, ref: SJSpikformer, x: torch.Tensor, y: torch.Tensor | None = None) -> dict:
    """Run our model and the reference (weights already copied) on x and compare, number for number.

    Without ``y``: eval mode, no gradients. With labels ``y``: train mode (BatchNorm on batch statistics), and the
    gradients of a cross-entropy loss on the logits are compared too (parameter by parameter, in declaration order).
    Returns spike mismatches / spikes compared / neuron layers (ours, reference) / max |logit difference| and, with
    ``y``, the largest gradient difference relative to that parameter's largest gradient.
    """
    from stata_deploy.nn.neurons import NEURON_TYPES

    train = y is not None
    ours, ref = copy.deepcopy(ours), copy.deepcopy(ref)  # train mode updates BN statistics: leave the callers' alone
    ours.train(train)
    ref.train(train)
    so, sr = [], []
    hooks = _record([m for m in ours.modules() if isinstance(m, NEURON_TYPES)], so)
    hooks += _record([m for _, m in lif_modules(ref)], sr)
    try:
        with torch.set_grad_enabled(train):
            lo = ours(x).logits
            lr, _ = run(ref, x)
            if train:
                ours.zero_grad(set_to_none=True)
                ref.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(lo, y).backward()
                nn.functional.cross_entropy(lr, y).backward()
    finally:
        for h in hooks:
            h.remove()
    res = {"layers": (len(so), len(sr)), "spikes": sum(a.numel() for a in so),
           "mismatches": sum(int((a != b).sum()) for a, b in zip(so, sr)) if len(so) == len(sr) else -1,
           "max_logit_diff": float((lo - lr).detach().abs().max()),
           "spike_rate": sum(float(a.sum()) for a in so) / max(1, sum(a.numel() for a in so))}
    if train:
        worst = 0.0
        for (name, pa), pb in zip(ours.named_parameters(), ref.parameters(), strict=True):
            if name.endswith("linear.bias"):  # a bias right before a train-mode BatchNorm: its true gradient is 0
                continue  # (BN subtracts the batch mean), what backward returns is rounding noise on both sides
            if pa.grad is None or pb.grad is None:
                if (pa.grad is None) != (pb.grad is None):
                    worst = float("inf")
                continue
            scale = float(pa.grad.abs().max())
            if scale > 0:
                worst = max(worst, float((pa.grad - pb.grad).abs().max()) / scale)
        res["max_rel_grad_diff"] = worst
    return res
