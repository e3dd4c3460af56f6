"""IQ4_NL: 32-weight blocks of 4-bit indices into a fixed non-linear table, one fp16 scale (formats.md §3.9).

Quantization is what llama-quantize runs without an imatrix (`quantize_iq4_nl`): ggml's
quantize_row_iq4_nl_impl with weights x**2 and a scale search over ntry = 7, then every index
re-picked with the final float scale. Bit-exact with ggml.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType
from .kquant_search import F32, GROUP_MAX_EPS, fp16_value, put_fp16

QK4_NL = 32
BLOCK_BYTES = 18
NTRY = 7
# kvalues_iq4nl: the 16 levels an index selects (sorted)
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


@njit(cache=True, inline="always")
def _best_index(k, x):
    """Index of the level nearest to x; the lower neighbour only wins when strictly nearer."""
    if x <= k[0]:
        return 0
    if x >= k[15]:
        return 15
    lo = 0
    hi = 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < k[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if np.float32(x - k[hi - 1]) < np.float32(k[hi] - x) else hi


@njit(cache=True)
def _quantize_block(x, y, k, L):
    # signed max: largest |x|, sign kept, first occurrence wins
    amax = F32(0.0)
    mx = F32(0.0)
    for j in range(QK4_NL):
        if abs(x[j]) > amax:
            amax = abs(x[j])
            mx = x[j]
    scale = F32(0.0)
    if amax >= GROUP_MAX_EPS:
        d = np.float32(np.float32(-mx) / k[0])
        inv = np.float32(F32(1.0) / d)
        sumqx = F32(0.0)
        sumq2 = F32(0.0)
        for j in range(QK4_NL):
            q = k[_best_index(k, np.float32(inv * x[j]))]
            wq = np.float32(np.float32(x[j] * x[j]) * q)
            sumqx = np.float32(sumqx + np.float32(wq * x[j]))
            sumq2 = np.float32(sumq2 + np.float32(wq * q))
        d = np.float32(sumqx / sumq2)
        best = np.float32(d * sumqx)
        for t in range(-NTRY, NTRY + 1):
            inv = np.float32(np.float32(t + np.int64(KVALUES[0])) / mx)
            sumqx = F32(0.0)
            sumq2 = F32(0.0)
            for j in range(QK4_NL):
                q = k[_best_index(k, np.float32(inv * x[j]))]
                wq = np.float32(np.float32(x[j] * x[j]) * q)
                sumqx = np.float32(sumqx + np.float32(wq * x[j]))
                sumq2 = np.float32(sumq2 + np.float32(wq * q))
            if sumq2 > 0 and np.float32(sumqx * sumqx) > np.float32(best * sumq2):
                d = np.float32(sumqx / sumq2)
                best = np.float32(d * sumqx)
        scale = d
    put_fp16(y, 0, scale)
    # indices re-picked with the unrounded float scale (an all-zero block gets index 8, level 1, times d = 0)
    inv = np.float32(F32(1.0) / scale) if scale != 0 else F32(0.0)
    for j in range(QK4_NL):
        L[j] = _best_index(k, np.float32(inv * x[j]))
    for j in range(16):
        y[2 + j] = L[j] | (L[j + 16] << 4)


@njit(cache=True, parallel=True)
def _quantize_rows(x, out):
    k = KVALUES.astype(np.float32)
    nb = x.shape[1] // QK4_NL
    for r in prange(x.shape[0]):
        L = np.zeros(QK4_NL, np.int64)
        for b in range(nb):
            _quantize_block(x[r, b * QK4_NL:(b + 1) * QK4_NL], out[r, b * BLOCK_BYTES:(b + 1) * BLOCK_BYTES], k, L)


@njit(cache=True, parallel=True)
def _dequantize_rows(raw, out):
    k = KVALUES.astype(np.float32)
    nb = out.shape[1] // QK4_NL
    for r in prange(raw.shape[0]):
        for b in range(nb):
            o = b * BLOCK_BYTES
            d = fp16_value(np.int64(raw[r, o]) | (np.int64(raw[r, o + 1]) << 8))
            for j in range(16):
                byte = np.int64(raw[r, o + 2 + j])
                out[r, b * QK4_NL + j] = np.float32(d * k[byte & 0xF])
                out[r, b * QK4_NL + j + 16] = np.float32(d * k[byte >> 4])


def quantize_iq4_nl(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], x.shape[1] // QK4_NL * BLOCK_BYTES), dtype=np.uint8)
    if out.size:
        _quantize_rows(x, out)
    return out


def dequantize_iq4_nl(raw: np.ndarray, n_cols: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty((raw.shape[0], n_cols), dtype=np.float32)
    if out.size:
        _dequantize_rows(raw, out)
    return out


QUANTIZE = {GGMLType.IQ4_NL: quantize_iq4_nl}
DEQUANTIZE = {GGMLType.IQ4_NL: dequantize_iq4_nl}
