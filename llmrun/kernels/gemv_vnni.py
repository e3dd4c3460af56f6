"""One-token products (decode) on AVX-512 VNNI hosts: u8 x s8 `vpdpbusd` on int16 activations, bit-exact.

The portable one-token kernel (gemv._gemv) widens every code byte to int32 and multiplies it
with an int16 activation: ~10 instructions per 64 products, bound by instruction count rather than memory.
`vpdpbusd` multiplies 4 unsigned bytes by 4 signed bytes and adds the four products to an int32 lane: 64
products per instruction, but on bytes. The int16 activation codes x (exactly blocks._quantize_activations')
are therefore split into two bytes, x = 256*xh + xl with xh = x >> 8 (signed) and xl = x & 255 (unsigned):

  U2, U4, U5 and U6 codes c in 0..3, 0..15, 0..31, 0..63 (valid as u8 and as s8):
      sum c*x = 256 * dpbusd(u8 c, s8 xh) + dpbusd(u8 xl, s8 c)
  I8 codes c in 0..255 (u8; c - 128 = c ^ 0x80 is an s8):
      sum c*x = 256 * dpbusd(u8 c, s8 xh) + dpbusd(u8 xl, s8 c ^ 0x80) + 128 * sum xl

Exact integers: each block's int32 sums are the same integers the portable kernels compute, and the same
float epilogue (blocks._epilogue_ir, as blocks._add_block runs it) adds them to the tile's rows inside the
micro-kernel, so every output is bit-identical to gemv.py's (tested).

The codes are in repack.py's quads: one 64-byte load is bytes 4k..4k+3 of 16 rows, exactly vpdpbusd's operand
(U4: after a nibble mask; U2: a shift and a mask, blocks.crumb_codes_ir; U5 / U6: rebuilt from the nibbles and
the high-bit plane, blocks.plane_codes_ir).
(Byte rows, one byte of 64 rows per load, needed 8 byte/word unpacks per 4 loads and a reordering of the sums
per block: docs/kernels.md, "Scales in registers, codes in quads".)
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .blocks import (DECODE_PREFETCH_LINES, PLANES, R, _block_size, _epilogue_ir, _finish_tile, _load_scales,
                     _prefetch_l2, _prefetch_scales, _quantize_activations, _scale_lines, _splat_ir, crumb_codes_ir,
                     plane_codes_ir)
from .repack import KIND_I8, KIND_U2, KIND_U4, KIND_U5, KIND_U6

USABLE = R == 64   # the micro-kernels hold one tile's 64 rows in 4 zmm registers of 16 int32 lanes

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_VB, _VI, _VF = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16), ir.VectorType(ir.FloatType(), 16)


def _const(n):
    return ir.Constant(_I64, n)


def _splat(n):
    return ir.Constant(_VI, [n] * 16)


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(mask)), mask))


def _make_block_dots(kind: int, n_rows: int):
    """An intrinsic adding one block of code kind `kind` (repack.KIND_*) to a tile's 64 float rows: the integer
    sums s[r] = sum over the block of codes(row r) * x for the block at flat codes[cbase:] (n_rows bytes of 64
    rows, in quads), then
    acc[r] = the epilogue (blocks._epilogue_ir) of s[r] - zero * sum(xq) with the block's scales dv / offsets mv
    [R], dx = the activations' block scale and sx = their block sum: the sums never leave the registers.
    xh / xl: the activations' high (s8) and low (u8) bytes as int32 words, the block's first at xo; bias: what
    turns the dpbusd sums into the block's dot minus its zero-point term (128 * the block's sum of xl for I8,
    minus zero * sum(xq); exact in int32). Without offsets mv and sx are zeros: fma(0, 0, a) = a, as acc is never
    -0, so the bits are blocks._add_block's either way."""
    groups = n_rows // 4
    flip = kind == KIND_I8   # I8 codes go through c ^ 0x80 (module doc); U4 / U5 / U6 codes are valid s8

    @intrinsic
    def block_dots(typingctx, acc, codes, cbase, xh, xl, xo, bias, dv, mv, dx, sx):
        sig = types.void(acc, codes, types.intp, xh, xl, types.intp, types.int32, dv, mv, types.float32,
                         types.float32)

        def codegen(context, builder, signature, args):
            ap, cp, xhp, xlp, dvp, mvp = (context.make_array(signature.args[k])(context, builder, args[k]).data
                                          for k in (0, 1, 3, 4, 7, 8))
            cbase_, xo_, bias, dx, sx = args[2], args[5], args[6], args[9], args[10]
            dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI, _VB, _VB]),
                                                    "llvm.x86.avx512.vpdpbusd.512")

            def quad(g, q):   # bytes 4g..4g+3 of rows 16q..16q+15 (repack.py's quads)
                ptr = builder.bitcast(builder.gep(cp, [builder.add(cbase_, _const((g * R + 16 * q) * 4))]),
                                      _VB.as_pointer())
                return builder.load(ptr, typ=_VB, align=1)

            def broadcast(base, k):   # activation word k of the block in every lane
                word = builder.load(builder.gep(base, [builder.add(xo_, _const(k))]))
                return builder.bitcast(_splat_ir(builder, word, _VI), _VB)

            hi_sums = [ir.Constant(_VI, [0] * 16) for _ in range(4)]   # sum c * xh
            lo_sums = [ir.Constant(_VI, [0] * 16) for _ in range(4)]   # sum c * xl (I8: minus 128 * sum xl)
            nib = builder.bitcast(_splat(0x0F0F0F0F), _VB)
            x80 = builder.bitcast(_splat(-0x7F7F7F80), _VB)            # 0x80 in every byte

            def code_vectors():   # (activation word k, code vectors of weights 4k..4k+3 of rows 16q.., q < 4)
                if kind in (KIND_U5, KIND_U6):   # rebuilt from the nibble quads and the plane's (blocks.PLANES)
                    bits = 5 if kind == KIND_U5 else 6
                    n_codes, n = PLANES[bits]
                    planes = [quad(n, q) for q in range(4)]
                    for g in range(n):   # nibble quad g: its low nibbles are code vector g, its high ones g + n
                        w = [quad(g, q) for q in range(4)]
                        for k in range(g, n_codes // 4, n):
                            yield k, [plane_codes_ir(builder, w[q], planes[q], k >= n, k, bits) for q in range(4)]
                    return
                if kind == KIND_U2:   # one quad: its 2-bit fields k are code vectors k
                    w = [quad(0, q) for q in range(4)]
                    for k in range(4):
                        yield k, [crumb_codes_ir(builder, v, k) for v in w]
                    return
                for g in range(groups):
                    w = [quad(g, q) for q in range(4)]
                    if kind == KIND_U4:   # low nibbles: weights 4g..4g+3, high: the block's second half's
                        yield g, [builder.and_(v, nib) for v in w]
                        yield groups + g, [builder.and_(builder.bitcast(builder.lshr(builder.bitcast(v, _VI), _splat(4)),
                                                                   _VB), nib) for v in w]
                    else:
                        yield g, w

            for k, codes_q in code_vectors():
                xh_k, xl_k = broadcast(xhp, k), broadcast(xlp, k)
                for q in range(4):
                    signed = builder.xor(codes_q[q], x80) if flip else codes_q[q]
                    hi_sums[q] = builder.call(dpbusd, [hi_sums[q], codes_q[q], xh_k])
                    lo_sums[q] = builder.call(dpbusd, [lo_sums[q], xl_k, signed])
            bias_v = _splat_ir(builder, bias, _VI)
            sums = [builder.add(builder.add(builder.shl(hi_sums[q], _splat(8)), lo_sums[q]), bias_v)
                    for q in range(4)]
            dx_v, sx_v = _splat_ir(builder, dx, _VF), _splat_ir(builder, sx, _VF)
            for q, v in enumerate(sums):
                def rows(base):   # rows 16q..16q+15 of a float array
                    return builder.bitcast(builder.gep(base, [_const(16 * q)]), _VF.as_pointer())
                f = builder.sitofp(v, _VF)
                dvq, mvq = builder.load(rows(dvp), align=4), builder.load(rows(mvp), align=4)
                out = _epilogue_ir(builder, builder.load(rows(ap), align=4), dvq, dx_v, f, mvq, sx_v)
                builder.store(out, rows(ap), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return block_dots


_u4_dots32 = _make_block_dots(KIND_U4, 16)
_u4_dots16 = _make_block_dots(KIND_U4, 8)
_u5_dots = _make_block_dots(KIND_U5, 20)
_u6_dots = _make_block_dots(KIND_U6, 12)
_u2_dots = _make_block_dots(KIND_U2, 4)
_i8_dots32 = _make_block_dots(KIND_I8, 32)
_i8_dots16 = _make_block_dots(KIND_I8, 16)


@njit(fastmath=False)
def _split_activations(xq, bs, flip, xh, xl, xl_bias):
    """int16 codes -> high bytes xh (int8), low bytes xl (uint8); flip (I8 codes): 128 * each block's sum of xl,
    else 0."""
    for j in range(xq.shape[0]):
        v = np.int32(xq[j])
        xh[j] = np.int8(v >> 8)
        xl[j] = np.uint8(v & 255)
    for b in range(xl_bias.shape[0]):
        tot = np.int32(0)
        if flip:
            for j in range(b * bs, (b + 1) * bs):
                tot += np.int32(xl[j])
        xl_bias[b] = 128 * tot


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_vnni(codes, kind, d, m, two_level, has_m, zero, x, y, accumulate):
    """y[:n] (=|+=) W x for tiles of any code kind (repack.KIND_*), bit-identical to gemv._gemv."""
    n_tiles, nblk, n_rows = codes.shape[0], codes.shape[1], 4 * codes.shape[2]   # n_rows bytes of R rows a block
    bs = _block_size(kind, n_rows)
    K = x.shape[0]
    xq = np.empty(K, np.int16)
    xd = np.empty(nblk, np.float32)
    xsum = np.empty(nblk, np.float32)
    xqsum = np.empty(nblk, np.int32)
    _quantize_activations(x, bs, xq, xd, xsum, xqsum)
    xh8 = np.empty(K, np.int8)
    xl8 = np.empty(K, np.uint8)
    xl_bias = np.empty(nblk, np.int32)
    _split_activations(xq, bs, kind == KIND_I8, xh8, xl8, xl_bias)
    xh, xl = xh8.view(np.int32), xl8.view(np.int32)
    bias = np.empty(nblk, np.int32)
    xs = np.zeros(nblk, np.float32)   # zeros without offsets (see _make_block_dots)
    for b in range(nblk):
        bias[b] = np.int32(xl_bias[b] - zero * xqsum[b])   # exact: |.| < 2**28 (blocks._int_diff_f32)
        if has_m:
            xs[b] = xsum[b]
    words = bs // 4
    flat = codes.reshape(-1)
    last = flat.shape[0] - 1
    d_lines, m_lines = _scale_lines(d, two_level), _scale_lines(m, two_level)
    group = nblk // d[1].shape[1] if two_level else 1
    for t in prange(n_tiles):
        acc = np.zeros(R, np.float32)
        dv = np.empty(R, np.float32)
        mv = np.zeros(R, np.float32)   # zeros without offsets
        for b in range(nblk):
            cbase = (t * nblk + b) * n_rows * R
            # clamped once per block (not per line: ~4 instructions each, a quarter of the block's work)
            ahead = min(cbase + DECODE_PREFETCH_LINES * R, last - (n_rows - 1) * R)
            for j in range(n_rows):
                _prefetch_l2(flat, ahead + j * R)
            _prefetch_scales(d_lines, two_level, t, b, nblk, group)
            _load_scales(d, two_level, t, b, dv)
            if has_m:
                _prefetch_scales(m_lines, two_level, t, b, nblk, group)
                _load_scales(m, two_level, t, b, mv)
            if kind == KIND_U4 and n_rows == 16:
                _u4_dots32(acc, flat, cbase, xh, xl, b * words, bias[b], dv, mv, xd[b], xs[b])
            elif kind == KIND_U4:
                _u4_dots16(acc, flat, cbase, xh, xl, b * words, bias[b], dv, mv, xd[b], xs[b])
            elif kind == KIND_U6:
                _u6_dots(acc, flat, cbase, xh, xl, b * words, bias[b], dv, mv, xd[b], xs[b])
            elif kind == KIND_U5:
                _u5_dots(acc, flat, cbase, xh, xl, b * words, bias[b], dv, mv, xd[b], xs[b])
            elif kind == KIND_U2:
                _u2_dots(acc, flat, cbase, xh, xl, b * words, bias[b], dv, mv, xd[b], xs[b])
            elif n_rows == 32:
                _i8_dots32(acc, flat, cbase, xh, xl, b * words, bias[b], dv, mv, xd[b], xs[b])
            else:
                _i8_dots16(acc, flat, cbase, xh, xl, b * words, bias[b], dv, mv, xd[b], xs[b])
        _finish_tile(acc, y, t, y.shape[0], accumulate)
