"""Matrix products `Y = X @ W.T` over PackedMatrix tiles (layouts: repack.py).

Decode and (on VNNI hosts) prefill use int16 activations with a float scale per block; the BLAS prefill
path keeps float32 activations (weights widened to float32 chunk by chunk). None quantizes activations to
int8, which is where llama.cpp loses fidelity. The innermost loops run over the TILE_ROWS rows of a tile so that
LLVM vectorizes them without horizontal reductions.

Two shapes:
  gemv  one token (decode). U4/I8: codes are consumed straight from memory and multiplied with int16
        activations (per-block scale) in integer arithmetic, per-block partial sums; on AVX-512 VNNI hosts
        the same integers through vpdpbusd (gemv_vnni.py, bit-identical). H16: each row converted to
        float32 in a small buffer and dotted in float32.
  gemm  many tokens (prefill). U4/I8 on AVX-512 VNNI hosts: an integer GEMM with int16 activations (per-block
        scale, as decode) and a vpdpwssd micro-kernel in LLVM IR, ~1.3-1.4x BLAS sgemm. Float families (and
        hosts without VNNI): a chunk of rows is widened to float32 scratch and handed to BLAS sgemm.
All kernels are compiled once (fixed array types) and cached on disk.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..runtime import cpu_target_has, limit_blas_threads
from .repack import TILE_ROWS, U4, I8, H16, FP32, PackedMatrix

R = TILE_ROWS
F16_TO_F32 = np.float32(2.0 ** 112)  # rebias a half's exponent after shifting its bits into float32's place


# ------------------------------------------------------------------------------------------ prefetch
# Decode streams every weight from DRAM once per token. The hardware prefetcher alone left the gemv loops at
# ~9 GB/s/core on the Xeon VMs; software prefetches PREFETCH_LINES cache lines ahead of the line being
# read gave +40 % on a plain streaming loop (9.3 -> 13.2 GB/s at 1 thread, 16.6 -> 22.7 at 2).
PREFETCH_LINES = 32


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Prefetch the cache line holding element idx of a 1-D array (llvm.prefetch: read, keep in all caches).
    A prefetch never faults, but callers still stay inside the array."""
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.PointerType())
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [ir.PointerType(), i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return sig, codegen


# ---------------------------------------------------------------------------------------- block scales
# Scales d and offsets m are stored as half bits (uint16) when the format's own scales are halves (exact, half
# the bytes to stream) or in two levels (K-quants: a float32 super-block scale times a small integer sub-block
# scale, exact in float32). They reach every kernel in ONE argument layout, a triple
#   (half bits uint16 [tiles, nblk, R], super-block scales float32 [tiles, nblk/G, R], sub-block scales int8
#    [tiles, nblk, R])
# of which a matrix uses the first part (two_level False) or the other two; the unused parts are dummies. So each
# kernel has one signature for every quant type of its family: each further quant type used to cost one more
# compile of each kernel (~3 s apiece, kernels/warmup.py). The branch is once per block, outside the inner loops.
_DUMMY_HALF = np.zeros((1, 1, R), np.uint16)
_DUMMY_SUPER = np.zeros((1, 1, R), np.float32)
_DUMMY_SUB = np.zeros((1, 1, R), np.int8)


@njit(inline="always", fastmath=True)
def _load_scales(src, two_level, t, b, bits, out):
    """out[:R] = the scales of block b of tile t as float32 (`bits` is `out` viewed as uint32)."""
    if two_level:
        sup = src[1]
        sub = src[2]
        g = b // (sub.shape[1] // sup.shape[1])
        for r in range(R):
            out[r] = sup[t, g, r] * np.float32(sub[t, b, r])
    else:
        half = src[0]
        for r in range(R):
            h = np.uint32(half[t, b, r])
            bits[r] = ((h & np.uint32(0x8000)) << 16) | ((h & np.uint32(0x7FFF)) << 13)
        for r in range(R):
            out[r] *= F16_TO_F32


def _kernel_scales(a):
    """A PackedMatrix's d or m (half bits, a (super, sub) pair, or None) as the kernels' triple."""
    if a is None:
        return _DUMMY_HALF, _DUMMY_SUPER, _DUMMY_SUB
    if isinstance(a, tuple):
        return _DUMMY_HALF, a[0], a[1].view(np.int8)   # sub-scales < 128: the same values as int8
    return a, _DUMMY_SUPER, _DUMMY_SUB


def _scales_f32(a, t, lane) -> np.ndarray:
    """Block scales (or offsets) of rows (tile t, lane) as float32 [n, nblk]."""
    if isinstance(a, tuple):
        sup, sub = a
        g = sub.shape[1] // sup.shape[1]
        return np.repeat(sup[t, :, lane], g, axis=1) * sub[t, :, lane].astype(np.float32)
    a = a[t, :, lane]
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a


def _scale_args(pm: PackedMatrix):
    """(d, m, two_level, has_m) for the kernels (made once per matrix)."""
    if pm.kernel_scales is None:
        pm.kernel_scales = (_kernel_scales(pm.d), _kernel_scales(pm.m), isinstance(pm.d, tuple), pm.m is not None)
    return pm.kernel_scales


# ---------------------------------------------------------------------------------------------- gemv
# Decode (one token) is memory-bound: the activations are quantized once to int16 with one float scale per
# weight block (|error| <= 1.5e-5 of the block's largest value: ~250x finer than ggml's int8 Q8 activations),
# so the inner loop is integer multiply-adds on codes widened straight from memory.
ACT_MAX = np.float32(32767.0)


@njit(fastmath=False)   # helpers called only from other kernels are not cached themselves (kernels/warmup.py)
def _quantize_activations(x, bs, xq, xd, xsum, xqsum):
    """x float32 [K] -> xq int16 [K], per-block scale xd [K/bs], per-block sums xsum (for the float
    offsets m) and per-block integer sums xqsum (for the codes' zero point).
    Strict float semantics (no fastmath): inlined into different kernels, a fast-math sum may be reordered
    differently in each, and the batched decode kernels must reproduce the one-token kernels' bits."""
    for b in range(x.shape[0] // bs):
        amax = np.float32(0.0)
        tot = np.float32(0.0)
        for j in range(b * bs, (b + 1) * bs):
            amax = max(amax, abs(x[j]))
            tot += x[j]
        xsum[b] = tot
        xd[b] = amax / ACT_MAX
        inv = ACT_MAX / amax if amax > 0 else np.float32(0.0)
        qs = 0
        for j in range(b * bs, (b + 1) * bs):
            v = np.int16(round(x[j] * inv))
            xq[j] = v
            qs += v
        xqsum[b] = qs


@njit(fastmath=True)
def _finish_tile(acc, y, t, n_rows, accumulate):
    for r in range(R):
        row = t * R + r
        if row < n_rows:
            if accumulate:
                y[row] += acc[r]
            else:
                y[row] = acc[r]


@njit(inline="always", fastmath=True)
def _add_block(acc, s, t, b, d, m, two_level, has_m, zero, xd, xsum, xqsum, dbits, dv, mbits, mv):
    """acc += one block's integer dots s, scaled: d_row * (s - zero * sum(xq)) * d_x (+ m_row * sum(x))."""
    _load_scales(d, two_level, t, b, dbits, dv)
    if has_m:
        _load_scales(m, two_level, t, b, mbits, mv)
    _add_scaled(acc, s, b, has_m, zero, xd, xsum, xqsum, dv, mv)


@njit(inline="always", fastmath=True)
def _add_scaled(acc, s, b, has_m, zero, xd, xsum, xqsum, dv, mv):
    """_add_block with the block's scales dv (and offsets mv) already loaded: several tokens' sums of one
    block share them (gemv_vnni_batch.py)."""
    dx = xd[b]
    zq = zero * xqsum[b]
    if has_m:
        sx = xsum[b]
        for r in range(R):
            acc[r] += dv[r] * (np.float32(s[r] - zq) * dx) + mv[r] * sx
    else:
        for r in range(R):
            acc[r] += dv[r] * (np.float32(s[r] - zq) * dx)


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_u4(codes, d, m, two_level, has_m, zero, x, y, accumulate):
    """y[:n] (=|+=) W x for U4 tiles; y has exactly n_rows entries."""
    n_tiles, nblk = codes.shape[0], codes.shape[1]
    xq = np.empty(x.shape[0], np.int16)
    xd = np.empty(nblk, np.float32)
    xsum = np.empty(nblk, np.float32)
    xqsum = np.empty(nblk, np.int32)
    _quantize_activations(x, 32, xq, xd, xsum, xqsum)
    flat = codes.reshape(-1)
    last = flat.shape[0] - 1
    for t in prange(n_tiles):
        acc = np.zeros(R, np.float32)
        s = np.empty(R, np.int32)
        dbits = np.empty(R, np.uint32)
        dv = dbits.view(np.float32)
        mbits = np.empty(R, np.uint32)
        mv = mbits.view(np.float32)
        for b in range(nblk):
            s[:] = 0
            c0 = b * 32
            for j in range(0, 16, 2):   # two bytes (four products) per step: fewer passes over s
                ahead = ((t * nblk + b) * 16 + j + PREFETCH_LINES) * R
                _prefetch(flat, min(ahead, last))
                _prefetch(flat, min(ahead + R, last))
                x0 = np.int32(xq[c0 + j])
                x1 = np.int32(xq[c0 + j + 16])
                x2 = np.int32(xq[c0 + j + 1])
                x3 = np.int32(xq[c0 + j + 17])
                for r in range(R):
                    v = np.int32(codes[t, b, j, r])
                    w = np.int32(codes[t, b, j + 1, r])
                    s[r] += (v & 15) * x0 + (v >> 4) * x1 + (w & 15) * x2 + (w >> 4) * x3
            _add_block(acc, s, t, b, d, m, two_level, has_m, zero, xd, xsum, xqsum, dbits, dv, mbits, mv)
        _finish_tile(acc, y, t, y.shape[0], accumulate)


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_i8(codes, d, m, two_level, has_m, zero, x, y, accumulate):
    n_tiles, nblk, bs = codes.shape[0], codes.shape[1], codes.shape[2]
    xq = np.empty(x.shape[0], np.int16)
    xd = np.empty(nblk, np.float32)
    xsum = np.empty(nblk, np.float32)
    xqsum = np.empty(nblk, np.int32)
    _quantize_activations(x, bs, xq, xd, xsum, xqsum)
    flat = codes.reshape(-1)
    last = flat.shape[0] - 1
    for t in prange(n_tiles):
        acc = np.zeros(R, np.float32)
        s = np.empty(R, np.int32)
        dbits = np.empty(R, np.uint32)
        dv = dbits.view(np.float32)
        mbits = np.empty(R, np.uint32)
        mv = mbits.view(np.float32)
        for b in range(nblk):
            s[:] = 0
            c0 = b * bs
            # Two products per step with constant trip counts: the shape LLVM turns into vpmaddwd
            # (a single product per step, or a runtime trip count, stays scalar: 8x slower).
            ahead = ((t * nblk + b) * bs + PREFETCH_LINES) * R
            for j in range(bs):
                _prefetch(flat, min(ahead + j * R, last))
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
            _add_block(acc, s, t, b, d, m, two_level, has_m, zero, xd, xsum, xqsum, dbits, dv, mbits, mv)
        _finish_tile(acc, y, t, y.shape[0], accumulate)


# Several tokens at decode time (continuous batching: one token from each of several sequences). Each weight
# block is read from memory and unpacked once for all of them; every token's sums are the same integers, added
# in the same order with the same float steps as in the one-token kernels above, so each row of the result is
# bit-identical to that token's matvec: a sequence decodes the same whether or not others run beside it.
@njit(parallel=True, fastmath=True, cache=True)
def _gemv_u4_batch(codes, d, m, two_level, has_m, zero, X, Y, accumulate):
    """Y[i, :n] (=|+=) W X[i] for U4 tiles, each i exactly as _gemv_u4."""
    n_tok = X.shape[0]
    n_tiles, nblk = codes.shape[0], codes.shape[1]
    xq = np.empty((n_tok, X.shape[1]), np.int16)
    xd = np.empty((n_tok, nblk), np.float32)
    xsum = np.empty((n_tok, nblk), np.float32)
    xqsum = np.empty((n_tok, nblk), np.int32)
    for i in range(n_tok):
        _quantize_activations(X[i], 32, xq[i], xd[i], xsum[i], xqsum[i])
    flat = codes.reshape(-1)
    last = flat.shape[0] - 1
    for t in prange(n_tiles):
        acc = np.zeros((n_tok, R), np.float32)
        s = np.empty(R, np.int32)
        dbits = np.empty(R, np.uint32)
        dv = dbits.view(np.float32)
        mbits = np.empty(R, np.uint32)
        mv = mbits.view(np.float32)
        for b in range(nblk):
            ahead = ((t * nblk + b) * 16 + PREFETCH_LINES) * R
            for j in range(16):
                _prefetch(flat, min(ahead + j * R, last))
            c0 = b * 32
            for i in range(n_tok):   # the block's 1 KiB of codes stays in L1 for the other tokens
                s[:] = 0
                for j in range(0, 16, 2):
                    x0 = np.int32(xq[i, c0 + j])
                    x1 = np.int32(xq[i, c0 + j + 16])
                    x2 = np.int32(xq[i, c0 + j + 1])
                    x3 = np.int32(xq[i, c0 + j + 17])
                    for r in range(R):
                        v = np.int32(codes[t, b, j, r])
                        w = np.int32(codes[t, b, j + 1, r])
                        s[r] += (v & 15) * x0 + (v >> 4) * x1 + (w & 15) * x2 + (w >> 4) * x3
                _add_block(acc[i], s, t, b, d, m, two_level, has_m, zero, xd[i], xsum[i], xqsum[i], dbits, dv, mbits,
                           mv)
        for i in range(n_tok):
            _finish_tile(acc[i], Y[i], t, Y.shape[1], accumulate)


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_i8_batch(codes, d, m, two_level, has_m, zero, X, Y, accumulate):
    """Y[i, :n] (=|+=) W X[i] for I8 tiles, each i exactly as _gemv_i8."""
    n_tok = X.shape[0]
    n_tiles, nblk, bs = codes.shape[0], codes.shape[1], codes.shape[2]
    xq = np.empty((n_tok, X.shape[1]), np.int16)
    xd = np.empty((n_tok, nblk), np.float32)
    xsum = np.empty((n_tok, nblk), np.float32)
    xqsum = np.empty((n_tok, nblk), np.int32)
    for i in range(n_tok):
        _quantize_activations(X[i], bs, xq[i], xd[i], xsum[i], xqsum[i])
    flat = codes.reshape(-1)
    last = flat.shape[0] - 1
    for t in prange(n_tiles):
        acc = np.zeros((n_tok, R), np.float32)
        s = np.empty(R, np.int32)
        dbits = np.empty(R, np.uint32)
        dv = dbits.view(np.float32)
        mbits = np.empty(R, np.uint32)
        mv = mbits.view(np.float32)
        for b in range(nblk):
            ahead = ((t * nblk + b) * bs + PREFETCH_LINES) * R
            for j in range(bs):
                _prefetch(flat, min(ahead + j * R, last))
            c0 = b * bs
            for i in range(n_tok):   # the block's codes stay in L1 for the other tokens
                s[:] = 0
                if bs == 32:   # constant trip counts (see _gemv_i8)
                    for j in range(16):
                        x0 = np.int32(xq[i, c0 + j])
                        x1 = np.int32(xq[i, c0 + j + 16])
                        for r in range(R):
                            s[r] += np.int32(codes[t, b, j, r]) * x0 + np.int32(codes[t, b, j + 16, r]) * x1
                else:
                    for j in range(8):
                        x0 = np.int32(xq[i, c0 + j])
                        x1 = np.int32(xq[i, c0 + j + 8])
                        for r in range(R):
                            s[r] += np.int32(codes[t, b, j, r]) * x0 + np.int32(codes[t, b, j + 8, r]) * x1
                _add_block(acc[i], s, t, b, d, m, two_level, has_m, zero, xd[i], xsum[i], xqsum[i], dbits, dv, mbits,
                           mv)
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


# --------------------------------------------------------------------------------- prefill (VNNI)
# Many tokens through U4/I8 tiles: an integer GEMM. Activations are quantized per weight block to int16 (as for
# decode: ~250x finer than ggml's int8 activations), codes minus their zero point are unpacked once per
# (tile, block) into int16 pairs, and a micro-kernel written in LLVM IR (vpdpwssd: AVX-512 VNNI, 32 int16
# products per instruction) keeps TOKENS_PER_CALL x TILE_ROWS int32 sums in 24 zmm registers, so each weight
# load serves 6 tokens; the block's float scaling is fused in before the sums leave the registers. LLVM's
# auto-vectorizer does not find this shape by itself (its version of the loop ran at 1/3 of BLAS sgemm).
# Measured on one 5632x2048 Q4_0 matrix x 128 tokens, 1 thread: ~133 GFLOP/s vs ~94-98 for widen + sgemm.
TOKENS_PER_CALL = 6
_VECS = R // 16


def _vnni_available() -> bool:
    """The IR micro-kernel needs AVX-512 VNNI (and 512-bit vectors: TILE_ROWS int32 = whole zmm registers),
    on the CPU numba compiles for (which NUMBA_CPU_FEATURES may set apart from the host's)."""
    return R % 16 == 0 and cpu_target_has("avx512vnni", "avx512bw")


VNNI = _vnni_available()


def _make_block_fma(n_pairs):
    @intrinsic
    def block_fma(typingctx, acc, ao, w, xp, xo, xstride, dv, mv, xd, xsum, so, sstride):
        """For i < TOKENS_PER_CALL, r < R: acc[ao + i*R + r] += dv[r] * xd[so + i*sstride] *
        sum_p dot2(w[p*R + r], xp[xo + i*xstride + p]) + mv[r] * xsum[so + i*sstride]
        (w, xp: int32 words holding two int16 each; the dot2 is vpdpwssd's pairwise product sum)."""
        sig = types.void(acc, types.intp, w, xp, types.intp, types.intp, dv, mv, xd, xsum, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            arrays = (0, 2, 3, 6, 7, 8, 9)
            a = [context.make_array(signature.args[k])(context, builder, args[k]).data if k in arrays else args[k]
                 for k in range(12)]
            accp, ao, wp, xpp, xo, xs, dvp, mvp, xdp, xsp, so, ss = a
            i32, i64, f32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
            vi, vf, vh = ir.VectorType(i32, 16), ir.VectorType(f32, 16), ir.VectorType(ir.IntType(16), 32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi, [vi, vh, vh]),
                                                "llvm.x86.avx512.vpdpwssd.512")
            fast = ("fast",)

            def c(n):
                return ir.Constant(i64, n)

            def vload(base, off, ty):
                return builder.load(builder.bitcast(builder.gep(base, [off]), ty.as_pointer()), typ=ty, align=4)

            def bcast(val, ty):
                u = ir.Constant(ty, ir.Undefined)
                return builder.shuffle_vector(builder.insert_element(u, val, ir.Constant(i32, 0)), u,
                                              ir.Constant(ir.VectorType(i32, ty.count), [0] * ty.count))

            sums = [[ir.Constant(vi, [0] * 16) for _ in range(_VECS)] for _ in range(TOKENS_PER_CALL)]
            for p in range(n_pairs):
                wv = [builder.bitcast(vload(wp, c(p * R + v * 16), vi), vh) for v in range(_VECS)]
                for i in range(TOKENS_PER_CALL):
                    off = builder.add(xo, builder.add(builder.mul(c(i), xs), c(p)))
                    xv = builder.bitcast(bcast(builder.load(builder.gep(xpp, [off])), vi), vh)
                    for v in range(_VECS):
                        sums[i][v] = builder.call(fn, [sums[i][v], wv[v], xv])
            dvv = [vload(dvp, c(v * 16), vf) for v in range(_VECS)]
            mvv = [vload(mvp, c(v * 16), vf) for v in range(_VECS)]
            for i in range(TOKENS_PER_CALL):
                soff = builder.add(so, builder.mul(c(i), ss))
                dx = bcast(builder.load(builder.gep(xdp, [soff])), vf)
                sx = bcast(builder.load(builder.gep(xsp, [soff])), vf)
                for v in range(_VECS):
                    aoff = builder.add(ao, c(i * R + v * 16))
                    part = builder.fmul(builder.fmul(builder.sitofp(sums[i][v], vf), dx, flags=fast), dvv[v],
                                        flags=fast)
                    part = builder.fadd(part, builder.fmul(mvv[v], sx, flags=fast), flags=fast)
                    builder.store(builder.fadd(vload(accp, aoff, vf), part, flags=fast),
                                  builder.bitcast(builder.gep(accp, [aoff]), vf.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return block_fma


_block_fma_32 = _make_block_fma(16)   # 32-weight blocks: 16 pairs
_block_fma_16 = _make_block_fma(8)    # 16-weight blocks (Q6_K, Q3_K, Q2_K)


@njit(fastmath=True, cache=True)
def _quantize_token_blocks(X, bs, xq, xd, xsum):
    """Rows of X -> int16 xq (rows past X's are zero, as are their scales and sums), per-block scales/sums.
    Serial: a few microseconds per token next to the product's milliseconds, and a parallel region would cost
    one more second of compiling (kernels/warmup.py)."""
    T = X.shape[0]
    nblk = xd.shape[1]
    for i in range(xq.shape[0]):
        if i < T:
            qsum = np.empty(nblk, np.int32)
            _quantize_activations(X[i], bs, xq[i], xd[i], xsum[i], qsum)
        else:
            xq[i, :] = 0
            xd[i, :] = 0
            xsum[i, :] = 0


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _igemm(codes, nibbles, d, m, two_level, has_m, zero, xp, xd, xsum, Y):
    """Y[T, tiles*R] = X @ W.T for U4 (nibbles) or I8 tiles; xp = X's int16 codes as pairs (int32 words)
    [Tp, K/2], Tp a multiple of TOKENS_PER_CALL (padding tokens zero); xd, xsum [Tp, K/bs]."""
    n_tiles, nblk = codes.shape[0], codes.shape[1]
    n_pairs = 16 if nibbles else codes.shape[2] // 2
    T, Tp, xs = Y.shape[0], xp.shape[0], xp.shape[1]
    xflat, xdf, xsf = xp.reshape(-1), xd.reshape(-1), xsum.reshape(-1)
    z = np.int32(zero)
    for t in prange(n_tiles):
        wp = np.empty(n_pairs * R, np.int32)
        acc = np.zeros(Tp * R, np.float32)
        dbits = np.empty(R, np.uint32)
        dv = dbits.view(np.float32)
        mbits = np.zeros(R, np.uint32)
        mv = mbits.view(np.float32)
        for b in range(nblk):
            # pair p = weights (2p, 2p+1) of the block, zero point removed, as two int16 in one word
            if nibbles:
                for p in range(8):
                    for r in range(R):
                        lo = np.int32(codes[t, b, 2 * p, r])
                        hi = np.int32(codes[t, b, 2 * p + 1, r])
                        wp[p * R + r] = (((lo & 15) - z) & 0xFFFF) | (((hi & 15) - z) << 16)
                        wp[(p + 8) * R + r] = (((lo >> 4) - z) & 0xFFFF) | (((hi >> 4) - z) << 16)
            else:
                for p in range(n_pairs):
                    for r in range(R):
                        lo = np.int32(codes[t, b, 2 * p, r])
                        hi = np.int32(codes[t, b, 2 * p + 1, r])
                        wp[p * R + r] = ((lo - z) & 0xFFFF) | ((hi - z) << 16)
            _load_scales(d, two_level, t, b, dbits, dv)
            if has_m:
                _load_scales(m, two_level, t, b, mbits, mv)
            for i0 in range(0, Tp, TOKENS_PER_CALL):
                if n_pairs == 16:
                    _block_fma_32(acc, i0 * R, wp, xflat, i0 * xs + b * 16, xs, dv, mv, xdf, xsf,
                                  i0 * nblk + b, nblk)
                else:
                    _block_fma_16(acc, i0 * R, wp, xflat, i0 * xs + b * 8, xs, dv, mv, xdf, xsf,
                                  i0 * nblk + b, nblk)
        for i in range(T):
            for r in range(R):
                Y[i, t * R + r] = acc[i * R + r]


def _matmul_vnni(pm: PackedMatrix, X: np.ndarray) -> np.ndarray:
    """Prefill product through the VNNI integer GEMM (U4/I8 tiles)."""
    T, K = X.shape
    bs = pm.bs
    Tp = -(-T // TOKENS_PER_CALL) * TOKENS_PER_CALL
    xq = np.empty((Tp, K), np.int16)
    xd = np.empty((Tp, K // bs), np.float32)
    xsum = np.empty((Tp, K // bs), np.float32)
    _quantize_token_blocks(X, bs, xq, xd, xsum)
    Y = np.empty((T, pm.codes.shape[0] * R), np.float32)
    _igemm(pm.codes, pm.family == U4, *_scale_args(pm), pm.zero, xq.view(np.int32), xd, xsum, Y)
    return Y[:, :pm.n_rows]


# ------------------------------------------------------------------------------------ prefill (BLAS)
# Many tokens: compute-bound, so a chunk of rows is widened to float32 (a bounded scratch, never the
# whole matrix) and multiplied with the float32 activations by BLAS sgemm (~3x our best Numba FMA loop).
CHUNK_FLOATS = 1 << 20      # widened weights per chunk (4 MiB)
FEW_TOKENS = 3              # up to this many tokens, run the decode kernel per token instead


@njit(parallel=True, fastmath=True, cache=True, nogil=True)   # nogil: prefill runs it from several threads
def _widen_u4(codes, d, m, two_level, has_m, zero, t0, t1, out):
    """Tiles t0..t1 -> float32 out[t - t0, col, r] (each tile's W.T, contiguous: sequential writes)."""
    nblk = codes.shape[1]
    zf = np.float32(zero)
    for t in prange(t0, t1):
        dbits = np.empty(R, np.uint32)
        dv = dbits.view(np.float32)
        mbits = np.zeros(R, np.uint32)
        mv = mbits.view(np.float32)
        for b in range(nblk):
            _load_scales(d, two_level, t, b, dbits, dv)
            if has_m:
                _load_scales(m, two_level, t, b, mbits, mv)
            for j in range(16):
                for r in range(R):
                    v = codes[t, b, j, r]
                    # uint8 casts keep the nibble arithmetic 8/32-bit wide (else int64 lanes: 2x slower)
                    out[t - t0, b * 32 + j, r] = (np.float32(np.uint8(v & 15)) - zf) * dv[r] + mv[r]
                    out[t - t0, b * 32 + j + 16, r] = (np.float32(np.uint8(v >> 4)) - zf) * dv[r] + mv[r]


@njit(parallel=True, fastmath=True, cache=True, nogil=True)   # nogil: prefill runs it from several threads
def _widen_i8(codes, d, m, two_level, has_m, zero, t0, t1, out):
    nblk, bs = codes.shape[1], codes.shape[2]
    zf = np.float32(zero)
    for t in prange(t0, t1):
        dbits = np.empty(R, np.uint32)
        dv = dbits.view(np.float32)
        mbits = np.zeros(R, np.uint32)
        mv = mbits.view(np.float32)
        for b in range(nblk):
            _load_scales(d, two_level, t, b, dbits, dv)
            if has_m:
                _load_scales(m, two_level, t, b, mbits, mv)
            for j in range(bs):
                for r in range(R):
                    out[t - t0, b * bs + j, r] = (np.float32(codes[t, b, j, r]) - zf) * dv[r] + mv[r]


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
    """Prefill product: chunks of rows (H16) or of tiles (U4/I8) are widened to float32 and multiplied by
    single-threaded BLAS; with several threads, the chunks are shared out to that many Python threads
    (BLAS and the widening kernels release the GIL)."""
    T, K = X.shape
    limit_blas_threads()
    tiled = pm.family in (U4, I8)
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
            widen = _widen_u4 if pm.family == U4 else _widen_i8
            for t0 in chunk_starts:
                t1 = min(n_units, t0 + step)
                n = t1 - t0
                widen(pm.codes, d, m, two_level, has_m, pm.zero, t0, t1, buf)
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


# ----------------------------------------------------------------------------------------- dispatch
# The VNNI one-token kernel reuses this module's helpers (_add_block, ...), hence imported once they exist.
from . import gemv_vnni, gemv_vnni_batch  # noqa: E402

VNNI_GEMV = VNNI and gemv_vnni.USABLE


def matvec(pm: PackedMatrix, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """One token: x float32 [n_cols] -> W x, float32 [n_rows], written to (or added into) `out`."""
    if out is None:
        out = np.empty(pm.n_rows, np.float32)
        accumulate = False
    if VNNI_GEMV and pm.family in (U4, I8):
        gemv_vnni._gemv_vnni(pm.codes, pm.family == U4, *_scale_args(pm), pm.zero, x, out, accumulate)
    elif pm.family == U4:
        _gemv_u4(pm.codes, *_scale_args(pm), pm.zero, x, out, accumulate)
    elif pm.family == I8:
        _gemv_i8(pm.codes, *_scale_args(pm), pm.zero, x, out, accumulate)
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
    U4/I8 weights are streamed once for all T (continuous batching)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if out is None:
        out = np.empty((X.shape[0], pm.n_rows), np.float32)
        accumulate = False
    if pm.family in (U4, I8) and X.shape[0] > 1 and VNNI_GEMV:
        gemv_vnni_batch.gemv_batch_vnni(pm.codes, pm.family == U4, *_scale_args(pm), pm.zero, X, out, accumulate)
    elif pm.family in (U4, I8) and X.shape[0] > 1:
        kernel = _gemv_u4_batch if pm.family == U4 else _gemv_i8_batch
        kernel(pm.codes, *_scale_args(pm), pm.zero, X, out, accumulate)
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
    if T <= FEW_TOKENS and pm.family in (U4, I8, H16):
        # per token, not matvec_batch (the same bits): a one-sequence model then never needs the batched kernels
        # compiled, which cost ~6 s of a cold start (kernels/warmup.py); the server's decode rows use them
        Y = np.empty((T, pm.n_rows), np.float32)
        for i in range(T):
            matvec(pm, X[i], Y[i])
        return Y
    if VNNI and pm.family in (U4, I8):
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
    c = pm.codes[t, :, :, lane]            # [n, nblk, bytes]
    if pm.family == U4:
        q = np.concatenate([c & 15, c >> 4], axis=-1).astype(np.float32)
    else:
        q = c.astype(np.float32)
    q -= pm.zero
    q *= _scales_f32(pm.d, t, lane)[..., None]
    if pm.m is not None:
        q += _scales_f32(pm.m, t, lane)[..., None]
    return q.reshape(len(rows), pm.n_cols)
