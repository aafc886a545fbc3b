"""Loihi's fixed point for one standard layer (synapse -> LIF), derived ONCE and shared by the Lava runtime
(``--precision fixed``: Lava's ``PySparseModelBitAcc`` -> ``PyLifResetModelBitAcc``) and the netx exporter (lava-dl's
``Conv`` -> ``LIFReset`` blocks), so that both hold the same integers (numpy only).

What Lava's bit-accurate models compute (lava-nc 0.10.0, ``lava/proc/sparse/models.py``, ``lava/proc/lif/models.py``)::

    a_in = (W_int . s) << weight_exp            (>> for a negative exponent: floors; netx's Conv has no exponent)
    u    = u * (4096 - (du + 1)) >> 12 + (a_in << 6)               (24-bit, wraps)
    v    = v * (4096 - dv) >> 12 + u + (bias_mant << bias_exp)      (24-bit, clipped; decays truncate toward 0)
    spike where v > vth << 6; then v = 0

Our LIF (``H = V (1 - 1/tau) + r X / tau``, fires at H >= V_th, i.e. NIR's V > v_threshold) maps onto it with the
weights w = r W / tau and the bias r b / tau (the float path's scaling) and one number per layer, the input quantum
q: the membrane value of one a_in unit (v = V * 64 / q).

- Weights: 8-bit mantissas filled by the largest |w|: scale g = max|w| / (step * m_max) with Loihi's sign modes
  (mixed signs: even integers in [-256, 254], step 2, m_max 127 -- Lava drops their LSB; one sign: step 1, m_max
  255); W_int = step * round(w / (step g)) (to nearest).
- Exponent: q = g * in_grid / 2^weight_exp, weight_exp <= 0 the largest that keeps the threshold mantissa at most
  VTH_MAX (= 2^11: the 24-bit state then holds |V| < 64 V_th and the 17 bits a_in may use before the << 6 a step's
  input < 64 V_th; at 2^14 trained models' first layer overflowed the current and lost 8 points); spike inputs
  (in_grid 1) need 0 for all but very small weights. The image (``in_grid=None``): 8-bit pixels, whose first layer
  needs a negative exponent (a right shift of the sum, flooring). lava-dl's netx Conv has no exponent: for netx
  (``netx=True``) the image layer instead gets the finest pixel grid 2^-k that needs none under NETX_VTH_MAX.
- Threshold: vth = floor(v_threshold / q): V > vth q, exactly NIR's V > v_threshold for a membrane on the q grid;
  off the grid (after a decay truncates) the threshold sits up to one q below.
- Bias: round(b / q) in a_in units as a 13-bit mantissa with bias_exp 6 (netx's fixed exponent: bias_mant << 6 is in
  the same units as a_in << 6), a larger exponent only if 13 bits do not hold it (then clipped at exponent 7).
- Gated bias (a layer whose tokens are dropped at some timesteps: its bias must not reach a dropped token, so it
  arrives as a second Sparse from a 0/1 source per token): 8-bit mantissas of b / (q 2^e) (sign mode as for
  weights) with the smallest exponent e in [0, 7] that holds the largest |b|: the bias on the grid q 2^e.
- Decays: du = 4095 (+ Lava's ds_offset 1: the current forgets every step, u = a_in << 6); dv = round(4096 / tau)
  to the nearest integer, at most 4095 (12 bits: tau = 1 keeps trunc(v / 4096) of the state).
"""
from __future__ import annotations

import math

import numpy as np

VTH_MAX = 2 ** 11  # the largest threshold mantissa a layer's exponent choice aims at (Loihi holds 17 bits)
NETX_VTH_MAX = 2 ** 14  # the same for an image layer without exponent (netx): less headroom, more pixel bits
INPUT_BITS = 8  # the image: at most 8 fractional bits per pixel (x in [0, 1] as integers round(x * 2^k))
WEIGHT_EXP_MIN = -8  # Loihi's weight exponent range is [-8, 7]; only <= 0 is used (netx's Conv applies none)
DECAY_UNITY = 4096  # du / dv in units of 1/4096 (12 bits)
BIAS_EXP = 6  # netx's bias exponent (lava.lib.dl.netx.hdf5.Network.get_neuron_params)


def sign_mode(values: np.ndarray) -> tuple[str, int, int]:
    """Loihi's sign mode of a weight matrix's values (as ``lava.utils.weightutils.determine_sign_mode``), with the
    step and largest mantissa of its 8-bit integers: mixed signs step 2, m_max 127; one sign step 1, m_max 255."""
    d = np.asarray(values)
    if (d < 0).any() and (d > 0).any():
        return "mixed", 2, 127
    return ("inhibitory" if (d < 0).any() else "excitatory"), 1, 255


def layer_scale(values: np.ndarray, v_thr: float, in_grid: float | None, netx: bool = False) -> dict:
    """The layer's scale (see the module docstring): values = every weight w (r / tau folded in); v_thr = NIR's
    v_threshold; in_grid = the value of one integer unit of the input (spikes: 1; None: the image, INPUT_BITS-bit
    pixels). netx: an image layer without weight exponent (lava-dl's Conv applies none): the finest pixel grid
    2^-k (k <= INPUT_BITS) whose threshold mantissa stays at most NETX_VTH_MAX, at the cost of headroom (a step's
    input < 2^17 / vth V_th before the 24-bit current wraps) and of pixel bits.
    Returns mode, step, g (value of one weight unit), weight_exp, in_grid, q."""
    d = np.asarray(values, dtype=np.float64)
    mode, step, mmax = sign_mode(d)
    wmax = float(np.abs(d).max(initial=0))
    g = wmax / (step * mmax) if wmax > 0 else 1.0
    vmax = VTH_MAX
    if in_grid is None and netx:
        vmax = NETX_VTH_MAX
        k = math.floor(math.log2(vmax * g / v_thr)) if v_thr > 0 else INPUT_BITS
        in_grid = 2.0 ** -int(np.clip(k, 0, INPUT_BITS))
    elif in_grid is None:
        in_grid = 2.0 ** -INPUT_BITS
    q0 = g * in_grid
    e = 0
    if v_thr > 0:
        e = int(np.clip(math.floor(math.log2(vmax * q0 / v_thr)), WEIGHT_EXP_MIN, 0))
    return dict(mode=mode, step=step, g=g, weight_exp=e, in_grid=in_grid, q=q0 / 2.0 ** e, wmax=wmax)


def quantise_weights(values: np.ndarray, scale: dict) -> np.ndarray:
    """W_int = step * round(w / (step g)) as int32 (to nearest)."""
    st, g = scale["step"], scale["g"]
    return (st * np.rint(np.asarray(values, dtype=np.float64) / (st * g))).astype(np.int32)


def bias_weights(values: np.ndarray, q: float) -> tuple[np.ndarray, int]:
    """A gated bias (a_in value of each bias synapse; its input is 0 / 1) as Lava Sparse integers on the layer's
    input quantum q: (W_int, weight_exp) with W_int 8-bit mantissas (``sign_mode``) and the smallest weight_exp in
    [0, 7] whose grid q 2^weight_exp holds the largest |value| (rounded to nearest, clipped at exponent 7)."""
    d = np.asarray(values, dtype=np.float64) / q
    _, step, mmax = sign_mode(d)
    e = 0
    while e < 7 and np.abs(np.rint(d / (step * 2.0 ** e))).max(initial=0) > mmax:
        e += 1
    m = np.clip(np.rint(d / (step * 2.0 ** e)), -mmax, mmax)
    return (step * m).astype(np.int32), e


def lif_params(q: float, bias, v_thr: float, tau: float) -> tuple[dict, dict]:
    """LIF(Reset)'s integer parameters for input quantum q (see the module docstring). bias: None, a scalar or an
    array (r / tau folded in). Returns (du, dv, vth, bias_mant, bias_exp as Lava takes them; a report)."""
    if not tau > 0:
        raise ValueError(f"fixed point: tau {tau} is not positive")
    vth = int(math.floor(v_thr / q))
    if not 0 <= vth < 2 ** 17:
        raise ValueError(f"fixed point: threshold mantissa {vth} does not fit Loihi's 17 bits (v_threshold "
                         f"{v_thr}, input quantum {q:.3g})")
    b = np.asarray(0.0 if bias is None else bias, dtype=np.float64) / q  # in a_in units
    bexp = BIAS_EXP
    while bexp < 7 and np.abs(np.rint(b / 2.0 ** (bexp - BIAS_EXP))).max(initial=0) > 4095:
        bexp += 1
    bm = np.clip(np.rint(b / 2.0 ** (bexp - BIAS_EXP)), -4096, 4095)
    kw = dict(du=DECAY_UNITY - 1, dv=int(min(DECAY_UNITY - 1, max(0, round(DECAY_UNITY / tau)))), vth=vth,
              bias_mant=bm.astype(np.int32) if bm.ndim else int(bm), bias_exp=bexp)
    rep = dict(q=q, vth=vth, dv=kw["dv"], du=kw["du"], bias_exp=bexp, threshold_error=v_thr - vth * q,
               max_bias_error=float(np.abs(bm * 2.0 ** (bexp - BIAS_EXP) - b).max(initial=0)) * q)
    return kw, rep
