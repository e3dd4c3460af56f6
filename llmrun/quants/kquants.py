"""K-quants Q2_K..Q6_K (256-weight super-blocks): ggml's reference quantizers, bit-exact, and dequantizers.

Quantization follows `quantize_row_<type>_ref` in ggml-quants.c (what llama-quantize runs without an
imatrix); see docs/formats.md §3.2-§3.6 for the layouts. Rows run in parallel (they are independent, so
threading cannot change a byte). Within a row, chunks of super-blocks go through two stages:
  1. the per-group scale searches (kquant_search.py), all groups of the chunk at once in SIMD lanes;
  2. per block: the fp16 super-scales, 4/6-bit group codes, re-quantization with the rounded scales
     and bit packing, in plain scalar code.
Bytes are read as np.int64 before any bit arithmetic: numba types uint8-with-int64 expressions as float.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..ggml import GGML_BLOCK, QK_K, GGMLType
from .kquant_search import (F32, GROUP_MAX_EPS, chunk_size, fp16_value, make_q3_quants, make_q3_quants_lanes,
                            make_qkx2_lanes, make_qkx2_quants, make_qx_quants, make_qx_quants_lanes, nearest_int,
                            put_fp16)


# Codes for the compiled drivers (numba cannot dispatch on GGMLType values cheaply).
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = 2, 3, 4, 5, 6
_KIND = {GGMLType.Q2_K: _Q2_K, GGMLType.Q3_K: _Q3_K, GGMLType.Q4_K: _Q4_K, GGMLType.Q5_K: _Q5_K,
         GGMLType.Q6_K: _Q6_K}


# ---------------------------------------------------------------- packing helpers

@njit(cache=True, error_model="numpy", inline="always")
def _pack_2bit(L, y, off):
    """2-bit plane: weight 128h+32s+l in bits 2s..2s+1 of y[off+32h+l]."""
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            y[off + 32 * h + l] = (np.int64(L[b]) | (np.int64(L[b + 32]) << 2) | (np.int64(L[b + 64]) << 4)
                                   | (np.int64(L[b + 96]) << 6)) & 0xFF


@njit(cache=True, error_model="numpy", inline="always")
def _scale_min_k4(j, y, off):
    """6-bit (scale, min) of sub-block j from the 12-byte packing at y[off:off+12]."""
    if j < 4:
        return np.int64(y[off + j]) & 63, np.int64(y[off + j + 4]) & 63
    sc = (np.int64(y[off + j + 4]) & 0xF) | ((np.int64(y[off + j - 4]) >> 6) << 4)
    m = (np.int64(y[off + j + 4]) >> 4) | ((np.int64(y[off + j]) >> 6) << 4)
    return sc, m


@njit(cache=True, error_model="numpy", inline="always")
def _q3_scale(j, y, off):
    """Signed 6-bit scale j of a Q3_K block (scales at y[off:off+12])."""
    lo = (np.int64(y[off + j]) & 0xF) if j < 8 else (np.int64(y[off + j - 8]) >> 4)
    return (lo | (((np.int64(y[off + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@njit(cache=True, error_model="numpy", inline="always")
def _fp16_at(y, off):
    """The fp16 field at y[off:off+2] as float32."""
    return fp16_value(np.int64(y[off]) | (np.int64(y[off + 1]) << 8))


@njit(cache=True, error_model="numpy", inline="always")
def _as_int8(v):
    """C's conversion of an int to int8_t (two's complement wrap)."""
    return ((v + 128) & 0xFF) - 128


# ---------------------------------------------------------------- scale searches over a chunk of blocks
# Each fills L (levels, natural weight order), scales[g] and mins[g] for the groups of xs. The lane
# versions do the work; groups they flag are redone with the scalar search (same result, exactly).

@njit(cache=True, error_model="numpy")
def _to_lanes(xs, n):
    """XT[i, g] = xs[g*n + i]: element i of group g."""
    G = xs.shape[0] // n
    XT = np.empty((n, G), np.float32)
    for g in range(G):
        for i in range(n):
            XT[i, g] = xs[g * n + i]
    return XT


@njit(cache=True, error_model="numpy")
def _from_lanes(LT, L):
    n, G = LT.shape
    for g in range(G):
        for i in range(n):
            L[g * n + i] = LT[i, g]


@njit(cache=True, error_model="numpy")
def _search_q2_k(xs, L, scales, mins):
    """Groups of 16, weights |x|, 4 levels with a min, mean-absolute-error fit."""
    XT = _to_lanes(xs, 16)
    G = XT.shape[1]
    WT = np.abs(XT)
    LT = np.empty((16, G), np.int32)
    redo = np.empty(G, np.bool_)
    make_qkx2_lanes(XT, WT, 3, F32(-0.5), F32(0.1), 15, True, LT, scales, mins, redo)
    _from_lanes(LT, L)
    w = np.empty(16, np.float32)
    Laux = np.empty(16, np.int32)
    for g in range(G):
        if redo[g]:
            xg = xs[16 * g:16 * g + 16]
            for l in range(16):
                w[l] = abs(xg[l])
            scales[g], mins[g] = make_qkx2_quants(16, 3, xg, w, L[16 * g:16 * g + 16], Laux,
                                                  F32(-0.5), F32(0.1), 15, True)


@njit(cache=True, error_model="numpy")
def _q45_weights(xg, w):
    """Q4_K/Q5_K weights of one group of 32: rms of the group + |x| (scalar order, for the redo path)."""
    sum_x2 = F32(0.0)
    for l in range(32):
        sum_x2 = np.float32(sum_x2 + np.float32(xg[l] * xg[l]))
    av_x = np.float32(math.sqrt(np.float64(np.float32(sum_x2 / F32(32.0)))))
    for l in range(32):
        w[l] = np.float32(av_x + abs(xg[l]))


@njit(cache=True, error_model="numpy")
def _search_q45_k(xs, L, scales, mins, five_bits):
    """Groups of 32, weights rms + |x|; 16 (Q4_K) or 32 (Q5_K) levels with a min, squared error fit."""
    nmax = 31 if five_bits else 15
    rmin = F32(-0.5) if five_bits else F32(-1.0)
    nstep = 15 if five_bits else 20
    XT = _to_lanes(xs, 32)
    G = XT.shape[1]
    sum_x2 = np.zeros(G, np.float32)
    for i in range(32):
        x = XT[i]
        for g in range(G):
            sum_x2[g] = np.float32(sum_x2[g] + np.float32(x[g] * x[g]))
    av_x = np.empty(G, np.float32)
    for g in range(G):
        av_x[g] = np.float32(math.sqrt(np.float64(np.float32(sum_x2[g] / F32(32.0)))))
    WT = np.empty((32, G), np.float32)
    for i in range(32):
        for g in range(G):
            WT[i, g] = np.float32(av_x[g] + abs(XT[i, g]))
    LT = np.empty((32, G), np.int32)
    redo = np.empty(G, np.bool_)
    make_qkx2_lanes(XT, WT, nmax, rmin, F32(0.1), nstep, False, LT, scales, mins, redo)
    _from_lanes(LT, L)
    w = np.empty(32, np.float32)
    Laux = np.empty(32, np.int32)
    for g in range(G):
        if redo[g]:
            xg = xs[32 * g:32 * g + 32]
            _q45_weights(xg, w)
            scales[g], mins[g] = make_qkx2_quants(32, nmax, xg, w, L[32 * g:32 * g + 32], Laux,
                                                  rmin, F32(0.1), nstep, False)


@njit(cache=True, error_model="numpy")
def _search_symmetric(xs, L, scales, q3):
    """Groups of 16 with signed levels: make_q3_quants (Q3_K, q3) or make_qx_quants(nmax 32) (Q6_K)."""
    XT = _to_lanes(xs, 16)
    G = XT.shape[1]
    LT = np.empty((16, G), np.int32)
    redo = np.empty(G, np.bool_)
    if q3:
        make_q3_quants_lanes(XT, 4, LT, scales, redo)
    else:
        make_qx_quants_lanes(XT, 32, LT, scales, redo)
    _from_lanes(LT, L)
    for g in range(G):
        if redo[g]:
            if q3:
                scales[g] = make_q3_quants(16, 4, xs[16 * g:16 * g + 16], L[16 * g:16 * g + 16])
            else:
                scales[g] = make_qx_quants(16, 32, xs[16 * g:16 * g + 16], L[16 * g:16 * g + 16])


# ---------------------------------------------------------------- finishing a block from its search

@njit(cache=True, error_model="numpy")
def _finish_block_q2_k(x, y, L, scales, mins):
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(16):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    if max_scale > 0:
        iscale = np.float32(F32(15.0) / max_scale)
        for j in range(16):
            y[j] = nearest_int(np.float32(iscale * scales[j])) & 0xFF
        d = put_fp16(y, 80, np.float32(max_scale / F32(15.0)))
    else:
        for j in range(16):
            y[j] = 0
        d = put_fp16(y, 80, F32(0.0))
    if max_min > 0:
        iscale = np.float32(F32(15.0) / max_min)
        for j in range(16):
            y[j] = (np.int64(y[j]) | (nearest_int(np.float32(iscale * mins[j])) << 4)) & 0xFF
        dmin = put_fp16(y, 82, np.float32(max_min / F32(15.0)))
    else:
        dmin = put_fp16(y, 82, F32(0.0))
    for j in range(16):
        dl = np.float32(d * np.float32(np.int64(y[j]) & 0xF))
        if dl == 0:
            continue
        dm = np.float32(dmin * np.float32(np.int64(y[j]) >> 4))
        for ii in range(16):
            l = nearest_int(np.float32(np.float32(x[16 * j + ii] + dm) / dl))
            L[16 * j + ii] = max(0, min(3, l))
    _pack_2bit(L, y, 16)


@njit(cache=True, error_model="numpy")
def _finish_block_q3_k(x, y, L, scales):
    max_scale = F32(0.0)
    amax = F32(0.0)
    for j in range(16):
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            max_scale = scales[j]
    for k in range(96, 108):
        y[k] = 0
    if max_scale != 0:
        iscale = np.float32(F32(-32.0) / max_scale)
        for j in range(16):
            l = _as_int8(nearest_int(np.float32(iscale * scales[j])))
            l = max(-32, min(31, l)) + 32
            if j < 8:
                y[96 + j] = l & 0xF
            else:
                y[96 + j - 8] = np.int64(y[96 + j - 8]) | ((l & 0xF) << 4)
            y[104 + j % 4] = np.int64(y[104 + j % 4]) | ((l >> 4) << (2 * (j // 4)))
        d = put_fp16(y, 108, np.float32(F32(1.0) / iscale))
    else:
        d = put_fp16(y, 108, F32(0.0))
    for j in range(16):
        dl = np.float32(d * np.float32(_q3_scale(j, y, 96)))
        if dl == 0:
            continue
        for ii in range(16):
            l = nearest_int(np.float32(x[16 * j + ii] / dl))
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    for k in range(32):
        y[k] = 0
    for j in range(QK_K):
        if L[j] > 3:
            y[j % 32] = np.int64(y[j % 32]) | (1 << (j // 32))
            L[j] -= 4
    _pack_2bit(L, y, 32)


@njit(cache=True, error_model="numpy")
def _finish_block_q45_k(x, y, L, scales, mins, five_bits):
    nmax = 31 if five_bits else 15
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = np.float32(F32(63.0) / max_scale) if max_scale > 0 else F32(0.0)
    inv_min = np.float32(F32(63.0) / max_min) if max_min > 0 else F32(0.0)
    for j in range(8):
        ls = min(63, nearest_int(np.float32(inv_scale * scales[j])) & 0xFF)
        lm = min(63, nearest_int(np.float32(inv_min * mins[j])) & 0xFF)
        if j < 4:
            y[4 + j] = ls
            y[4 + j + 4] = lm
        else:
            y[4 + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            y[4 + j - 4] = np.int64(y[4 + j - 4]) | ((ls >> 4) << 6)
            y[4 + j] = np.int64(y[4 + j]) | ((lm >> 4) << 6)
    d = put_fp16(y, 0, np.float32(max_scale / F32(63.0)))
    dmin = put_fp16(y, 2, np.float32(max_min / F32(63.0)))
    for j in range(8):
        sc, m = _scale_min_k4(j, y, 4)
        dl = np.float32(d * np.float32(sc))
        if dl == 0:
            continue
        dm = np.float32(dmin * np.float32(m))
        for ii in range(32):
            l = nearest_int(np.float32(np.float32(x[32 * j + ii] + dm) / dl))
            L[32 * j + ii] = max(0, min(nmax, l))
    if five_bits:
        for k in range(16, 48):
            y[k] = 0
        for c in range(4):
            for l in range(32):
                l1 = np.int64(L[64 * c + l])
                if l1 > 15:
                    l1 -= 16
                    y[16 + l] = np.int64(y[16 + l]) | (1 << (2 * c))
                l2 = np.int64(L[64 * c + 32 + l])
                if l2 > 15:
                    l2 -= 16
                    y[16 + l] = np.int64(y[16 + l]) | (2 << (2 * c))
                y[48 + 32 * c + l] = l1 | (l2 << 4)
    else:
        for c in range(4):
            for l in range(32):
                y[16 + 32 * c + l] = np.int64(L[64 * c + l]) | (np.int64(L[64 * c + 32 + l]) << 4)


@njit(cache=True, error_model="numpy")
def _finish_block_q6_k(x, y, L, scales):
    max_scale = F32(0.0)
    max_abs = F32(0.0)
    for ib in range(16):
        if abs(scales[ib]) > max_abs:
            max_abs = abs(scales[ib])
            max_scale = scales[ib]
    if max_abs < GROUP_MAX_EPS:
        for k in range(210):
            y[k] = 0
        return
    iscale = np.float32(F32(-128.0) / max_scale)
    d = put_fp16(y, 208, np.float32(F32(1.0) / iscale))
    for ib in range(16):
        y[192 + ib] = _as_int8(min(127, nearest_int(np.float32(iscale * scales[ib])))) & 0xFF
    for j in range(16):
        dl = np.float32(d * np.float32(_as_int8(np.int64(y[192 + j]))))
        if dl == 0:
            continue
        for ii in range(16):
            l = nearest_int(np.float32(x[16 * j + ii] / dl))
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            q0, q1, q2, q3 = np.int64(L[b]), np.int64(L[b + 32]), np.int64(L[b + 64]), np.int64(L[b + 96])
            y[64 * h + l] = (q0 & 0xF) | ((q2 & 0xF) << 4)
            y[64 * h + 32 + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            y[128 + 32 * h + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)


CHUNK_BLOCKS = 8  # super-blocks searched together: enough SIMD lanes, scratch stays in L1/L2


@njit(cache=True, error_model="numpy")
def _quantize_row(xrow, yrow, kind, block_bytes):
    nb = xrow.shape[0] // QK_K
    group = 32 if kind == _Q4_K or kind == _Q5_K else 16
    L = np.zeros(CHUNK_BLOCKS * QK_K, np.int32)
    scales = np.zeros(CHUNK_BLOCKS * QK_K // group, np.float32)
    mins = np.zeros(CHUNK_BLOCKS * QK_K // group, np.float32)
    chunk = chunk_size(nb, CHUNK_BLOCKS)
    for b0 in range(0, nb, chunk):
        b1 = min(nb, b0 + chunk)
        xs = xrow[b0 * QK_K:b1 * QK_K]
        ng = (b1 - b0) * QK_K // group
        if kind == _Q2_K:
            _search_q2_k(xs, L, scales[:ng], mins[:ng])
        elif kind == _Q3_K or kind == _Q6_K:
            _search_symmetric(xs, L, scales[:ng], kind == _Q3_K)
        else:
            _search_q45_k(xs, L, scales[:ng], mins[:ng], kind == _Q5_K)
        for b in range(b1 - b0):
            xb = xs[b * QK_K:(b + 1) * QK_K]
            yb = yrow[(b0 + b) * block_bytes:(b0 + b + 1) * block_bytes]
            Lb = L[b * QK_K:(b + 1) * QK_K]
            gs = b * QK_K // group
            ge = (b + 1) * QK_K // group
            if kind == _Q2_K:
                _finish_block_q2_k(xb, yb, Lb, scales[gs:ge], mins[gs:ge])
            elif kind == _Q3_K:
                _finish_block_q3_k(xb, yb, Lb, scales[gs:ge])
            elif kind == _Q6_K:
                _finish_block_q6_k(xb, yb, Lb, scales[gs:ge])
            else:
                _finish_block_q45_k(xb, yb, Lb, scales[gs:ge], mins[gs:ge], kind == _Q5_K)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows(x, out, kind, block_bytes):
    for r in prange(x.shape[0]):
        _quantize_row(x[r], out[r], kind, block_bytes)


# ---------------------------------------------------------------- dequantizers (same float ops as ggml)

@njit(cache=True, error_model="numpy")
def _dequantize_block(y, o, kind):
    if kind == _Q2_K:
        d = _fp16_at(y, 80)
        dmin = _fp16_at(y, 82)
        for h in range(2):
            for s in range(4):
                for g in range(2):
                    sc = np.int64(y[8 * h + 2 * s + g])
                    dl = np.float32(d * np.float32(sc & 0xF))
                    ml = np.float32(dmin * np.float32(sc >> 4))
                    for l in range(16):
                        q = (np.int64(y[16 + 32 * h + 16 * g + l]) >> (2 * s)) & 3
                        o[128 * h + 32 * s + 16 * g + l] = np.float32(dl * np.float32(q)) - ml
    elif kind == _Q3_K:
        d = _fp16_at(y, 108)
        for h in range(2):
            for s in range(4):
                m = 1 << (4 * h + s)
                for g in range(2):
                    dl = np.float32(d * np.float32(_q3_scale(8 * h + 2 * s + g, y, 96)))
                    for l in range(16):
                        k = 16 * g + l
                        q = np.int64((np.int64(y[32 + 32 * h + k]) >> (2 * s)) & 3) - (0 if np.int64(y[k]) & m else 4)
                        o[128 * h + 32 * s + k] = np.float32(dl * np.float32(q))
    elif kind == _Q4_K or kind == _Q5_K:
        d = _fp16_at(y, 0)
        dmin = _fp16_at(y, 2)
        qs = 48 if kind == _Q5_K else 16
        for c in range(4):
            for half in range(2):
                sc, m = _scale_min_k4(2 * c + half, y, 4)
                dl = np.float32(d * np.float32(sc))
                ml = np.float32(dmin * np.float32(m))
                for l in range(32):
                    q = np.int64((np.int64(y[qs + 32 * c + l]) >> (4 * half)) & 0xF)
                    if kind == _Q5_K and (np.int64(y[16 + l]) >> (2 * c + half)) & 1:
                        q += 16
                    o[64 * c + 32 * half + l] = np.float32(dl * np.float32(q)) - ml
    else:
        d = _fp16_at(y, 208)
        for h in range(2):
            for l in range(32):
                qhb = np.int64(y[128 + 32 * h + l])
                for t in range(4):  # t = which of the four weights 128h + 32t + l
                    lo = (np.int64(y[64 * h + 32 * (t & 1) + l]) >> (4 * (t >> 1))) & 0xF
                    q = np.int64(lo | (((qhb >> (2 * t)) & 3) << 4)) - 32
                    sc = _as_int8(np.int64(y[192 + 8 * h + 2 * t + l // 16]))
                    o[128 * h + 32 * t + l] = np.float32(np.float32(d * np.float32(sc)) * np.float32(q))


@njit(cache=True, error_model="numpy", parallel=True)
def _dequantize_rows(raw, out, kind, block_bytes):
    nb = out.shape[1] // QK_K
    for r in prange(raw.shape[0]):
        for b in range(nb):
            _dequantize_block(raw[r, b * block_bytes:(b + 1) * block_bytes],
                              out[r, b * QK_K:(b + 1) * QK_K], kind)


# ---------------------------------------------------------------- registry

def _quantizer(qtype: GGMLType):
    kind = _KIND[qtype]
    block_bytes = GGML_BLOCK[qtype][1]

    def quantize_fn(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], x.shape[1] // QK_K * block_bytes), dtype=np.uint8)
        if out.size:
            _quantize_rows(x, out, kind, block_bytes)
        return out

    quantize_fn.__name__ = f"quantize_{qtype.lower}"
    return quantize_fn


def _dequantizer(qtype: GGMLType):
    kind = _KIND[qtype]
    block_bytes = GGML_BLOCK[qtype][1]

    def dequantize_fn(raw: np.ndarray, n_cols: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty((raw.shape[0], n_cols), dtype=np.float32)
        if out.size:
            _dequantize_rows(raw, out, kind, block_bytes)
        return out

    dequantize_fn.__name__ = f"dequantize_{qtype.lower}"
    return dequantize_fn


QUANTIZE = {t: _quantizer(t) for t in _KIND}
DEQUANTIZE = {t: _dequantizer(t) for t in _KIND}
