"""K-quants Q2_K..Q6_K (256-weight super-blocks): ggml's reference quantizers, bit-exact, and dequantizers.

Quantization follows `quantize_row_<type>_ref` in ggml-quants.c (what llama-quantize runs without an
imatrix); see formats.md §3.2-§3.6 for the layouts. One compiled driver loops over rows (in parallel:
rows are independent, so threading cannot change a byte) and blocks; per-block work is in small kernels.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ..gguf.constants import GGMLType, GGML_BLOCK
from .kquant_search import (F32, GROUP_MAX_EPS, fp16_value, make_q3_quants, make_qkx2_quants,
                            make_qx_quants, nearest_int, put_fp16)

QK_K = 256

# Codes for the compiled drivers (numba cannot dispatch on GGMLType values cheaply).
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = 2, 3, 4, 5, 6
_KIND = {GGMLType.Q2_K: _Q2_K, GGMLType.Q3_K: _Q3_K, GGMLType.Q4_K: _Q4_K, GGMLType.Q5_K: _Q5_K,
         GGMLType.Q6_K: _Q6_K}


# ---------------------------------------------------------------- packing helpers

@njit(cache=True, inline="always")
def _pack_2bit(L, y, off):
    """2-bit plane: weight 128h+32s+l in bits 2s..2s+1 of y[off+32h+l]."""
    for h in range(2):
        for l in range(32):
            b = 128 * h + l
            y[off + 32 * h + l] = (np.int64(L[b]) | (np.int64(L[b + 32]) << 2) | (np.int64(L[b + 64]) << 4) | (np.int64(L[b + 96]) << 6)) & 0xFF


@njit(cache=True, inline="always")
def _scale_min_k4(j, y, off):
    """6-bit (scale, min) of sub-block j from the 12-byte packing at y[off:off+12]."""
    if j < 4:
        return np.int64(y[off + j]) & 63, np.int64(y[off + j + 4]) & 63
    sc = (np.int64(y[off + j + 4]) & 0xF) | ((np.int64(y[off + j - 4]) >> 6) << 4)
    m = (np.int64(y[off + j + 4]) >> 4) | ((np.int64(y[off + j]) >> 6) << 4)
    return sc, m


@njit(cache=True, inline="always")
def _q3_scale(j, y, off):
    """Signed 6-bit scale j of a Q3_K block (scales at y[off:off+12])."""
    lo = (np.int64(y[off + j]) & 0xF) if j < 8 else (np.int64(y[off + j - 8]) >> 4)
    return (lo | (((np.int64(y[off + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@njit(cache=True, inline="always")
def _fp16_at(y, off):
    """The fp16 field at y[off:off+2] as float32."""
    return fp16_value(np.int64(y[off]) | (np.int64(y[off + 1]) << 8))


@njit(cache=True, inline="always")
def _as_int8(v):
    """C's conversion of an int to int8_t (two's complement wrap)."""
    return ((v + 128) & 0xFF) - 128


# ---------------------------------------------------------------- block quantizers

@njit(cache=True)
def _quantize_block_q2_k(x, y, L, Laux, w, scales, mins):
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        for l in range(16):
            w[l] = abs(xs[l])
        s, m = make_qkx2_quants(16, 3, xs, w, L[16 * j:16 * j + 16], Laux, F32(-0.5), F32(0.1), 15, True)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
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


@njit(cache=True)
def _quantize_block_q3_k(x, y, L, scales):
    max_scale = F32(0.0)
    amax = F32(0.0)
    for j in range(16):
        s = make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16])
        scales[j] = s
        if abs(s) > amax:
            amax = abs(s)
            max_scale = s
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
        if np.int64(L[j]) > 3:
            y[j % 32] = np.int64(y[j % 32]) | (1 << (j // 32))
            L[j] -= 4
    _pack_2bit(L, y, 32)


@njit(cache=True)
def _quantize_block_q45_k(x, y, L, Laux, w, scales, mins, five_bits):
    """Q4_K (five_bits False) or Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins."""
    nmax = 31 if five_bits else 15
    rmin = F32(-0.5) if five_bits else F32(-1.0)
    nstep = 15 if five_bits else 20
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = F32(0.0)
        for l in range(32):
            sum_x2 = np.float32(sum_x2 + np.float32(xs[l] * xs[l]))
        av_x = np.float32(math.sqrt(np.float64(np.float32(sum_x2 / F32(32.0)))))
        for l in range(32):
            w[l] = np.float32(av_x + abs(xs[l]))
        s, m = make_qkx2_quants(32, nmax, xs, w, L[32 * j:32 * j + 32], Laux, rmin, F32(0.1), nstep, False)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
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


@njit(cache=True)
def _quantize_block_q6_k(x, y, L, scales):
    max_scale = F32(0.0)
    max_abs = F32(0.0)
    for ib in range(16):
        s = make_qx_quants(16, 32, x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16])
        scales[ib] = s
        if abs(s) > max_abs:
            max_abs = abs(s)
            max_scale = s
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


@njit(cache=True, parallel=True)
def _quantize_rows(x, out, kind, block_bytes):
    n_rows = x.shape[0]
    nb = x.shape[1] // QK_K
    for r in prange(n_rows):
        Lu = np.zeros(QK_K, np.uint8)    # levels of the asymmetric types
        Li = np.zeros(QK_K, np.int8)     # levels of the symmetric types (signed while searching)
        Laux = np.zeros(32, np.uint8)
        w = np.zeros(32, np.float32)
        scales = np.zeros(16, np.float32)
        mins = np.zeros(16, np.float32)
        for b in range(nb):
            xb = x[r, b * QK_K:(b + 1) * QK_K]
            yb = out[r, b * block_bytes:(b + 1) * block_bytes]
            if kind == 2:
                _quantize_block_q2_k(xb, yb, Lu, Laux, w, scales, mins)
            elif kind == 3:
                _quantize_block_q3_k(xb, yb, Li, scales)
            elif kind == 4:
                _quantize_block_q45_k(xb, yb, Lu, Laux, w, scales, mins, False)
            elif kind == 5:
                _quantize_block_q45_k(xb, yb, Lu, Laux, w, scales, mins, True)
            else:
                _quantize_block_q6_k(xb, yb, Li, scales)


# ---------------------------------------------------------------- dequantizers (same float ops as ggml)

@njit(cache=True)
def _dequantize_block(y, o, kind):
    if kind == 2:
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
    elif kind == 3:
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
    elif kind == 4 or kind == 5:
        d = _fp16_at(y, 0)
        dmin = _fp16_at(y, 2)
        qs = 48 if kind == 5 else 16
        for c in range(4):
            for half in range(2):
                sc, m = _scale_min_k4(2 * c + half, y, 4)
                dl = np.float32(d * np.float32(sc))
                ml = np.float32(dmin * np.float32(m))
                for l in range(32):
                    q = np.int64((np.int64(y[qs + 32 * c + l]) >> (4 * half)) & 0xF)
                    if kind == 5 and (np.int64(y[16 + l]) >> (2 * c + half)) & 1:
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


@njit(cache=True, parallel=True)
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
