"""IQ4_NL: 32-weight blocks of 4-bit indices into a fixed non-linear table, one fp16 scale (docs/formats.md §3.9).

Quantization is what llama-quantize runs without an imatrix (`quantize_iq4_nl`): ggml's
quantize_row_iq4_nl_impl with weights x**2 and a scale search over ntry = 7, then every index
re-picked with the final float scale. Bit-exact with ggml. Blocks of a row are searched together,
one block per SIMD lane (the scheme is explained in kquant_search.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..ggml import GGML_BLOCK, IQ4_NL_VALUES, GGMLType
from .kquant_search import F32, GROUP_MAX_EPS, chunk_size, fp16_value, put_fp16

QK4_NL, BLOCK_BYTES = GGML_BLOCK[GGMLType.IQ4_NL]   # 32 weights in 18 bytes
NTRY = 7


# Twice the midpoints between neighbouring levels are integers, so for any v the nearest level only
# depends on floor(2v): two small tables indexed by floor(2v) (clamped to the table) give index and level.
_TAB_LO = -256
_TAB_N = 512


def _level_tables():
    k = IQ4_NL_VALUES.astype(np.int64)
    mid2 = k[:-1] + k[1:]
    idx = np.array([(mid2 <= f).sum() for f in range(_TAB_LO, _TAB_LO + _TAB_N)], dtype=np.int32)
    return idx, k[idx].astype(np.float32)


_IDX_TAB, _LEVEL_TAB = _level_tables()


@njit(cache=True, error_model="numpy", inline="always")
def _level_slot(v):
    """Table slot for v. ggml picks the lower neighbour a of b only when v - a < b - v; for every
    non-NaN v that is the same choice as 2v < a + b, i.e. floor(2v) < a + b (2v is exact)."""
    v2 = np.float32(v + v)
    v2 = v2 if v2 > F32(_TAB_LO) else F32(_TAB_LO)            # also maps NaN to the first slot
    v2 = v2 if v2 < F32(_TAB_LO + _TAB_N - 1) else F32(_TAB_LO + _TAB_N - 1)
    return np.int32(np.floor(v2)) - np.int32(_TAB_LO)


@njit(cache=True, error_model="numpy", inline="always")
def _weighted_level_sums(XT, qtab, inv, sumqx, sumq2):
    """Per column g, with q the level nearest inv·x and w = x²: sumqx = Σ(w·q)·x, sumq2 = Σ(w·q)·q."""
    G = inv.shape[0]
    for g in range(G):
        sumqx[g] = F32(0.0)
        sumq2[g] = F32(0.0)
    for i in range(XT.shape[0]):
        x = XT[i]
        for g in range(G):
            q = qtab[_level_slot(np.float32(inv[g] * x[g]))]
            wq = np.float32(np.float32(x[g] * x[g]) * q)
            sumqx[g] = np.float32(sumqx[g] + np.float32(wq * x[g]))
            sumq2[g] = np.float32(sumq2[g] + np.float32(wq * q))


@njit(cache=True, error_model="numpy")
def _quantize_chunk(xs, ys, k):
    """Blocks of xs searched together, one block per SIMD lane (see kquant_search's lane notes)."""
    G = xs.shape[0] // QK4_NL
    k0 = k[0]
    itab = _IDX_TAB
    qtab = _LEVEL_TAB
    XT = np.empty((QK4_NL, G), np.float32)
    for g in range(G):
        for i in range(QK4_NL):
            XT[i, g] = xs[g * QK4_NL + i]
    amax = np.zeros(G, np.float32)
    mx = np.zeros(G, np.float32)
    for i in range(QK4_NL):
        x = XT[i]
        for g in range(G):
            t = abs(x[g]) > amax[g]
            amax[g] = abs(x[g]) if t else amax[g]
            mx[g] = x[g] if t else mx[g]
    inv = np.empty(G, np.float32)
    sumqx = np.empty(G, np.float32)
    sumq2 = np.empty(G, np.float32)
    d = np.empty(G, np.float32)
    best = np.empty(G, np.float32)
    for g in range(G):
        inv[g] = np.float32(F32(1.0) / np.float32(np.float32(-mx[g]) / k0))
    _weighted_level_sums(XT, qtab, inv, sumqx, sumq2)
    for g in range(G):
        d[g] = np.float32(sumqx[g] / sumq2[g])
        best[g] = np.float32(d[g] * sumqx[g])
    for t in range(-NTRY, NTRY + 1):
        num = np.float32(t - 127)
        for g in range(G):
            inv[g] = np.float32(num / mx[g])
        _weighted_level_sums(XT, qtab, inv, sumqx, sumq2)
        for g in range(G):
            take = (sumq2[g] > 0) & (np.float32(sumqx[g] * sumqx[g]) > np.float32(best[g] * sumq2[g]))
            dn = np.float32(sumqx[g] / sumq2[g])
            d[g] = dn if take else d[g]
            best[g] = np.float32(dn * sumqx[g]) if take else best[g]
    for g in range(G):
        scale = F32(0.0) if amax[g] < GROUP_MAX_EPS else d[g]
        put_fp16(ys, g * BLOCK_BYTES, scale)
        inv[g] = np.float32(F32(1.0) / scale) if scale != 0 else F32(0.0)
    L = np.empty((QK4_NL, G), np.int64)
    for i in range(QK4_NL):
        x = XT[i]
        for g in range(G):
            L[i, g] = itab[_level_slot(np.float32(inv[g] * x[g]))]
    for g in range(G):
        for j in range(16):
            ys[g * BLOCK_BYTES + 2 + j] = L[j, g] | (L[j + 16, g] << 4)


CHUNK_BLOCKS = 64


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows(x, out):
    k = IQ4_NL_VALUES.astype(np.float32)
    nb = x.shape[1] // QK4_NL
    for r in prange(x.shape[0]):
        chunk = chunk_size(nb, CHUNK_BLOCKS)
        for b0 in range(0, nb, chunk):
            b1 = min(nb, b0 + chunk)
            _quantize_chunk(x[r, b0 * QK4_NL:b1 * QK4_NL], out[r, b0 * BLOCK_BYTES:b1 * BLOCK_BYTES], k)


@njit(cache=True, error_model="numpy", parallel=True)
def _dequantize_rows(raw, out):
    k = IQ4_NL_VALUES.astype(np.float32)
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
