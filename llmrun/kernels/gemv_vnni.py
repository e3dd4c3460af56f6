"""One-token products (decode) on AVX-512 VNNI hosts: u8 x s8 `vpdpbusd` on int16 activations, bit-exact.

The portable one-token kernel (gemv._gemv) widens every code byte to int32 and multiplies it
with an int16 activation: ~10 instructions per 64 products, bound by instruction count rather than memory.
`vpdpbusd` multiplies 4 unsigned bytes by 4 signed bytes and adds the four products to an int32 lane: 64
products per instruction, but on bytes. The int16 activation codes x (exactly blocks._quantize_activations')
are therefore split into two bytes, x = 256*xh + xl with xh = x >> 8 (signed) and xl = x & 255 (unsigned):

  U4 codes c in 0..15 (valid as u8 and as s8):  sum c*x = 256 * dpbusd(u8 c, s8 xh) + dpbusd(u8 xl, s8 c)
  I8 codes c in 0..255 (u8; c - 128 = c ^ 0x80 is an s8):
      sum c*x = 256 * dpbusd(u8 c, s8 xh) + dpbusd(u8 xl, s8 c ^ 0x80) + 128 * sum xl

Exact integers: each block's int32 sums are the same integers the portable kernels compute, and the same
float epilogue (blocks._add_block) finishes them, so every output is bit-identical to gemv.py's (tested).

The codes keep the tile layout of repack.py ([tile, block, byte, row]: one 64-byte load = byte j of 64 rows).
vpdpbusd wants 4 consecutive weights of one row in a 32-bit lane, so each group of 4 byte rows is transposed
in registers (8 byte/word unpacks per 4 loads); the sums come out with rows permuted inside 128-bit lanes and
are put back in order once per block. Measured against a layout stored that way (no unpacks): the same speed,
so the prefill kernels, dequantize_rows and the batched decode kernel keep their layout (docs/performance.md).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .blocks import PREFETCH_LINES, R, _add_block, _finish_tile, _prefetch, _quantize_activations

USABLE = R == 64   # the micro-kernels hold one tile's 64 rows in 4 zmm registers of 16 int32 lanes

_I8, _I32, _I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
_VB, _VI = ir.VectorType(_I8, 64), ir.VectorType(_I32, 16)


def _const(n):
    return ir.Constant(_I64, n)


def _splat(n):
    return ir.Constant(_VI, [n] * 16)


def _shuffle(builder, a, b, mask):
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, len(mask)), mask))


def _unpack(builder, a, b, bits, high):
    """vpunpck{l,h}{bw,wd}: inside each 128-bit lane, interleave the low (or high) halves' `bits`-wide
    elements of a and b."""
    n, per = 512 // bits, 128 // bits
    ty = ir.VectorType(ir.IntType(bits), n)
    a, b = builder.bitcast(a, ty), builder.bitcast(b, ty)
    mask = []
    for lane in range(4):
        base = lane * per + (per // 2 if high else 0)
        for i in range(per // 2):
            mask += [base + i, n + base + i]
    return builder.bitcast(_shuffle(builder, a, b, mask), _VB)


def _quads(builder, rows4):
    """Byte rows j..j+3 of 64 rows (4 x 64 bytes) -> 4 vectors whose int32 lanes hold bytes j..j+3 of one
    row; vector q, lane 4k + i = row 16k + 4q + i."""
    a_lo, a_hi = _unpack(builder, rows4[0], rows4[1], 8, False), _unpack(builder, rows4[0], rows4[1], 8, True)
    b_lo, b_hi = _unpack(builder, rows4[2], rows4[3], 8, False), _unpack(builder, rows4[2], rows4[3], 8, True)
    return [_unpack(builder, a_lo, b_lo, 16, False), _unpack(builder, a_lo, b_lo, 16, True),
            _unpack(builder, a_hi, b_hi, 16, False), _unpack(builder, a_hi, b_hi, 16, True)]


def _rows_in_order(builder, sums):
    """Inverse of _quads' row order: 4 x 16 int32 (vector q, lane 4k + i = row 16k + 4q + i) -> rows 0..63."""
    def lanes(order):   # 128-bit lanes of the concatenation of two vectors
        return [4 * lane + i for lane in order for i in range(4)]
    t01 = _shuffle(builder, sums[0], sums[1], lanes([0, 4, 1, 5]))
    t23 = _shuffle(builder, sums[2], sums[3], lanes([0, 4, 1, 5]))
    u01 = _shuffle(builder, sums[0], sums[1], lanes([2, 6, 3, 7]))
    u23 = _shuffle(builder, sums[2], sums[3], lanes([2, 6, 3, 7]))
    return [_shuffle(builder, t01, t23, lanes([0, 1, 4, 5])), _shuffle(builder, t01, t23, lanes([2, 3, 6, 7])),
            _shuffle(builder, u01, u23, lanes([0, 1, 4, 5])), _shuffle(builder, u01, u23, lanes([2, 3, 6, 7]))]


def _make_block_dots(nibbles: bool, n_rows: int):
    """An intrinsic s[r] = sum over one block of codes(row r) * x, r < 64, for the block at flat codes[cbase:]
    (n_rows byte rows of 64 lanes); xh / xl: the activations' high (s8) and low (u8) bytes as int32 words,
    the block's first at xo; xl_bias: 128 * the block's sum of xl (I8 only, see the module doc)."""
    groups = n_rows // 4

    @intrinsic
    def block_dots(typingctx, s, codes, cbase, xh, xl, xo, xl_bias):
        sig = types.void(s, codes, types.intp, xh, xl, types.intp, types.int32)

        def codegen(context, builder, signature, args):
            sp, cp, xhp, xlp = (context.make_array(signature.args[k])(context, builder, args[k]).data
                                for k in (0, 1, 3, 4))
            cbase_, xo_, bias = args[2], args[5], args[6]
            dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI, _VB, _VB]),
                                                    "llvm.x86.avx512.vpdpbusd.512")

            def byte_row(j):
                ptr = builder.bitcast(builder.gep(cp, [builder.add(cbase_, _const(j * R))]), _VB.as_pointer())
                return builder.load(ptr, typ=_VB, align=1)

            def broadcast(base, k):   # activation word k of the block in every lane
                word = builder.load(builder.gep(base, [builder.add(xo_, _const(k))]))
                u = ir.Constant(_VI, ir.Undefined)
                v = builder.shuffle_vector(builder.insert_element(u, word, ir.Constant(_I32, 0)), u,
                                           ir.Constant(_VI, [0] * 16))
                return builder.bitcast(v, _VB)

            hi_sums = [ir.Constant(_VI, [0] * 16) for _ in range(4)]   # sum c * xh
            lo_sums = [ir.Constant(_VI, [0] * 16) for _ in range(4)]   # sum c * xl (I8: minus 128 * sum xl)
            nib = builder.bitcast(_splat(0x0F0F0F0F), _VB)
            flip = builder.bitcast(_splat(-0x7F7F7F80), _VB)            # 0x80 in every byte
            for g in range(groups):
                w = _quads(builder, [byte_row(4 * g + i) for i in range(4)])
                if nibbles:   # low nibbles: weights 4g..4g+3 of the block, high nibbles: 16+4g..16+4g+3
                    parts = [(g, [builder.and_(v, nib) for v in w]),
                             (4 + g, [builder.and_(builder.bitcast(builder.lshr(builder.bitcast(v, _VI), _splat(4)),
                                                                   _VB), nib) for v in w])]
                else:
                    parts = [(g, w)]
                for k, codes_q in parts:
                    xh_k, xl_k = broadcast(xhp, k), broadcast(xlp, k)
                    for q in range(4):
                        signed = codes_q[q] if nibbles else builder.xor(codes_q[q], flip)
                        hi_sums[q] = builder.call(dpbusd, [hi_sums[q], codes_q[q], xh_k])
                        lo_sums[q] = builder.call(dpbusd, [lo_sums[q], xl_k, signed])
            bias_v = builder.shuffle_vector(
                builder.insert_element(ir.Constant(_VI, ir.Undefined), bias, ir.Constant(_I32, 0)),
                ir.Constant(_VI, ir.Undefined), ir.Constant(_VI, [0] * 16))
            sums = [builder.add(builder.add(builder.shl(hi_sums[q], _splat(8)), lo_sums[q]), bias_v)
                    for q in range(4)]
            for q, v in enumerate(_rows_in_order(builder, sums)):
                builder.store(v, builder.bitcast(builder.gep(sp, [_const(16 * q)]), _VI.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return block_dots


_u4_dots = _make_block_dots(True, 16)
_i8_dots32 = _make_block_dots(False, 32)
_i8_dots16 = _make_block_dots(False, 16)


@njit(fastmath=False)
def _split_activations(xq, bs, nibbles, xh, xl, xl_bias):
    """int16 codes -> high bytes xh (int8), low bytes xl (uint8); I8: 128 * each block's sum of xl."""
    for j in range(xq.shape[0]):
        v = np.int32(xq[j])
        xh[j] = np.int8(v >> 8)
        xl[j] = np.uint8(v & 255)
    for b in range(xl_bias.shape[0]):
        tot = np.int32(0)
        if not nibbles:
            for j in range(b * bs, (b + 1) * bs):
                tot += np.int32(xl[j])
        xl_bias[b] = 128 * tot


@njit(parallel=True, fastmath=True, cache=True)
def _gemv_vnni(codes, nibbles, d, m, two_level, has_m, zero, x, y, accumulate):
    """y[:n] (=|+=) W x for U4 (nibbles) or I8 tiles, bit-identical to gemv._gemv."""
    n_tiles, nblk, n_rows = codes.shape[0], codes.shape[1], codes.shape[2]
    bs = 32 if nibbles else n_rows
    K = x.shape[0]
    xq = np.empty(K, np.int16)
    xd = np.empty(nblk, np.float32)
    xsum = np.empty(nblk, np.float32)
    xqsum = np.empty(nblk, np.int32)
    _quantize_activations(x, bs, xq, xd, xsum, xqsum)
    xh8 = np.empty(K, np.int8)
    xl8 = np.empty(K, np.uint8)
    xl_bias = np.empty(nblk, np.int32)
    _split_activations(xq, bs, nibbles, xh8, xl8, xl_bias)
    xh, xl = xh8.view(np.int32), xl8.view(np.int32)
    words = bs // 4
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
            cbase = (t * nblk + b) * n_rows * R
            # clamped once per block (not per line: ~4 instructions each, a quarter of the block's work)
            ahead = min(cbase + PREFETCH_LINES * R, last - (n_rows - 1) * R)
            for j in range(n_rows):
                _prefetch(flat, ahead + j * R)
            if nibbles:
                _u4_dots(s, flat, cbase, xh, xl, b * words, xl_bias[b])
            elif n_rows == 32:
                _i8_dots32(s, flat, cbase, xh, xl, b * words, xl_bias[b])
            else:
                _i8_dots16(s, flat, cbase, xh, xl, b * words, xl_bias[b])
            _add_block(acc, s, t, b, d, m, two_level, has_m, zero, xd, xsum, xqsum, dbits, dv, mbits, mv)
        _finish_tile(acc, y, t, y.shape[0], accumulate)
