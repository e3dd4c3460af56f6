"""One-token products (decode) and several decode tokens at once, portable Numba: U2, U4, U5, U6, I8 and H16 weights.

U4/I8: codes are consumed straight from memory and multiplied with the int16 activations (blocks.py) in
integer arithmetic, per-block partial sums finished by blocks._add_block; U5 / U6 / U2 blocks are first staged as
I8 byte rows of their codes (blocks._block_rows: the same integers). On AVX-512 VNNI hosts the one-token
product runs in gemv_vnni.py and the batched one in qmatmul.py instead, on the same integers (bit-identical).
H16: each row converted to float32 in a small buffer and dotted in float32.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import (PREFETCH_LINES, R, _add_block, _block_rows, _block_size, _byte_rows, _finish_tile, _prefetch,
                     _quantize_activations)
from .repack import KIND_U4


@njit(inline="always", fastmath=True)
def _prefetch_block(flat, first, n_lines, last):
    """Prefetch the n_lines code rows of the block PREFETCH_LINES rows after the one starting at flat[first]."""
    ahead = first + PREFETCH_LINES * R
    for j in range(n_lines):
        _prefetch(flat, min(ahead + j * R, last))


@njit(inline="always", fastmath=True)
def _nibble_sums(s, src, st, sb, xq, c0, half):
    """_block_sums of a U4 block of 2 * half weights: byte j holds weights j (low nibble) and j + half (high)."""
    for j in range(0, half, 2):   # two bytes (four products) per step: fewer passes over s
        x0 = np.int32(xq[c0 + j])
        x1 = np.int32(xq[c0 + j + half])
        x2 = np.int32(xq[c0 + j + 1])
        x3 = np.int32(xq[c0 + j + 1 + half])
        for r in range(R):
            v = np.int32(src[st, sb, j, r])
            w = np.int32(src[st, sb, j + 1, r])
            s[r] += (v & 15) * x0 + (v >> 4) * x1 + (w & 15) * x2 + (w >> 4) * x3


@njit(inline="always", fastmath=True)
def _block_sums(s, src, st, sb, xq, c0, nibbles, n_lines):
    """s[r] = the integer dot of block sb of tile st, row r, with the int16 activations xq[c0:c0 + block]; src:
    byte rows [tiles, nblk, bytes, R] (repack.py), the matrix's own or one block staged (blocks._block_rows);
    nibbles: U4 codes of an n_lines-weight block (n_lines / 2 byte rows), else n_lines I8 codes (a byte row each)."""
    s[:] = 0
    if nibbles and n_lines == 32:
        _nibble_sums(s, src, st, sb, xq, c0, 16)
    elif nibbles:   # 16-weight blocks. A literal half: with n_lines / 2, a runtime value, they ran 1.8x slower
        _nibble_sums(s, src, st, sb, xq, c0, 8)
    elif n_lines == 32:
        # Two products per step with constant trip counts: the shape LLVM turns into vpmaddwd
        # (a single product per step, or a runtime trip count, stays scalar: 8x slower).
        for j in range(16):
            x0 = np.int32(xq[c0 + j])
            x1 = np.int32(xq[c0 + j + 16])
            for r in range(R):
                s[r] += np.int32(src[st, sb, j, r]) * x0 + np.int32(src[st, sb, j + 16, r]) * x1
    else:
        for j in range(8):
            x0 = np.int32(xq[c0 + j])
            x1 = np.int32(xq[c0 + j + 8])
            for r in range(R):
                s[r] += np.int32(src[st, sb, j, r]) * x0 + np.int32(src[st, sb, j + 8, r]) * x1


@njit(parallel=True, fastmath=True, cache=True)
def _gemv(codes, kind, d, m, two_level, has_m, zero, x, y, accumulate):
    """y[:n] (=|+=) W x for tiles of any code kind (repack.KIND_*); y has exactly n_rows entries."""
    n_tiles, nblk, n_lines = codes.shape[0], codes.shape[1], codes.shape[2] * codes.shape[4]   # bytes a row-block
    bs = _block_size(kind, n_lines)
    nibbles = kind == KIND_U4
    xq = np.empty(x.shape[0], np.int16)
    xd = np.empty(nblk, np.float32)
    xsum = np.empty(nblk, np.float32)
    xqsum = np.empty(nblk, np.int32)
    _quantize_activations(x, bs, xq, xd, xsum, xqsum)
    flat = codes.reshape(-1)
    last = flat.shape[0] - 1
    byte_rows = _byte_rows(codes)
    for t in prange(n_tiles):
        acc = np.zeros(R, np.float32)
        s = np.empty(R, np.int32)
        rows = np.empty((2, 1, 32, R), np.uint8)   # (blocks._block_rows)
        dv = np.empty(R, np.float32)
        mv = np.empty(R, np.float32)
        for b in range(nblk):
            _prefetch_block(flat, (t * nblk + b) * n_lines * R, n_lines, last)
            src, st, sb = _block_rows(rows, codes, byte_rows, t, b, kind)
            _block_sums(s, src, st, sb, xq, b * bs, nibbles, bs)
            _add_block(acc, s, t, b, d, m, two_level, has_m, zero, xd, xsum, xqsum, dv, mv)
        _finish_tile(acc, y, t, y.shape[0], accumulate)


# Several tokens at decode time (continuous batching: one token from each of several sequences). Each weight
# block is read from memory and unpacked once for all of them; every token's sums are the same integers, added
# in the same order with the same float steps as in the one-token kernel above, so each row of the result is
# bit-identical to that token's matvec: a sequence decodes the same whether or not others run beside it.
@njit(parallel=True, fastmath=True, cache=True)
def _gemv_batch(codes, kind, d, m, two_level, has_m, zero, X, Y, accumulate):
    """Y[i, :n] (=|+=) W X[i] for tiles of any code kind, each i exactly as _gemv."""
    n_tok = X.shape[0]
    n_tiles, nblk, n_lines = codes.shape[0], codes.shape[1], codes.shape[2] * codes.shape[4]   # bytes a row-block
    bs = _block_size(kind, n_lines)
    nibbles = kind == KIND_U4
    xq = np.empty((n_tok, X.shape[1]), np.int16)
    xd = np.empty((n_tok, nblk), np.float32)
    xsum = np.empty((n_tok, nblk), np.float32)
    xqsum = np.empty((n_tok, nblk), np.int32)
    for i in range(n_tok):
        _quantize_activations(X[i], bs, xq[i], xd[i], xsum[i], xqsum[i])
    flat = codes.reshape(-1)
    last = flat.shape[0] - 1
    byte_rows = _byte_rows(codes)
    for t in prange(n_tiles):
        acc = np.zeros((n_tok, R), np.float32)
        s = np.empty(R, np.int32)
        rows = np.empty((2, 1, 32, R), np.uint8)   # (blocks._block_rows)
        dv = np.empty(R, np.float32)
        mv = np.empty(R, np.float32)
        for b in range(nblk):
            _prefetch_block(flat, (t * nblk + b) * n_lines * R, n_lines, last)
            src, st, sb = _block_rows(rows, codes, byte_rows, t, b, kind)   # (<= 2 KiB: in L1 for every token)
            for i in range(n_tok):
                _block_sums(s, src, st, sb, xq[i], b * bs, nibbles, bs)
                _add_block(acc[i], s, t, b, d, m, two_level, has_m, zero, xd[i], xsum[i], xqsum[i], dv, mv)
        for i in range(n_tok):
            _finish_tile(acc[i], Y[i], t, Y.shape[1], accumulate)


HALF_REBIAS = np.float32(2.0 ** 56)   # 2**112 split between weights and activations (no under/overflow)


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_h16(codes, kind, x, y, accumulate):
    """y (=|+=) W x for row-major 16-bit float rows (kind 0: IEEE half, 1: bfloat16), float32 math."""
    n_rows, K = codes.shape
    xs = np.empty(K, np.float32)
    for j in range(K):
        xs[j] = x[j] * HALF_REBIAS if kind == 0 else x[j]
    rows_per_job = 16
    for job in prange((n_rows + rows_per_job - 1) // rows_per_job):
        bits = np.empty(K, np.uint32)
        w = bits.view(np.float32)
        for r in range(job * rows_per_job, min(n_rows, (job + 1) * rows_per_job)):
            row = codes[r]
            if kind == 1:
                for j in range(K):
                    bits[j] = np.uint32(row[j]) << 16
            else:
                # the half's bits moved into float32's place: value * 2**-112, rebias split in two
                for j in range(K):
                    h = np.uint32(row[j])
                    bits[j] = ((h & np.uint32(0x8000)) << 16) | ((h & np.uint32(0x7FFF)) << 13)
                for j in range(K):
                    w[j] *= HALF_REBIAS
            acc = np.float32(0.0)
            for j in range(K):
                acc += w[j] * xs[j]
            if accumulate:
                y[r] += acc
            else:
                y[r] = acc
