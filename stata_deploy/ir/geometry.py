"""Convolution geometry shared by every lowering (the NIR exporter's summary, our NIR reader, the counters)."""
from __future__ import annotations

import numpy as np


def _tup(v, n=2):
    a = np.atleast_1d(np.asarray(v)).astype(int).tolist()
    return tuple(a * n if len(a) == 1 else a)


def conv_len(n: int, k: int, stride=1, padding=0, dilation=1) -> int:
    """Output length of a conv (or pool) along one axis: torch's (n + 2p - d(k - 1) - 1) // s + 1."""
    return (int(n) + 2 * int(padding) - int(dilation) * (int(k) - 1) - 1) // int(stride) + 1


def _span(n_in, n_out, s, p, d, k):
    """Output range [o0, o1) of a conv axis whose input o*s - p + k*d (kernel tap k) lies in [0, n_in)."""
    o0 = max(0, -(-(p - k * d) // s))
    o1 = min(n_out, (n_in - 1 + p - k * d) // s + 1)
    return o0, max(o0, o1)


def conv_synapses(w: np.ndarray, in_hw, stride, padding, dilation) -> int:
    """Synapses of a conv: nonzero weights x the output positions where they read an input (not padding)."""
    w = np.asarray(w)
    if w.ndim == 3:  # Conv1d: a height-1 Conv2d
        w, in_hw = w[:, :, None, :], (1, int(np.atleast_1d(in_hw)[0]))
        stride, padding, dilation = ((1, int(v)) for v in (stride, padding, dilation))
    H, W = (int(v) for v in in_hw)
    kh, kw = w.shape[2:]
    (sh, sw), (ph, pw), (dh, dw) = (_tup(v) for v in (stride, padding, dilation))
    Ho, Wo = conv_len(H, kh, sh, ph, dh), conv_len(W, kw, sw, pw, dw)
    nnz = np.count_nonzero(w, axis=(0, 1))  # (kh, kw)
    total = 0
    for i, j in np.argwhere(nnz):
        y0, y1 = _span(H, Ho, sh, ph, dh, i)
        x0, x1 = _span(W, Wo, sw, pw, dw, j)
        total += int(nnz[i, j]) * (y1 - y0) * (x1 - x0)
    return total
