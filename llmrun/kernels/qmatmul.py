"""Matrix products `Y = X @ W.T` over PackedMatrix tiles (layouts: repack.py).

Prefill keeps float32 activations (weights decoded to float32 in registers); decode uses int16
activations with a float scale per block. Neither quantizes activations to int8, which is where
llama.cpp loses fidelity. The innermost loops run over the TILE_ROWS rows of a tile so that
LLVM vectorizes them without horizontal reductions.

Two shapes per family:
  gemv  one token (decode, U4/I8): codes are consumed straight from memory and multiplied with int16
        activations (per-block scale) in integer arithmetic, per-block partial sums.
  gemm  many tokens (prefill): each 32-column block of a tile is decoded once into a small float32
        scratch, then reused for every token of a chunk.
All kernels are compiled once (fixed array types) and cached on disk.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .repack import TILE_ROWS, U4, I8, H16, FP32, PackedMatrix

R = TILE_ROWS
TOKENS_PER_CHUNK = 64   # prefill: tokens sharing one decoded weight block (bounds the [chunk, R] accumulator)
F16_TO_F32 = np.float32(2.0 ** 112)  # rebias a half's exponent after shifting its bits into float32's place


# ---------------------------------------------------------------------------------------------- gemv
# Decode (one token) is memory-bound: the activations are quantized once to int16 with one float scale per
# weight block (|error| <= 1.5e-5 of the block's largest value: ~250x finer than ggml's int8 Q8 activations),
# so the inner loop is integer multiply-adds on codes widened straight from memory.
ACT_MAX = np.float32(32767.0)


@njit(fastmath=True, cache=True)
def _quantize_activations(x, bs, xq, xd, xsum):
    """x float32 [K] -> xq int16 [K], per-block scale xd [K/bs] and per-block sums xsum (for the offsets)."""
    for b in range(x.shape[0] // bs):
        amax = np.float32(0.0)
        tot = np.float32(0.0)
        for j in range(b * bs, (b + 1) * bs):
            amax = max(amax, abs(x[j]))
            tot += x[j]
        xsum[b] = tot
        xd[b] = amax / ACT_MAX
        inv = ACT_MAX / amax if amax > 0 else np.float32(0.0)
        for j in range(b * bs, (b + 1) * bs):
            xq[j] = np.int16(round(x[j] * inv))


@njit(fastmath=True, cache=True)
def _finish_tile(acc, y, t, n_rows, accumulate):
    for r in range(R):
        row = t * R + r
        if row < n_rows:
            if accumulate:
                y[row] += acc[r]
            else:
                y[row] = acc[r]


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_u4(codes, d, m, x, y, accumulate):
    """y[:n] (=|+=) W x for U4 tiles; y has exactly n_rows entries."""
    n_tiles, nblk = codes.shape[0], codes.shape[1]
    xq = np.empty(x.shape[0], np.int16)
    xd = np.empty(nblk, np.float32)
    xsum = np.empty(nblk, np.float32)
    _quantize_activations(x, 32, xq, xd, xsum)
    for t in prange(n_tiles):
        acc = np.zeros(R, np.float32)
        s = np.empty(R, np.int32)
        for b in range(nblk):
            s[:] = 0
            c0 = b * 32
            for j in range(16):
                x0 = np.int32(xq[c0 + j])
                x1 = np.int32(xq[c0 + j + 16])
                for r in range(R):
                    v = np.int32(codes[t, b, j, r])
                    s[r] += (v & 15) * x0 + (v >> 4) * x1
            sx = xsum[b]
            dx = xd[b]
            for r in range(R):
                acc[r] += d[t, b, r] * (np.float32(s[r]) * dx) + m[t, b, r] * sx
        _finish_tile(acc, y, t, y.shape[0], accumulate)


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_i8(codes, d, m, x, y, accumulate):
    n_tiles, nblk, bs = codes.shape[0], codes.shape[1], codes.shape[2]
    xq = np.empty(x.shape[0], np.int16)
    xd = np.empty(nblk, np.float32)
    xsum = np.empty(nblk, np.float32)
    _quantize_activations(x, bs, xq, xd, xsum)
    for t in prange(n_tiles):
        acc = np.zeros(R, np.float32)
        s = np.empty(R, np.int32)
        for b in range(nblk):
            s[:] = 0
            c0 = b * bs
            # Two products per step with constant trip counts: the shape LLVM turns into vpmaddwd
            # (a single product per step, or a runtime trip count, stays scalar: 8x slower).
            if bs == 32:
                for j in range(16):
                    x0 = np.int32(xq[c0 + j])
                    x1 = np.int32(xq[c0 + j + 16])
                    for r in range(R):
                        s[r] += np.int32(codes[t, b, j, r]) * x0 + np.int32(codes[t, b, j + 16, r]) * x1
            else:
                for j in range(8):
                    x0 = np.int32(xq[c0 + j])
                    x1 = np.int32(xq[c0 + j + 8])
                    for r in range(R):
                        s[r] += np.int32(codes[t, b, j, r]) * x0 + np.int32(codes[t, b, j + 8, r]) * x1
            sx = xsum[b]
            dx = xd[b]
            for r in range(R):
                acc[r] += d[t, b, r] * (np.float32(s[r]) * dx) + m[t, b, r] * sx
        _finish_tile(acc, y, t, y.shape[0], accumulate)


# ---------------------------------------------------------------------------------------------- gemm
@njit(fastmath=True, cache=True, inline="always")
def _accumulate(acc, w, X, tok0, n_tok, col0, ncol):
    """acc[i, r] += sum_j w[j, r] * X[tok0 + i, col0 + j] for j < ncol (4 columns per pass)."""
    for i in range(n_tok):
        xrow = X[tok0 + i]
        j = 0
        while j + 4 <= ncol:
            x0 = xrow[col0 + j]
            x1 = xrow[col0 + j + 1]
            x2 = xrow[col0 + j + 2]
            x3 = xrow[col0 + j + 3]
            for r in range(R):
                acc[i, r] += w[j, r] * x0 + w[j + 1, r] * x1 + w[j + 2, r] * x2 + w[j + 3, r] * x3
            j += 4
        while j < ncol:
            x0 = xrow[col0 + j]
            for r in range(R):
                acc[i, r] += w[j, r] * x0
            j += 1


@njit(fastmath=True, cache=True, inline="always")
def _add_offsets(acc, m_row, xsum, tok0, n_tok, b):
    for i in range(n_tok):
        sx = xsum[tok0 + i, b]
        for r in range(R):
            acc[i, r] += m_row[r] * sx


@njit(fastmath=True, cache=True, inline="always")
def _store(acc, Y, tok0, n_tok, t):
    for i in range(n_tok):
        for r in range(R):
            Y[tok0 + i, t * R + r] = acc[i, r]


@njit(parallel=True, fastmath=True, cache=True)
def _gemm_u4(codes, d, m, X, xsum, Y):
    n_tiles, nblk = codes.shape[0], codes.shape[1]
    T = X.shape[0]
    n_chunks = (T + TOKENS_PER_CHUNK - 1) // TOKENS_PER_CHUNK
    for job in prange(n_tiles * n_chunks):
        t = job // n_chunks
        tok0 = (job % n_chunks) * TOKENS_PER_CHUNK
        n_tok = min(TOKENS_PER_CHUNK, T - tok0)
        acc = np.zeros((n_tok, R), np.float32)
        w = np.empty((32, R), np.float32)
        for b in range(nblk):
            for j in range(16):
                for r in range(R):
                    v = codes[t, b, j, r]
                    w[j, r] = np.float32(v & 15) * d[t, b, r]
                    w[j + 16, r] = np.float32(v >> 4) * d[t, b, r]
            _accumulate(acc, w, X, tok0, n_tok, b * 32, 32)
            _add_offsets(acc, m[t, b], xsum, tok0, n_tok, b)
        _store(acc, Y, tok0, n_tok, t)


@njit(parallel=True, fastmath=True, cache=True)
def _gemm_i8(codes, d, m, X, xsum, Y):
    n_tiles, nblk, bs = codes.shape[0], codes.shape[1], codes.shape[2]
    T = X.shape[0]
    n_chunks = (T + TOKENS_PER_CHUNK - 1) // TOKENS_PER_CHUNK
    for job in prange(n_tiles * n_chunks):
        t = job // n_chunks
        tok0 = (job % n_chunks) * TOKENS_PER_CHUNK
        n_tok = min(TOKENS_PER_CHUNK, T - tok0)
        acc = np.zeros((n_tok, R), np.float32)
        w = np.empty((bs, R), np.float32)
        for b in range(nblk):
            for j in range(bs):
                for r in range(R):
                    w[j, r] = np.float32(codes[t, b, j, r]) * d[t, b, r]
            _accumulate(acc, w, X, tok0, n_tok, b * bs, bs)
            _add_offsets(acc, m[t, b], xsum, tok0, n_tok, b)
        _store(acc, Y, tok0, n_tok, t)


@njit(parallel=True, fastmath=True, cache=True)
def _gemm_h16(codes, kind, X, Y):
    """codes uint16 [tiles, n_cols, R]: IEEE halves (kind 0) or bfloat16 (kind 1)."""
    n_tiles, n_cols = codes.shape[0], codes.shape[1]
    T = X.shape[0]
    n_chunks = (T + TOKENS_PER_CHUNK - 1) // TOKENS_PER_CHUNK
    for job in prange(n_tiles * n_chunks):
        t = job // n_chunks
        tok0 = (job % n_chunks) * TOKENS_PER_CHUNK
        n_tok = min(TOKENS_PER_CHUNK, T - tok0)
        acc = np.zeros((n_tok, R), np.float32)
        bits = np.empty((32, R), np.uint32)
        w = bits.view(np.float32)
        for c0 in range(0, n_cols, 32):
            ncol = min(32, n_cols - c0)
            if kind == 1:
                for j in range(ncol):
                    for r in range(R):
                        bits[j, r] = np.uint32(codes[t, c0 + j, r]) << 16
            else:
                # half -> float32 without branches: move exponent+mantissa into place, rebias by
                # 2**112 (exact, also for subnormal halves), then apply the sign. No inf/nan in weights.
                for j in range(ncol):
                    for r in range(R):
                        bits[j, r] = (np.uint32(codes[t, c0 + j, r]) & np.uint32(0x7FFF)) << 13
                for j in range(ncol):
                    for r in range(R):
                        sign = np.float32(1.0) - np.float32(2.0) * np.float32(codes[t, c0 + j, r] >> 15)
                        w[j, r] = w[j, r] * F16_TO_F32 * sign
            _accumulate(acc, w, X, tok0, n_tok, c0, ncol)
        _store(acc, Y, tok0, n_tok, t)


@njit(parallel=True, fastmath=True, cache=True)
def _gemm_f32(codes, X, Y):
    n_tiles, n_cols = codes.shape[0], codes.shape[1]
    T = X.shape[0]
    n_chunks = (T + TOKENS_PER_CHUNK - 1) // TOKENS_PER_CHUNK
    for job in prange(n_tiles * n_chunks):
        t = job // n_chunks
        tok0 = (job % n_chunks) * TOKENS_PER_CHUNK
        n_tok = min(TOKENS_PER_CHUNK, T - tok0)
        acc = np.zeros((n_tok, R), np.float32)
        _accumulate(acc, codes[t], X, tok0, n_tok, 0, n_cols)
        _store(acc, Y, tok0, n_tok, t)


# ----------------------------------------------------------------------------------------- dispatch
def matvec(pm: PackedMatrix, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """One token: x float32 [n_cols] -> W x, float32 [n_rows], written to (or added into) `out`."""
    if out is None:
        out = np.empty(pm.n_rows, np.float32)
        accumulate = False
    if pm.family == U4:
        _gemv_u4(pm.codes, pm.d, pm.m, x, out, accumulate)
    elif pm.family == I8:
        _gemv_i8(pm.codes, pm.d, pm.m, x, out, accumulate)
    else:
        y = matmul(pm, x[None, :])[0]
        if accumulate:
            out += y
        else:
            out[:] = y
    return out


def matmul(pm: PackedMatrix, X: np.ndarray) -> np.ndarray:
    """X float32 [T, n_cols] -> X @ W.T, float32 [T, n_rows]."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    T = X.shape[0]
    if T == 1 and pm.family in (U4, I8):
        return matvec(pm, X[0])[None, :]
    n_pad = pm.codes.shape[0] * R
    Y = np.empty((T, n_pad), np.float32)
    if pm.family in (U4, I8):
        nblk = pm.codes.shape[1]
        xsum = X.reshape(T, nblk, pm.bs).sum(axis=2, dtype=np.float32)
        (_gemm_u4 if pm.family == U4 else _gemm_i8)(pm.codes, pm.d, pm.m, X, xsum, Y)
    elif pm.family == H16:
        _gemm_h16(pm.codes, pm.kind, X, Y)
    else:
        _gemm_f32(pm.codes, X, Y)
    return Y[:, :pm.n_rows] if n_pad != pm.n_rows else Y


def dequantize_rows(pm: PackedMatrix, rows) -> np.ndarray:
    """Float32 copies of selected rows (embedding lookup: one row per token, never the whole matrix)."""
    rows = np.asarray(rows, dtype=np.int64)
    t, lane = rows // R, rows % R
    if pm.family == FP32:
        return np.ascontiguousarray(pm.codes[t, :, lane])
    if pm.family == H16:
        u = pm.codes[t, :, lane]
        if pm.kind == 1:
            return (u.astype(np.uint32) << 16).view(np.float32)
        return u.view(np.float16).astype(np.float32)
    c = pm.codes[t, :, :, lane]            # [n, nblk, bytes]
    if pm.family == U4:
        q = np.concatenate([c & 15, c >> 4], axis=-1).astype(np.float32)
    else:
        q = c.astype(np.float32)
    d = pm.d[t, :, lane][..., None]
    m = pm.m[t, :, lane][..., None]
    return (q * d + m).reshape(len(rows), pm.n_cols)
