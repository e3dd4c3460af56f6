"""Matrix products `Y = X @ W.T` over PackedMatrix tiles (layouts: repack.py): which kernel runs, and the VNNI flags.

Decode and (on VNNI hosts) prefill use int16 activations with a float scale per block; the BLAS prefill
path keeps float32 activations (weights widened to float32 chunk by chunk). None quantizes activations to
int8, which is where llama.cpp loses fidelity. The innermost loops run over the TILE_ROWS rows of a tile so that
LLVM vectorizes them without horizontal reductions.

Two shapes:
  gemv  one token (decode). U4/I8: codes are consumed straight from memory and multiplied with int16
        activations (per-block scale) in integer arithmetic, per-block partial sums (gemv.py); on AVX-512 VNNI
        hosts the same integers through vpdpbusd (gemv_vnni.py, bit-identical). H16: each row converted to
        float32 in a small buffer and dotted in float32 (gemv.py).
  gemm  many tokens (prefill). U4/I8 on AVX-512 VNNI hosts: an integer GEMM with int16 activations (per-block
        scale, as decode) and a vpdpwssd micro-kernel in LLVM IR, ~1.3-1.4x BLAS sgemm (gemm_vnni.py); its rows
        are bit-identical to gemv's (one float epilogue, blocks._epilogue_ir). Float families (and hosts without
        VNNI): a chunk of rows is widened to float32 scratch and handed to BLAS sgemm (gemm_blas.py;
        float32-close to gemv).
What every kernel shares (block scales, activation quantization, the epilogue) is in blocks.py. All kernels are
compiled once (fixed array types) and cached on disk (warmup.py).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..runtime import cpu_target_has, limit_blas_threads
from . import gemv_vnni
from .blocks import PREFETCH_LINES, R, _add_block, _finish_tile, _prefetch, _quantize_activations, _scale_args, \
    _scales_f32
from .gemm_blas import _matmul_widened
from .gemm_vnni import _VECS, _matmul_vnni
from .gemv import _gemv, _gemv_batch, _gemv_h16
from .repack import U4, I8, H16, FP32, PackedMatrix

FEW_TOKENS = 3              # up to this many tokens, run the decode kernel per token instead


def _vnni_available() -> bool:
    """The IR micro-kernels (gemm_vnni.py, the batched decode below) need AVX-512 VNNI (and 512-bit vectors:
    TILE_ROWS int32 = whole zmm registers), on the CPU numba compiles for (which NUMBA_CPU_FEATURES may set
    apart from the host's)."""
    return R % 16 == 0 and cpu_target_has("avx512vnni", "avx512bw")


VNNI = _vnni_available()
VNNI_GEMV = VNNI and gemv_vnni.USABLE


# ------------------------------------------------------------------------------ batched decode (VNNI)
# matvec_batch's kernel on VNNI hosts. The one-token kernels are bound by their integer dot products as much
# as by memory, so several tokens gain only if the work per token shrinks: this micro-kernel widens a block's
# codes into int16 pairs in registers ONCE and applies them to up to DOTS_TOKENS tokens (8 vpdpwssd per token
# and code-row pair, 4 x DOTS_TOKENS int32 sums kept in zmm registers). The sums are exactly the integers the
# one-token kernels add up; _add_block finishes them the same way, so each row stays bit-identical to matvec.
DOTS_TOKENS = 4


def _make_block_dots(nibbles: bool, n_rows: int, n_tok: int):
    """s[i*R + r] = integer dot of token i's int16 activations (pairs xp[xo + i*xstride + p]) with the codes of
    one block of one tile (flat uint8 codes from cbase: n_rows rows of R lanes), for i < n_tok."""
    n_pairs = 16 if nibbles else n_rows // 2

    @intrinsic
    def block_dots(typingctx, s, codes, cbase, xp, xo, xstride):
        sig = types.void(s, codes, types.intp, xp, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            sp, cp, xpp = (context.make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 1, 3))
            cbase_, xo_, xs_ = args[2], args[4], args[5]
            i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
            vb, vi, vh = ir.VectorType(i8, 16), ir.VectorType(i32, 16), ir.VectorType(ir.IntType(16), 32)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vi, [vi, vh, vh]),
                                                "llvm.x86.avx512.vpdpwssd.512")

            def c(n):
                return ir.Constant(i64, n)

            def splat(n):
                return ir.Constant(vi, [n] * 16)

            def code_row(j, q):   # lanes 16q..16q+15 of code row j, zero-extended to int32
                ptr = builder.bitcast(builder.gep(cp, [builder.add(cbase_, c(j * R + 16 * q))]), vb.as_pointer())
                return builder.zext(builder.load(ptr, typ=vb, align=1), vi)

            def x_pair(i, p):     # token i's activation pair p of the block, in every lane
                x = builder.load(builder.gep(xpp, [builder.add(xo_, builder.add(builder.mul(c(i), xs_), c(p)))]))
                u = ir.Constant(vi, ir.Undefined)
                v = builder.shuffle_vector(builder.insert_element(u, x, ir.Constant(i32, 0)), u,
                                           ir.Constant(vi, [0] * 16))
                return builder.bitcast(v, vh)

            def pair(lo, hi):     # two int32 lanes of values < 2**15 -> one lane of two int16
                return builder.bitcast(builder.or_(lo, builder.shl(hi, splat(16))), vh)

            sums = [[ir.Constant(vi, [0] * 16) for _ in range(_VECS)] for _ in range(n_tok)]
            steps = 8 if nibbles else n_pairs
            for p in range(steps):
                # weights of the activation pairs this step feeds: (2p, 2p+1), and for nibbles (16+2p, 17+2p)
                ws = []
                for q in range(_VECS):
                    a, b = code_row(2 * p, q), code_row(2 * p + 1, q)
                    if nibbles:
                        m = splat(15)
                        ws.append((builder.and_(a, m), builder.and_(b, m),
                                   builder.lshr(a, splat(4)), builder.lshr(b, splat(4))))
                    else:
                        ws.append((a, b))
                wlo = [pair(w[0], w[1]) for w in ws]
                whi = [pair(w[2], w[3]) for w in ws] if nibbles else None
                for i in range(n_tok):
                    xl = x_pair(i, p)
                    xh = x_pair(i, p + 8) if nibbles else None
                    for q in range(_VECS):
                        sums[i][q] = builder.call(fn, [sums[i][q], wlo[q], xl])
                        if nibbles:
                            sums[i][q] = builder.call(fn, [sums[i][q], whi[q], xh])
            for i in range(n_tok):
                for q in range(_VECS):
                    ptr = builder.bitcast(builder.gep(sp, [c(i * R + 16 * q)]), vi.as_pointer())
                    builder.store(sums[i][q], ptr, align=4)
            return context.get_dummy_value()
        return sig, codegen
    return block_dots


_DOTS = {(nib, rows, n): _make_block_dots(nib, rows, n)
         for nib, rows in ((True, 16), (False, 32), (False, 16)) for n in range(1, DOTS_TOKENS + 1)}
_u4_dots_1, _u4_dots_2, _u4_dots_3, _u4_dots_4 = (_DOTS[(True, 16, n)] for n in range(1, 5))
_i8_dots32_1, _i8_dots32_2, _i8_dots32_3, _i8_dots32_4 = (_DOTS[(False, 32, n)] for n in range(1, 5))
_i8_dots16_1, _i8_dots16_2, _i8_dots16_3, _i8_dots16_4 = (_DOTS[(False, 16, n)] for n in range(1, 5))


@njit(inline="always", fastmath=True)
def _block_dots(s, flat, cbase, xp, xo, xstride, nibbles, rows, g):
    """Dispatch to the micro-kernel for this block shape and g (1..DOTS_TOKENS) tokens."""
    if nibbles:
        if g == 4:
            _u4_dots_4(s, flat, cbase, xp, xo, xstride)
        elif g == 3:
            _u4_dots_3(s, flat, cbase, xp, xo, xstride)
        elif g == 2:
            _u4_dots_2(s, flat, cbase, xp, xo, xstride)
        else:
            _u4_dots_1(s, flat, cbase, xp, xo, xstride)
    elif rows == 32:
        if g == 4:
            _i8_dots32_4(s, flat, cbase, xp, xo, xstride)
        elif g == 3:
            _i8_dots32_3(s, flat, cbase, xp, xo, xstride)
        elif g == 2:
            _i8_dots32_2(s, flat, cbase, xp, xo, xstride)
        else:
            _i8_dots32_1(s, flat, cbase, xp, xo, xstride)
    else:
        if g == 4:
            _i8_dots16_4(s, flat, cbase, xp, xo, xstride)
        elif g == 3:
            _i8_dots16_3(s, flat, cbase, xp, xo, xstride)
        elif g == 2:
            _i8_dots16_2(s, flat, cbase, xp, xo, xstride)
        else:
            _i8_dots16_1(s, flat, cbase, xp, xo, xstride)


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_batch_vnni(codes, nibbles, d, m, two_level, has_m, zero, bs, X, Y, accumulate):
    """Y[i] (=|+=) W X[i] for U4 (nibbles) or I8 tiles, each row bit-identical to matvec."""
    n_tok = X.shape[0]
    n_tiles, nblk, rows = codes.shape[0], codes.shape[1], codes.shape[2]
    xq = np.empty((n_tok, X.shape[1]), np.int16)
    xd = np.empty((n_tok, nblk), np.float32)
    xsum = np.empty((n_tok, nblk), np.float32)
    xqsum = np.empty((n_tok, nblk), np.int32)
    for i in range(n_tok):   # here, not in a parallel region of its own: a launch costs more than this
        _quantize_activations(X[i], bs, xq[i], xd[i], xsum[i], xqsum[i])
    xp = xq.reshape(-1).view(np.int32)
    xstride = X.shape[1] // 2
    ppb = bs // 2
    flat = codes.reshape(-1)
    last = flat.shape[0] - 1
    for t in prange(n_tiles):
        acc = np.zeros((n_tok, R), np.float32)
        s = np.empty(DOTS_TOKENS * R, np.int32)
        dbits = np.empty(R, np.uint32)
        dv = dbits.view(np.float32)
        mbits = np.empty(R, np.uint32)
        mv = mbits.view(np.float32)
        for b in range(nblk):
            cbase = (t * nblk + b) * rows * R
            ahead = cbase + PREFETCH_LINES * R
            for j in range(rows):
                _prefetch(flat, min(ahead + j * R, last))
            for i0 in range(0, n_tok, DOTS_TOKENS):
                g = min(DOTS_TOKENS, n_tok - i0)
                _block_dots(s, flat, cbase, xp, i0 * xstride + b * ppb, xstride, nibbles, rows, g)
                for k in range(g):
                    i = i0 + k
                    _add_block(acc[i], s[k * R:(k + 1) * R], t, b, d, m, two_level, has_m, zero, xd[i], xsum[i],
                               xqsum[i], dbits, dv, mbits, mv)
        for i in range(n_tok):
            _finish_tile(acc[i], Y[i], t, Y.shape[1], accumulate)


# ----------------------------------------------------------------------------------------- dispatch
def matvec(pm: PackedMatrix, x: np.ndarray, out: np.ndarray | None = None, accumulate: bool = False) -> np.ndarray:
    """One token: x float32 [n_cols] -> W x, float32 [n_rows], written to (or added into) `out`."""
    if out is None:
        out = np.empty(pm.n_rows, np.float32)
        accumulate = False
    if pm.family in (U4, I8):
        kernel = gemv_vnni._gemv_vnni if VNNI_GEMV else _gemv
        kernel(pm.codes, pm.family == U4, *_scale_args(pm), pm.zero, x, out, accumulate)
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
    if pm.family in (U4, I8) and X.shape[0] > 1 and VNNI:
        _gemv_batch_vnni(pm.codes, pm.family == U4, *_scale_args(pm), pm.zero, pm.bs, X, out, accumulate)
    elif pm.family in (U4, I8) and X.shape[0] > 1:
        _gemv_batch(pm.codes, pm.family == U4, *_scale_args(pm), pm.zero, X, out, accumulate)
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
