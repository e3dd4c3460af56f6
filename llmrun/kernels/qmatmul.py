"""Matrix products `Y = X @ W.T` over PackedMatrix tiles (layouts: repack.py): which kernel runs, and the VNNI flags.

Decode and (on VNNI hosts) prefill use int16 activations with a float scale per block; the BLAS prefill
path keeps float32 activations (weights widened to float32 chunk by chunk). None quantizes activations to
int8, which is where llama.cpp loses fidelity. The innermost loops run over the TILE_ROWS rows of a tile so that
LLVM vectorizes them without horizontal reductions.

Two shapes:
  gemv  one token (decode). U2/U4/U5/U6/I8: codes are consumed straight from memory and multiplied with int16
        activations (per-block scale) in integer arithmetic, per-block partial sums (gemv.py); on AVX-512 VNNI
        hosts the same integers through vpdpbusd (gemv_vnni.py, bit-identical). H16: each row converted to
        float32 in a small buffer and dotted in float32 (gemv.py).
  gemm  many tokens (prefill). Tiled codes on AVX-512 VNNI hosts: an integer GEMM with int16 activations (per-block
        scale, as decode) and a vpdpwssd micro-kernel in LLVM IR, ~1.3-1.4x BLAS sgemm (gemm_vnni.py); its rows
        are bit-identical to gemv's (one float epilogue, blocks._epilogue_ir). Float families (and hosts without
        VNNI): a chunk of rows is widened to float32 scratch and handed to BLAS sgemm (gemm_blas.py;
        float32-close to gemv).
What every kernel shares (block scales, activation quantization, the epilogue) is in blocks.py. All kernels are
compiled once (fixed array types) and cached on disk (warmup.py).
"""
from __future__ import annotations

import numpy as np

from ..runtime import limit_blas_threads
from . import gemv_vnni, gemv_vnni_batch
from .blocks import R, _scale_args, _scales_f32
from .gemm_blas import _matmul_widened
from .gemm_vnni import _matmul_vnni
from .gemv import _gemv, _gemv_batch, _gemv_h16
from .repack import (FP32, H16, TILED, U2, U4, U5, U6, VNNI_TARGET, PackedMatrix, crumb_codes, five_bit_codes,
                     nibble_codes, six_bit_codes)

FEW_TOKENS = 3              # up to this many tokens, run the decode kernel per token instead


def _vnni_available() -> bool:
    """The IR micro-kernels (gemm_vnni.py) need AVX-512 VNNI (and 512-bit vectors:
    TILE_ROWS int32 = whole zmm registers), on the CPU numba compiles for (which NUMBA_CPU_FEATURES may set
    apart from the host's)."""
    return R % 16 == 0 and VNNI_TARGET


VNNI = _vnni_available()
VNNI_GEMV = VNNI and gemv_vnni.USABLE


def _vnni_codes(pm: PackedMatrix) -> bool:
    """The VNNI kernels read codes in quads (repack.py: what pack_matrix makes on these hosts; byte rows, which
    a caller may ask for, go to the portable kernels)."""
    return pm.codes.shape[-1] == 4


def matvec(pm: PackedMatrix, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """One token: x float32 [n_cols] -> W x, float32 [n_rows], written to (or added into) `out`."""
    if out is None:
        out = np.empty(pm.n_rows, np.float32)
        accumulate = False
    if pm.family in TILED:
        kernel = gemv_vnni._gemv_vnni if VNNI_GEMV and _vnni_codes(pm) else _gemv
        kernel(pm.codes, pm.code_kind, *_scale_args(pm), pm.zero, x, out, accumulate)
    elif pm.family == H16:
        _gemv_h16(pm.codes, pm.kind, x, out, accumulate)
    else:
        y = matmul(pm, x[None, :])[0]
        if accumulate:
            out += y
        else:
            out[:] = y
    return out


def matvec_batch(pm: PackedMatrix, X: np.ndarray, out: np.ndarray | None = None,
                 accumulate: bool = False) -> np.ndarray:
    """Several decode tokens: X float32 [T, n_cols] -> [T, n_rows], row i bit-identical to matvec(pm, X[i]);
    tiled weights are streamed once for all T (continuous batching)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if out is None:
        out = np.empty((X.shape[0], pm.n_rows), np.float32)
        accumulate = False
    if pm.family in TILED and X.shape[0] > 1 and VNNI_GEMV and _vnni_codes(pm):
        gemv_vnni_batch.gemv_batch_vnni(pm.codes, pm.code_kind, *_scale_args(pm), pm.zero, X, out, accumulate)
    elif pm.family in TILED and X.shape[0] > 1:
        _gemv_batch(pm.codes, pm.code_kind, *_scale_args(pm), pm.zero, X, out, accumulate)
    else:
        for i in range(X.shape[0]):
            matvec(pm, X[i], out[i], accumulate)
    return out


def matmul(pm: PackedMatrix, X: np.ndarray) -> np.ndarray:
    """X float32 [T, n_cols] -> X @ W.T, float32 [T, n_rows]."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    T = X.shape[0]
    if pm.family == FP32:
        limit_blas_threads()
        return X @ pm.codes.T
    if T <= FEW_TOKENS and pm.family in TILED + (H16,):
        # per token, not matvec_batch (the same bits): a one-sequence model then never needs the batched kernels
        # compiled, which cost ~6 s of a cold start (kernels/warmup.py); the server's decode rows use them
        Y = np.empty((T, pm.n_rows), np.float32)
        for i in range(T):
            matvec(pm, X[i], Y[i])
        return Y
    if VNNI and pm.family in TILED and _vnni_codes(pm):
        return np.ascontiguousarray(_matmul_vnni(pm, X))
    return np.ascontiguousarray(_matmul_widened(pm, X))


def dequantize_rows(pm: PackedMatrix, rows) -> np.ndarray:
    """Float32 copies of selected rows (embedding lookup: one row per token, never the whole matrix)."""
    rows = np.asarray(rows, dtype=np.int64)
    t, lane = rows // R, rows % R
    if pm.family == FP32:
        return np.ascontiguousarray(pm.codes[rows])
    if pm.family == H16:
        u = pm.codes[rows]
        if pm.kind == 1:
            return (u.astype(np.uint32) << 16).view(np.float32)
        return u.view(np.float16).astype(np.float32)
    c = pm.codes[t, :, :, lane].reshape(len(rows), pm.codes.shape[1], -1)   # [n, nblk, bytes] (from quads)
    if pm.family == U4:
        q = nibble_codes(c).astype(np.float32)
    elif pm.family == U5:
        q = five_bit_codes(c).astype(np.float32)
    elif pm.family == U6:
        q = six_bit_codes(c).astype(np.float32)
    elif pm.family == U2:
        q = crumb_codes(c).astype(np.float32)
    else:
        q = c.astype(np.float32)
    q -= pm.zero
    q *= _scales_f32(pm.d, t, lane)[..., None]
    if pm.m is not None:
        q += _scales_f32(pm.m, t, lane)[..., None]
    return q.reshape(len(rows), pm.n_cols)
