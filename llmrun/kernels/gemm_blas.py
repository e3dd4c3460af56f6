"""Prefill products through BLAS: weights widened to float32 chunk by chunk, then sgemm.

The path for the float families (F16/BF16) and, on hosts without AVX-512 VNNI, for the tiled families. The activations
stay float32, so prefill and decode agree within float32 rounding here, not bit for bit (docs/kernels.md).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, prange

from ..runtime import limit_blas_threads
from .blocks import F16_TO_F32, R, _block_rows, _block_size, _byte_rows, _load_scales_scalar, _scale_args
from .repack import KIND_U4, TILED, PackedMatrix

# Many tokens: compute-bound, so a chunk of rows is widened to float32 (a bounded scratch, never the
# whole matrix) and multiplied with the float32 activations by BLAS sgemm (~3x our best Numba FMA loop).
CHUNK_FLOATS = 1 << 20      # widened weights per chunk (4 MiB)


@njit(inline="always", fastmath=True)
def _widen_nibbles(out, src, st, sb, i, c0, dv, mv, zf, half):
    """out[i, c0 + j (+ half), r] = the weights of a U4 block of 2 * half: byte j holds weights j (low nibble) and
    j + half (high)."""
    for j in range(half):
        for r in range(R):
            v = src[st, sb, j, r]
            # uint8 casts keep the nibble arithmetic 8/32-bit wide (else int64 lanes: 2x slower)
            out[i, c0 + j, r] = (np.float32(np.uint8(v & 15)) - zf) * dv[r] + mv[r]
            out[i, c0 + j + half, r] = (np.float32(np.uint8(v >> 4)) - zf) * dv[r] + mv[r]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)   # nogil: prefill runs it from several threads
def _widen(codes, kind, d, m, two_level, has_m, zero, t0, t1, out):
    """Tiles t0..t1 (any code kind, repack.KIND_*) -> float32 out[t - t0, col, r] (each tile's W.T, contiguous:
    sequential writes)."""
    nblk = codes.shape[1]
    bs = _block_size(kind, codes.shape[2] * codes.shape[4])
    byte_rows = _byte_rows(codes)
    zf = np.float32(zero)
    for t in prange(t0, t1):
        dv = np.empty(R, np.float32)
        mv = np.zeros(R, np.float32)
        rows = np.empty((2, 1, 32, R), np.uint8)   # (blocks._block_rows)
        for b in range(nblk):
            src, st, sb = _block_rows(rows, codes, byte_rows, t, b, kind)   # I8 byte rows unless U4
            _load_scales_scalar(d, two_level, t, b, dv)
            if has_m:
                _load_scales_scalar(m, two_level, t, b, mv)
            if kind == KIND_U4 and bs == 32:   # (a literal half: as a runtime bs / 2 this loop ran 1.15x slower)
                _widen_nibbles(out, src, st, sb, t - t0, b * 32, dv, mv, zf, 16)
            elif kind == KIND_U4:
                _widen_nibbles(out, src, st, sb, t - t0, b * 16, dv, mv, zf, 8)
            else:
                for j in range(bs):
                    for r in range(R):
                        out[t - t0, b * bs + j, r] = (np.float32(src[st, sb, j, r]) - zf) * dv[r] + mv[r]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)   # nogil: prefill runs it from several threads
def _widen_h16(codes, kind, r0, r1, out):
    """uint16 rows r0..r1 (IEEE halves if kind == 0, else bfloat16) -> float32 out[0:r1-r0]."""
    bits = out.view(np.uint32)
    n_cols = codes.shape[1]
    for i in prange(r1 - r0):
        src = codes[r0 + i]
        dst = bits[i]
        if kind == 1:
            for j in range(n_cols):
                dst[j] = np.uint32(src[j]) << 16
        else:
            # exponent+mantissa moved into float32's place, sign kept; the 2**112 rebias below is exact,
            # also for subnormal halves (weights hold no inf/nan)
            for j in range(n_cols):
                h = np.uint32(src[j])
                dst[j] = ((h & np.uint32(0x8000)) << 16) | ((h & np.uint32(0x7FFF)) << 13)
            row = out[i]
            for j in range(n_cols):
                row[j] *= F16_TO_F32


_pool: ThreadPoolExecutor | None = None


def _workers(n: int) -> ThreadPoolExecutor:
    global _pool
    if _pool is None or _pool._max_workers < n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="llmrun-gemm")
    return _pool


def _matmul_widened(pm: PackedMatrix, X: np.ndarray) -> np.ndarray:
    """Prefill product: chunks of rows (H16) or of tiles (tiled families) are widened to float32 and multiplied by
    single-threaded BLAS; with several threads, the chunks are shared out to that many Python threads
    (BLAS and the widening kernels release the GIL)."""
    T, K = X.shape
    limit_blas_threads()
    tiled = pm.family in TILED
    if tiled:
        d, m, two_level, has_m = _scale_args(pm)
    n_units = pm.codes.shape[0] if tiled else pm.n_rows           # tiles or rows
    step = max(1, CHUNK_FLOATS // (K * R)) if tiled else max(1, CHUNK_FLOATS // K)
    n_threads = numba.get_num_threads()
    if n_threads > 1:   # equal chunks, a multiple of the thread count of them: no thread idles at the end
        n_chunks = -(-max(-(-n_units // step), n_threads) // n_threads) * n_threads
        step = max(1, -(-n_units // n_chunks))
    Y = np.empty((T, n_units * R if tiled else n_units), np.float32)   # tiled: padded, trimmed below
    starts = list(range(0, n_units, step))

    def work(chunk_starts, n_threads):
        numba.set_num_threads(n_threads)   # per OS thread
        if tiled:
            buf = np.empty((min(step, n_units), K, R), np.float32)
            part = np.empty((min(step, n_units), T, R), np.float32)
            for t0 in chunk_starts:
                t1 = min(n_units, t0 + step)
                n = t1 - t0
                _widen(pm.codes, pm.code_kind, d, m, two_level, has_m, pm.zero, t0, t1, buf)
                np.matmul(X, buf[:n], out=part[:n])
                Y[:, t0 * R:t1 * R].reshape(T, n, R)[:] = part[:n].transpose(1, 0, 2)
        else:
            buf = np.empty((min(step, n_units), K), np.float32)
            for r0 in chunk_starts:
                r1 = min(n_units, r0 + step)
                _widen_h16(pm.codes, pm.kind, r0, r1, buf[:r1 - r0])
                np.matmul(X, buf[:r1 - r0].T, out=Y[:, r0:r1])

    n_workers = min(n_threads, len(starts))
    if n_workers <= 1:
        work(starts, n_threads)
    else:
        jobs = [_workers(n_workers).submit(work, starts[i::n_workers], 1) for i in range(n_workers)]
        for job in jobs:
            job.result()
    return Y[:, :pm.n_rows] if tiled else Y
