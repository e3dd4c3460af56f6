"""Prefill products (many tokens) on AVX-512 VNNI hosts: an integer GEMM over U4/U5/U6/I8 tiles (vpdpwssd, LLVM IR).

Activations are quantized to int16 per weight block as for decode (blocks.py), and each block's sums are scaled
by the same epilogue (blocks._epilogue_ir), so prefill gives decode's bits (docs/kernels.md, "Batch invariance").
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .blocks import (PLANES, R, _epilogue_ir, _load_scales_scalar, _quantize_block, _scale_args, _splat_ir,
                     crumb_codes_ir, plane_quad_ir)
from .repack import KIND_I8, KIND_U2, KIND_U4, KIND_U5, KIND_U6, PackedMatrix

# Many tokens through tiled codes: an integer GEMM. Activations are quantized per weight block to int16 (as for
# decode: ~250x finer than ggml's int8 activations), codes minus their zero point are unpacked once per
# (tile, block) into int16 pairs, and a micro-kernel written in LLVM IR (vpdpwssd: AVX-512 VNNI, 32 int16
# products per instruction) keeps TOKENS_PER_CALL x TILE_ROWS int32 sums in 24 zmm registers, so each weight
# load serves 6 tokens; the block's float scaling is fused in before the sums leave the registers. LLVM's
# auto-vectorizer does not find this shape by itself (its version of the loop ran at 1/3 of BLAS sgemm).
# Measured on one 5632x2048 Q4_0 matrix x 128 tokens, 1 thread: ~133 GFLOP/s vs ~94-98 for widen + sgemm.
TOKENS_PER_CALL = 6
_VECS = R // 16


def _make_block_fma(n_pairs):
    @intrinsic
    def block_fma(typingctx, acc, ao, w, xp, xo, xstride, dv, mv, xd, xsum, so, sstride):
        """For i < TOKENS_PER_CALL, r < R: acc[ao + i*R + r] += dv[r] * xd[so + i*sstride] *
        sum_p dot2(w[p*R + r], xp[xo + i*xstride + p]) + mv[r] * xsum[so + i*sstride]
        (w, xp: int32 words holding two int16 each; the dot2 is vpdpwssd's pairwise product sum), rounded as
        _epilogue_ir: the bits _add_block gives the same sums in decode."""
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
            def c(n):
                return ir.Constant(i64, n)

            def vload(base, off, ty):
                return builder.load(builder.bitcast(builder.gep(base, [off]), ty.as_pointer()), typ=ty, align=4)

            sums = [[ir.Constant(vi, [0] * 16) for _ in range(_VECS)] for _ in range(TOKENS_PER_CALL)]
            for p in range(n_pairs):
                wv = [builder.bitcast(vload(wp, c(p * R + v * 16), vi), vh) for v in range(_VECS)]
                for i in range(TOKENS_PER_CALL):
                    off = builder.add(xo, builder.add(builder.mul(c(i), xs), c(p)))
                    xv = builder.bitcast(_splat_ir(builder, builder.load(builder.gep(xpp, [off])), vi), vh)
                    for v in range(_VECS):
                        sums[i][v] = builder.call(fn, [sums[i][v], wv[v], xv])
            dvv = [vload(dvp, c(v * 16), vf) for v in range(_VECS)]
            mvv = [vload(mvp, c(v * 16), vf) for v in range(_VECS)]
            for i in range(TOKENS_PER_CALL):
                soff = builder.add(so, builder.mul(c(i), ss))
                dx = _splat_ir(builder, builder.load(builder.gep(xdp, [soff])), vf)
                sx = _splat_ir(builder, builder.load(builder.gep(xsp, [soff])), vf)
                for v in range(_VECS):   # mv is 0 where the format has no offsets: fma(0, sx, acc) = acc
                    aoff = builder.add(ao, c(i * R + v * 16))
                    acc_v = _epilogue_ir(builder, vload(accp, aoff, vf), dvv[v], dx, builder.sitofp(sums[i][v], vf),
                                         mvv[v], sx)
                    builder.store(acc_v, builder.bitcast(builder.gep(accp, [aoff]), vf.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return block_fma


_block_fma_32 = _make_block_fma(16)   # 32-weight blocks: 16 pairs
_block_fma_16 = _make_block_fma(8)    # 16-weight blocks (Q6_K, Q3_K, Q2_K)


def _make_pairs(kind: int, n_quads: int):
    """An intrinsic writing one block's weights as the micro-kernel's int16 pairs: wp[p * R + r] = weights
    (2p, 2p + 1) of row r, zero point removed, in one int32 word. From repack.py's quads (flat codes[cbase:],
    one 64-byte vector = bytes 4g..4g+3 of 16 rows): bytes widened to int16 in place, so each row's 64 bits
    hold pairs 2g and 2g + 1, which one two-source dword permute per pair separates (U4: the low nibbles give
    pairs 2g, 2g + 1, the high nibbles 2n + 2g, 2n + 2g + 1 for n quads; U5 / U6: code vector k, rebuilt from
    the 5 / 3 quads as blocks.plane_codes_ir says, gives pairs 2k, 2k + 1; U2: the 2-bit fields k of its one quad,
    pairs 2k, 2k + 1). A numba loop over the quads' interleaved bytes did not vectorize (7x slower than over the
    byte rows of the layout before)."""
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    vb, vh, vi = ir.VectorType(i8, 64), ir.VectorType(i16, 32), ir.VectorType(i32, 16)

    @intrinsic
    def pairs(typingctx, wp, codes, cbase, zero):
        sig = types.void(wp, codes, types.intp, types.int32)

        def codegen(context, builder, signature, args):
            wpp = context.make_array(signature.args[0])(context, builder, args[0]).data
            cp = context.make_array(signature.args[1])(context, builder, args[1]).data
            z16 = builder.trunc(args[3], i16)
            zv = _splat_ir(builder, z16, vh)
            nib = ir.Constant(vb, [15] * 64)
            even = ir.Constant(ir.VectorType(i32, 16), list(range(0, 32, 2)))
            odd = ir.Constant(ir.VectorType(i32, 16), list(range(1, 32, 2)))

            def store(p, q, v):
                ptr = builder.gep(wpp, [ir.Constant(ir.IntType(64), p * R + 16 * q)])
                builder.store(v, builder.bitcast(ptr, vi.as_pointer()), align=4)

            def widen_half(v, half):   # bytes 32*half.. of v as int16 minus the zero point
                lanes = ir.Constant(ir.VectorType(i32, 32), list(range(32 * half, 32 * half + 32)))
                part = builder.shuffle_vector(v, ir.Constant(vb, ir.Undefined), lanes)
                return builder.bitcast(builder.sub(builder.zext(part, vh), zv), vi)

            def split(v, p0, q):       # pairs p0 and p0 + 1 of rows 16q..16q+15 from their 64 bytes
                a, b = widen_half(v, 0), widen_half(v, 1)
                store(p0, q, builder.shuffle_vector(a, b, even))
                store(p0 + 1, q, builder.shuffle_vector(a, b, odd))

            def load(g, q):
                off = builder.add(args[2], ir.Constant(ir.IntType(64), (g * R + 16 * q) * 4))
                return builder.load(builder.bitcast(builder.gep(cp, [off]), vb.as_pointer()), align=1)

            if kind in (KIND_U5, KIND_U6):
                bits = 5 if kind == KIND_U5 else 6
                n_codes, n = PLANES[bits]
                for q in range(R // 16):
                    w = [load(g, q) for g in range(n + 1)]
                    for k in range(n_codes // 4):
                        split(plane_quad_ir(builder, w, k, bits), 2 * k, q)
                return context.get_dummy_value()
            if kind == KIND_U2:
                for q in range(R // 16):
                    v = load(0, q)
                    for k in range(4):
                        split(crumb_codes_ir(builder, v, k), 2 * k, q)
                return context.get_dummy_value()
            for g in range(n_quads):
                for q in range(R // 16):
                    v = load(g, q)
                    if kind == KIND_U4:   # high nibbles: the block's second half, 2 * n_quads pairs on
                        split(builder.and_(v, nib), 2 * g, q)
                        high = builder.bitcast(builder.lshr(builder.bitcast(v, vi), ir.Constant(vi, [4] * 16)), vb)
                        split(builder.and_(high, nib), 2 * n_quads + 2 * g, q)
                    else:
                        split(v, 2 * g, q)
            return context.get_dummy_value()
        return sig, codegen
    return pairs


_pairs_u4_32, _pairs_u4_16 = _make_pairs(KIND_U4, 4), _make_pairs(KIND_U4, 2)
_pairs_u5, _pairs_u6, _pairs_u2 = _make_pairs(KIND_U5, 5), _make_pairs(KIND_U6, 3), _make_pairs(KIND_U2, 1)
_pairs_i8_32, _pairs_i8_16 = _make_pairs(KIND_I8, 8), _make_pairs(KIND_I8, 4)


@njit(fastmath=True, cache=True)
def _quantize_token_blocks(X, bs, xq, xd, xsum):
    """Rows of X -> int16 codes xq [nblk, Tp, bs] and per-block scales / sums xd, xsum [nblk, Tp]: block-major, so
    that the micro-kernel reads the Tp tokens of one block as one contiguous run (token-major, the rows K*2 bytes
    apart, 4 KiB for K = 2048, all fell into one L1 set: the products ran 10-20 % slower). Tokens past X's are
    zero, as are their scales and sums. Serial: microseconds per token next to the product's milliseconds."""
    T, K = X.shape
    nblk, Tp = xd.shape[0], xd.shape[1]
    xf, qf, df, sf = X.reshape(-1), xq.reshape(-1), xd.reshape(-1), xsum.reshape(-1)
    qsum = np.empty(nblk * Tp, np.int32)   # (the codes' sums: not used by the GEMM)
    for b in range(nblk):
        for i in range(Tp):
            so = b * Tp + i
            if i < T:
                _quantize_block(xf, i * K + b * bs, qf, so * bs, df, sf, qsum, so, bs)
            else:
                qf[so * bs:(so + 1) * bs] = 0
                df[so] = 0
                sf[so] = 0


@njit(parallel=True, fastmath=True, cache=True, nogil=True)
def _igemm(codes, kind, d, m, two_level, has_m, zero, xp, xd, xsum, Y):
    """Y[T, tiles*R] = X @ W.T for tiles of any code kind (repack.KIND_*); xp = X's int16 codes as pairs (int32 words)
    [nblk, Tp, bs/2], Tp a multiple of TOKENS_PER_CALL (padding tokens zero); xd, xsum [nblk, Tp]
    (_quantize_token_blocks)."""
    n_tiles, nblk, n_quads = codes.shape[0], codes.shape[1], codes.shape[2]
    n_pairs = (4 * n_quads if kind == KIND_U4 else 16 if kind == KIND_U5 else 8 if kind == KIND_U6 or kind == KIND_U2
               else 2 * n_quads)
    T, Tp, words = Y.shape[0], xp.shape[1], xp.shape[2]
    xflat, xdf, xsf = xp.reshape(-1), xd.reshape(-1), xsum.reshape(-1)
    z = np.int32(zero)
    flat = codes.reshape(-1)
    for t in prange(n_tiles):
        wp = np.empty(n_pairs * R, np.int32)
        acc = np.zeros(Tp * R, np.float32)
        dv = np.empty(R, np.float32)
        mv = np.zeros(R, np.float32)
        for b in range(nblk):
            cbase = (t * nblk + b) * n_quads * R * 4
            if kind == KIND_U4 and n_quads == 4:
                _pairs_u4_32(wp, flat, cbase, z)
            elif kind == KIND_U4:
                _pairs_u4_16(wp, flat, cbase, z)
            elif kind == KIND_U6:
                _pairs_u6(wp, flat, cbase, z)
            elif kind == KIND_U5:
                _pairs_u5(wp, flat, cbase, z)
            elif kind == KIND_U2:
                _pairs_u2(wp, flat, cbase, z)
            elif n_quads == 8:
                _pairs_i8_32(wp, flat, cbase, z)
            else:
                _pairs_i8_16(wp, flat, cbase, z)
            _load_scales_scalar(d, two_level, t, b, dv)   # (not _load_scales: see this one's doc)
            if has_m:
                _load_scales_scalar(m, two_level, t, b, mv)
            for i0 in range(0, Tp, TOKENS_PER_CALL):
                so = b * Tp + i0
                if n_pairs == 16:
                    _block_fma_32(acc, i0 * R, wp, xflat, so * words, words, dv, mv, xdf, xsf, so, 1)
                else:
                    _block_fma_16(acc, i0 * R, wp, xflat, so * words, words, dv, mv, xdf, xsf, so, 1)
        for i in range(T):
            for r in range(R):
                Y[i, t * R + r] = acc[i * R + r]


def _matmul_vnni(pm: PackedMatrix, X: np.ndarray) -> np.ndarray:
    """Prefill product through the VNNI integer GEMM (tiled families)."""
    T, K = X.shape
    bs = pm.bs
    Tp = -(-T // TOKENS_PER_CALL) * TOKENS_PER_CALL
    xq = np.empty((K // bs, Tp, bs), np.int16)
    xd = np.empty((K // bs, Tp), np.float32)
    xsum = np.empty((K // bs, Tp), np.float32)
    _quantize_token_blocks(X, bs, xq, xd, xsum)
    Y = np.empty((T, pm.codes.shape[0] * R), np.float32)
    _igemm(pm.codes, pm.code_kind, *_scale_args(pm), pm.zero, xq.view(np.int32), xd, xsum, Y)
    return Y[:, :pm.n_rows]
