"""Numpy kernels of the custom Lava processes (numpy only). Every array is batched: (B, ...).

The NIR graph expresses everything but the attention products with standard ops (Affine/Conv2d/SumPool2d/LIF,
summed edges), so the kernels are few: ``matmul`` (the products of two activations, per head), ``add`` (summed
edges), ``reshape`` (Flatten), ``mask`` (the per-timestep token schedule at ports), ``ones`` (the 0 / 1 source
of a gated bias) and ``quantise`` (fixed point: the image, as integers, into the first synapse).

A kernel is ``f(params, t, *inputs) -> output`` where ``t`` is the model timestep (0..T-1) the process is at.
Kernels are stateless; neuron state lives in the ``Neuron`` process model.
"""
from __future__ import annotations

import numpy as np


def _token_mask(params, t, ndim):
    """The (T, N) bool mask at timestep t, broadcast over (B, ..., N, ...) with N on params['token_axis']."""
    m = params.get("mask")
    if m is None:
        return None
    axis = params.get("token_axis", 1)
    shape = [1] * ndim
    shape[axis] = m.shape[1]
    return m[t].reshape(shape)


def k_matmul(p, t, a, b):
    """(a @ b) * scale after optional reshapes/transposes (heads split as (B, N, H, dh) -> (B, H, N, dh))."""
    a = _prep(a, p.get("a_reshape"), p.get("a_perm"))
    b = _prep(b, p.get("b_reshape"), p.get("b_perm"))
    y = a @ b
    if p.get("scale", 1.0) != 1.0:
        y = y * p["scale"]
    return _prep(y, None, p.get("out_perm"), p.get("out_reshape"))


def k_add(p, t, a, b):
    return a + b


def k_reshape(p, t, a):
    return _prep(a, p.get("a_reshape"), p.get("a_perm"), p.get("out_reshape"))


def k_quantise(p, t, a):
    """The identity: the fixed_pt model of the process rounds its output to ``out_grid`` (the input pixels to
    integers, see runtimes.lava_runtime.INPUT_GRID)."""
    return a


def k_mask(p, t, a):
    m = _token_mask(p, t, a.ndim)
    return a if m is None else a * m


def k_ones(p, t, a):
    """One 1 per token of a token row (B, D, n) -> (B, 1, n): masked by the process's schedule, the source of a
    gated bias (runtimes.lava_runtime._lava_masked_pair)."""
    return np.ones((a.shape[0], 1, a.shape[-1]))


def _prep(x, reshape=None, perm=None, out_reshape=None):
    if reshape is not None:
        x = x.reshape((x.shape[0], *reshape))
    if perm is not None:
        x = x.transpose(perm)
    if out_reshape is not None:
        x = x.reshape((x.shape[0], *out_reshape))
    return x


KERNELS = {
    "matmul": k_matmul,
    "add": k_add,
    "reshape": k_reshape,
    "mask": k_mask,
    "ones": k_ones,
    "quantise": k_quantise,
}
