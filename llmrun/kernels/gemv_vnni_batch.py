"""Several decode tokens at once (continuous batching) on AVX-512 VNNI hosts: gemv_vnni.py's u8 x s8 identity,
each weight block read once for all the tokens.

One token (gemv_vnni.py) pays, per block, the loads (and for U4 the nibble split) and then the `vpdpbusd`
products; only the products depend on the token. Here every token's products read a block's code vectors (4
weights of one row per 32-bit lane) from L1: I8 quads where they are stored (repack.py), U4 codes after their
nibbles are split ONCE into a small scratch (2 KiB), U6 codes after they are rebuilt from their two planes once
into it (1 KiB), U2 codes after their 2-bit fields are split once into it (1 KiB):

  hi = sum dpbusd(u8 c, s8 xh)   then   s = (hi << 8) + sum dpbusd(u8 xl, s8 c') (+ 128 * sum xl for I8)

with c' = c (U2, U4, U5, U6) or c ^ 0x80 (I8), gemv_vnni.py's identity with the high byte's sums shifted before the low
byte's are added (int32 arithmetic wraps alike in any order: the same integers). So one accumulator per 16
rows and token (4 per token), and up to GROUP tokens share each code vector loaded from the scratch; T > GROUP
tokens loop over groups of GROUP within the block while it sits in L1. The integer block sums are the
one-token kernel's exactly, and the same float steps (`blocks._epilogue_ir`, as `blocks._add_block` runs them)
add them to the token rows inside the micro-kernel, while the sums are still in registers and with the block's
scales loaded once for the group (8-19 % faster for 4 tokens than storing the sums for `_add_block`'s loop,
2026-12-01): each token's row is bit-identical to `matvec` (tests/test_gemv_vnni_batch.py).
Measurements: docs/kernels.md.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .gemv_vnni import R, USABLE, _I32, _VB, _VF, _VI, _const, _split_activations, _splat
from .blocks import (BATCH_PREFETCH_LINES, PLANES, _block_size, _epilogue_ir, _finish_tile, _load_scales,
                     _quantize_activations, _splat_ir, crumb_codes_ir, plane_quad_ir)
from .repack import KIND_I8, KIND_U2, KIND_U4, KIND_U5, KIND_U6

__all__ = ["USABLE", "GROUP", "gemv_batch_vnni"]

GROUP = 4          # tokens per micro-kernel call: 4 x 4 accumulators + 4 broadcasts + 1 code vector in zmm
_LANE_BYTES = 64   # one zmm vector of codes: 16 rows x 4 weights
SCRATCH_BYTES = 32 * _LANE_BYTES + 63   # a U4 block's split nibbles, and room to align it


def _aligned(context, builder, ty, arr):
    """The scratch array's data pointer rounded up to a cache line (whole-vector loads and stores)."""
    p = builder.ptrtoint(context.make_array(ty)(context, builder, arr).data, ir.IntType(64))
    p = builder.and_(builder.add(p, _const(63)), _const(-64))
    return builder.inttoptr(p, ir.IntType(8).as_pointer())


def _make_stage(kind: int, nibble_quads: int = 4):
    """An intrinsic staging one U4, U5, U6 or U2 block (flat codes[cbase:], 16, 20, 12 or 4 bytes of R rows in
    repack.py's quads) in `scratch` as vectors (word k, quarter q) at byte (4k + q) * 64: int32 lane l holds
    weights 4k..4k+3 of row 16q + l. U4 (4 nibble quads a 32-weight block, 2 a 16-weight one): word k < n the low
    nibbles of bytes 4k..4k+3, word n + k their high nibbles; U2: word k the 2-bit fields k of its one quad;
    U5 / U6: the codes rebuilt from the nibbles and the high-bit plane (blocks.plane_codes_ir). Done once for all
    the tokens; I8 quads are already that operand and are read where they are."""
    @intrinsic
    def stage(typingctx, scratch, codes, cbase):
        sig = types.void(scratch, codes, types.intp)

        def codegen(context, builder, signature, args):
            dst = _aligned(context, builder, signature.args[0], args[0])
            cp = context.make_array(signature.args[1])(context, builder, args[1]).data
            nib = builder.bitcast(_splat(0x0F0F0F0F), _VB)

            def load(g, q):   # bytes 4g..4g+3 of rows 16q..16q+15
                ptr = builder.bitcast(builder.gep(cp, [builder.add(args[2], _const((g * R + 16 * q) * 4))]),
                                      _VB.as_pointer())
                return builder.load(ptr, typ=_VB, align=1)

            def store(k, q, v):
                out = builder.bitcast(builder.gep(dst, [_const((4 * k + q) * _LANE_BYTES)]), _VB.as_pointer())
                builder.store(v, out, align=64)

            for q in range(4):
                if kind == KIND_U2:   # its one quad's 2-bit fields: code words 0..3
                    v = load(0, q)
                    for k in range(4):
                        store(k, q, crumb_codes_ir(builder, v, k))
                    continue
                if kind in (KIND_U5, KIND_U6):
                    bits = 5 if kind == KIND_U5 else 6
                    n_codes, n = PLANES[bits]
                    w = [load(g, q) for g in range(n + 1)]
                    for k in range(n_codes // 4):
                        store(k, q, plane_quad_ir(builder, w, k, bits))
                    continue
                for g in range(nibble_quads):
                    v = load(g, q)
                    high = builder.bitcast(builder.lshr(builder.bitcast(v, _VI), _splat(4)), _VB)
                    store(g, q, builder.and_(v, nib))
                    store(nibble_quads + g, q, builder.and_(high, nib))
            return context.get_dummy_value()
        return sig, codegen
    return stage


_stage_u4_32, _stage_u4_16 = _make_stage(KIND_U4), _make_stage(KIND_U4, 2)
_stage_u5, _stage_u6, _stage_u2 = _make_stage(KIND_U5), _make_stage(KIND_U6), _make_stage(KIND_U2)


def _make_block_dots(staged: bool, words: int, n_rows: int):
    """An intrinsic adding one block to the float rows of tokens i0..i0+n_tok-1 (n_tok 1..GROUP, one unrolled body
    for each): the integer sums s_i[r] = sum over
    the block of codes(row r) * x_i, from the block's code vectors (staged: U4 / U5 / U6 codes in `scratch` by _stage_u4
    / _stage_u5 / _stage_u6; else I8, the quads at codes[cbase:] themselves), then acc[(i0 + i) * R + r] = the epilogue
    (blocks._epilogue_ir) of s_i[r] with the block's scales dv / offsets mv [R] and token i's dx = xd[bo + i],
    sum(x) = xs[bo + i]: the sums never leave the registers, and the scales are loaded once for all the tokens.
    xh / xl: the activations' high (s8) and low (u8) bytes as int32 words, token i's block word k at
    xo + i*words + k (block-major: constant offsets from one base); bias[bo + i]: what turns the sums into
    the block's dot minus its zero-point term (128 * sum of xl for I8, minus zero * sum of xq; exact in int32).
    Without offsets (has_m False) mv and xs are zeros: fma(0, 0, a) = a, as acc is never -0. The n_rows cache
    lines of codes from codes[ahead] on (a later block) are prefetched a few at a time between the products,
    so that the requests to memory are spread over the block's work instead of one burst."""

    @intrinsic
    def block_dots(typingctx, acc, i0, scratch, xh, xl, xo, bias, bo, codes, ahead, dv, mv, xd, xs, cbase, n_tok):
        sig = types.void(acc, types.intp, scratch, xh, xl, types.intp, bias, types.intp, codes, types.intp, dv, mv,
                         xd, xs, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            ap, xhp, xlp, bp, dvp, mvp, xdp, xsp = (
                context.make_array(signature.args[k])(context, builder, args[k]).data for k in (0, 3, 4, 6, 10, 11,
                                                                                                 12, 13))
            if staged:   # the staged codes (split nibbles or rebuilt 6-bit codes)
                cp, align = _aligned(context, builder, signature.args[2], args[2]), 64
            else:         # I8: the quads as stored
                cp = builder.gep(context.make_array(signature.args[8])(context, builder, args[8]).data, [args[14]])
                align = 1
            xh0, xl0, b0 = builder.gep(xhp, [args[5]]), builder.gep(xlp, [args[5]]), builder.gep(bp, [args[7]])
            xd0, xs0 = builder.gep(xdp, [args[7]]), builder.gep(xsp, [args[7]])
            a0 = builder.gep(ap, [builder.mul(args[1], _const(R))])
            dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI, _VB, _VB]),
                                                    "llvm.x86.avx512.vpdpbusd.512")
            pf_fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), [ir.PointerType(), _I32, _I32, _I32]),
                "llvm.prefetch.p0")
            pf0 = builder.gep(context.make_array(signature.args[8])(context, builder, args[8]).data, [args[9]])
            steps = 2 * words

            def prefetch(step):   # the step-th of `steps` shares of the n_rows lines of the later block
                for j in range(step * n_rows // steps, (step + 1) * n_rows // steps):
                    ptr = builder.bitcast(builder.gep(pf0, [_const(j * R)]), ir.PointerType())
                    # locality 2: prefetcht1, into L2 (blocks.BATCH_PREFETCH_LINES)
                    builder.call(pf_fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])

            flip = builder.bitcast(_splat(-0x7F7F7F80), _VB)   # 0x80 in every byte

            def code(k, q):
                ptr = builder.bitcast(builder.gep(cp, [_const((4 * k + q) * _LANE_BYTES)]), _VB.as_pointer())
                return builder.load(ptr, typ=_VB, align=align)

            def broadcast(base, n, vty=_VI):   # element base[n] in every lane
                return _splat_ir(builder, builder.load(builder.gep(base, [_const(n)])), vty)

            def rows(base, q, vty):   # 16 consecutive floats at base + 16q
                return builder.bitcast(builder.gep(base, [_const(16 * q)]), vty.as_pointer())

            def emit(n_tok):   # the micro-kernel for n_tok tokens, unrolled
                acc = [[ir.Constant(_VI, [0] * 16) for _ in range(4)] for _ in range(n_tok)]
                for k in range(words):       # the high bytes: codes unsigned, xh signed
                    prefetch(k)
                    xk = [builder.bitcast(broadcast(xh0, i * words + k), _VB) for i in range(n_tok)]
                    for q in range(4):
                        c = code(k, q)
                        for i in range(n_tok):
                            acc[i][q] = builder.call(dpbusd, [acc[i][q], c, xk[i]])
                acc = [[builder.shl(a, _splat(8)) for a in row] for row in acc]
                # a compiler barrier: else LLVM merges the two passes' loads of each code vector and keeps all of
                # them live across the block (spilled to the stack) instead of reloading them from L1
                builder.call(ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "", "~{memory}", side_effect=True), [])
                for k in range(words):       # the low bytes: xl unsigned, codes signed
                    prefetch(words + k)
                    xk = [builder.bitcast(broadcast(xl0, i * words + k), _VB) for i in range(n_tok)]
                    for q in range(4):
                        c = code(k, q) if staged else builder.xor(code(k, q), flip)
                        for i in range(n_tok):
                            acc[i][q] = builder.call(dpbusd, [acc[i][q], xk[i], c])
                dvs = [builder.load(rows(dvp, q, _VF), align=4) for q in range(4)]
                mvs = [builder.load(rows(mvp, q, _VF), align=4) for q in range(4)]
                for i in range(n_tok):
                    bias_i = broadcast(b0, i)
                    dx, sx = broadcast(xd0, i, _VF), broadcast(xs0, i, _VF)
                    row = builder.gep(a0, [_const(i * R)])
                    for q in range(4):
                        f = builder.sitofp(builder.add(acc[i][q], bias_i), _VF)
                        ptr = rows(row, q, _VF)
                        out = _epilogue_ir(builder, builder.load(ptr, align=4), dvs[q], dx, f, mvs[q], sx)
                        builder.store(out, ptr, align=4)
            # one unrolled body per token count, chosen by a switch on the runtime n_tok (1..GROUP)
            done = builder.append_basic_block("tokens_done")
            bodies = [builder.append_basic_block(f"tokens_{n}") for n in range(1, GROUP + 1)]
            sw = builder.switch(args[15], bodies[-1])
            for n, block in enumerate(bodies, 1):
                sw.add_case(ir.Constant(args[15].type, n), block)
                builder.position_at_end(block)
                emit(n)
                builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()
        return sig, codegen
    return block_dots


_u4 = _make_block_dots(True, 8, 16)
_u5 = _make_block_dots(True, 8, 20)
_u6 = _make_block_dots(True, 4, 12)
_u2 = _make_block_dots(True, 4, 4)
_i8_32 = _make_block_dots(False, 8, 32)
_i8_16 = _make_block_dots(False, 4, 16)


@njit(inline="always")
def _dots(acc, i0, scratch, xh, xl, xo, bias, bo, flat, ahead, dv, mv, xd, xs, cbase, kind, n_rows, g):
    """The micro-kernel for this code kind and block shape, for g (1..GROUP) tokens (numba wants each intrinsic
    named). Staged 16-weight blocks (U6; U4's, Q3_K) share one micro-kernel: 4 code words, the n_rows only shaping
    its prefetches of later lines; U2 (Q2_K) has its own, prefetching its 4 lines a block instead of 12."""
    if kind == KIND_U4 and n_rows == 16:
        _u4(acc, i0, scratch, xh, xl, xo, bias, bo, flat, ahead, dv, mv, xd, xs, cbase, g)
    elif kind == KIND_U5:
        _u5(acc, i0, scratch, xh, xl, xo, bias, bo, flat, ahead, dv, mv, xd, xs, cbase, g)
    elif kind == KIND_U2:
        _u2(acc, i0, scratch, xh, xl, xo, bias, bo, flat, ahead, dv, mv, xd, xs, cbase, g)
    elif kind == KIND_U6 or kind == KIND_U4:
        _u6(acc, i0, scratch, xh, xl, xo, bias, bo, flat, ahead, dv, mv, xd, xs, cbase, g)
    elif n_rows == 32:
        _i8_32(acc, i0, scratch, xh, xl, xo, bias, bo, flat, ahead, dv, mv, xd, xs, cbase, g)
    else:
        _i8_16(acc, i0, scratch, xh, xl, xo, bias, bo, flat, ahead, dv, mv, xd, xs, cbase, g)


@njit(parallel=True, fastmath=True, cache=True)
def gemv_batch_vnni(codes, kind, d, m, two_level, has_m, zero, X, Y, accumulate):
    """Y[i, :n] (=|+=) W X[i] for tiles of any code kind (repack.KIND_*), each row bit-identical to
    gemv_vnni._gemv_vnni."""
    n_tok, K = X.shape[0], X.shape[1]
    n_tiles, nblk, n_rows = codes.shape[0], codes.shape[1], 4 * codes.shape[2]   # n_rows bytes of R rows a block
    bs = _block_size(kind, n_rows)
    xq = np.empty(K, np.int16)
    xd = np.empty(nblk, np.float32)
    xsum = np.empty(nblk, np.float32)
    xqsum = np.empty(nblk, np.int32)
    xh1, xl1, bias1 = np.empty(K, np.int8), np.empty(K, np.uint8), np.empty(nblk, np.int32)
    # block-major [block, token, ...], so that a block's values of a token group are at constant offsets
    xh8 = np.empty((nblk, n_tok, bs), np.int8)
    xl8 = np.empty((nblk, n_tok, bs), np.uint8)
    xl_bias = np.empty((nblk, n_tok), np.int32)
    xd_b = np.empty((nblk, n_tok), np.float32)
    xs_b = np.zeros((nblk, n_tok), np.float32)   # zeros without offsets (see _make_block_dots)
    for i in range(n_tok):   # here, not in a parallel region of its own: a launch costs more than this
        _quantize_activations(X[i], bs, xq, xd, xsum, xqsum)
        _split_activations(xq, bs, kind == KIND_I8, xh1, xl1, bias1)
        for b in range(nblk):
            xh8[b, i] = xh1[b * bs:(b + 1) * bs]
            xl8[b, i] = xl1[b * bs:(b + 1) * bs]
            xl_bias[b, i] = np.int32(bias1[b] - zero * xqsum[b])   # exact: |.| < 2**28 (blocks._int_diff_f32)
            xd_b[b, i] = xd[b]
            if has_m:
                xs_b[b, i] = xsum[b]
    xh, xl = xh8.reshape(-1).view(np.int32), xl8.reshape(-1).view(np.int32)
    bias, xdf, xsf = xl_bias.reshape(-1), xd_b.reshape(-1), xs_b.reshape(-1)
    words = bs // 4
    flat = codes.reshape(-1)
    last = flat.shape[0] - 1
    for t in prange(n_tiles):
        acc = np.zeros((n_tok, R), np.float32)
        scratch = np.empty(SCRATCH_BYTES, np.uint8)
        dv = np.empty(R, np.float32)
        mv = np.zeros(R, np.float32)   # zeros without offsets
        for b in range(nblk):
            cbase = (t * nblk + b) * n_rows * R
            ahead = min(cbase + BATCH_PREFETCH_LINES * R, last - (n_rows - 1) * R)
            if kind == KIND_U4 and n_rows == 16:   # (I8 quads are read where they are)
                _stage_u4_32(scratch, flat, cbase)
            elif kind == KIND_U4:
                _stage_u4_16(scratch, flat, cbase)
            elif kind == KIND_U6:
                _stage_u6(scratch, flat, cbase)
            elif kind == KIND_U5:
                _stage_u5(scratch, flat, cbase)
            elif kind == KIND_U2:
                _stage_u2(scratch, flat, cbase)
            _load_scales(d, two_level, t, b, dv)   # once for all the tokens
            if has_m:
                _load_scales(m, two_level, t, b, mv)
            for i0 in range(0, n_tok, GROUP):
                g = min(GROUP, n_tok - i0)
                _dots(acc, i0, scratch, xh, xl, (b * n_tok + i0) * words, bias, b * n_tok + i0, flat, ahead, dv, mv,
                      xdf, xsf, cbase, kind, n_rows, g)
        for i in range(n_tok):
            _finish_tile(acc[i], Y[i], t, Y.shape[1], accumulate)
