"""What every U4/U5/U6/I8 product kernel shares: the block scales, the activations' int16 quantization, the epilogue,
the staging of codes (quads to byte rows, U5's and U6's planes and U2's 2-bit fields to codes).

The product kernels (gemv.py, gemv_vnni.py, gemm_vnni.py, gemm_blas.py, qmatmul.py's batched decode) differ in
how they form a block's integer dot products; what they read besides the codes and how a block's sums become
floats is defined once, here, so that decode and prefill give the same bits (docs/kernels.md, "Batch invariance").
Numba's on-disk cache of every kernel is keyed by all the kernel sources together (runtime.py), so a change to a
helper here recompiles the kernels of the other files that inline it.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .repack import KIND_U2, KIND_U4, KIND_U5, KIND_U6, TILE_ROWS, PackedMatrix
from .strict import fma_ir

R = TILE_ROWS
F16_TO_F32 = np.float32(2.0 ** 112)  # rebias a half's exponent after shifting its bits into float32's place


# ------------------------------------------------------------------------------------------ prefetch
# Decode streams every weight from DRAM once per token. The hardware prefetcher alone left the gemv loops at
# ~9 GB/s/core on the Xeon VMs; software prefetches PREFETCH_LINES cache lines ahead of the line being
# read gave +40 % on a plain streaming loop (9.3 -> 13.2 GB/s at 1 thread, 16.6 -> 22.7 at 2).
PREFETCH_LINES = 32
# The one-token VNNI kernel (gemv_vnni.py) reads a block's codes in a few dozen cycles, so it wants them from
# further ahead, and into L2 only (prefetcht1; prefetcht0 at that distance gained nothing): 128 lines ahead made
# whole-model decode products 0.74-0.92x the time at 1 and 2 threads on Q4_0, Q4_1, Q8_0 and Q4_K_M models
# (same-process A/B, the EPYC VM, 2026-12-02).
DECODE_PREFETCH_LINES = 128
# The batched decode kernel (gemv_vnni_batch.py, 2-8 tokens a block) likewise wants its lines in L2 (prefetcht1)
# rather than L1, from half that distance: against 32 lines into L1, whole steps of 2 rows took 0.74-0.95x the
# time (SmolLM2 Q4_1, TinyLlama-shaped Q4_0, 2 threads), steps of 4 rows 0.92-1.08x (2026-12-03, a loaded host).
BATCH_PREFETCH_LINES = 64


def _make_prefetch(locality: int):
    """An intrinsic prefetching the cache line that holds element idx of a 1-D array (llvm.prefetch, read;
    locality 3: into every cache level, 2: into L2 and beyond). A prefetch never faults, but callers still stay
    inside the array."""
    @intrinsic
    def prefetch(typingctx, arr, idx):
        sig = types.void(arr, types.intp)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.PointerType())
            i32 = ir.IntType(32)
            fnty = ir.FunctionType(ir.VoidType(), [ir.PointerType(), i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
            builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, locality), ir.Constant(i32, 1)])
            return context.get_dummy_value()
        return sig, codegen
    return prefetch


_prefetch = _make_prefetch(3)
_prefetch_l2 = _make_prefetch(2)


# ---------------------------------------------------------------------------------------- code rows
@intrinsic
def _quad_rows(typingctx, rows, flat, off, j0):
    """Byte row j0 + i of `rows` (uint8 [.., 32, R], repack.py's byte rows) = byte i of each row of the quad at
    flat[off:off + 4R] (repack.py's quads), i < 4: the byte rows the portable kernels' loops vectorize over. A
    stride-4 shuffle of generic LLVM vectors, lowered for any ISA; the same loops reading the quads' interleaved
    bytes directly did not vectorize (4-8x slower)."""
    sig = types.void(rows, flat, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        rp = context.make_array(signature.args[0])(context, builder, args[0]).data
        fp = context.make_array(signature.args[1])(context, builder, args[1]).data
        i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
        quad = ir.VectorType(i8, 4 * R)
        v = builder.load(builder.bitcast(builder.gep(fp, [args[2]]), quad.as_pointer()), align=1)
        for i in range(4):
            row = builder.shuffle_vector(v, ir.Constant(quad, ir.Undefined),
                                         ir.Constant(ir.VectorType(i32, R), [4 * r + i for r in range(R)]))
            dst = builder.gep(rp, [builder.mul(builder.add(args[3], ir.Constant(i64, i)), ir.Constant(i64, R))])
            builder.store(row, builder.bitcast(dst, row.type.as_pointer()), align=1)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always")
def _byte_rows(codes):
    """Codes [tiles, nblk, n, R, E] as [tiles, nblk, n * E, R]: the byte rows themselves when E = 1 (repack.py;
    for quads the result is not read). Indexing the 5-D array left the row stride E a runtime value, and the
    portable loops over the rows ran 8-19 % slower on an AVX2 target."""
    return codes.reshape(codes.shape[0], codes.shape[1], codes.shape[2] * codes.shape[4], codes.shape[3])


@njit(inline="always")
def _code_rows(rows, codes, t, b):
    """rows (uint8 [.., 32, R], its first 32 rows) = the byte rows of block b of tile t, from codes in repack.py's
    quads."""
    n_quads = codes.shape[2]
    flat = codes.reshape(-1)
    base = (t * codes.shape[1] + b) * n_quads * 4 * R
    for g in range(n_quads):
        _quad_rows(rows, flat, base + g * 4 * R, 4 * g)


# ---------------------------------------------------------------------------------------- codes in planes
# U5 and U6 (repack.py) hold a block's codes as nibbles plus a plane of their high bits (1 or 2 per code):
# (codes per block, nibble quads) of each.
PLANES = {5: (32, 4), 6: (16, 2)}


def plane_codes_ir(builder, nib, plane, high, k, bits):
    """One vector of U5 / U6 codes (`bits` = 5 or 6, repack.py): the low or `high` nibbles of the byte vector `nib`,
    with the high bits taken from bits (bits - 4) k.. of each byte of `plane`. Shifts are of 32-bit lanes (any byte
    vector of a multiple of 4 bytes: x86 has no byte shifts), exact per byte because each is masked to bits that
    did not cross a byte. In quads (16 rows x 4 bytes a vector) code vector k (codes 4k..4k+3) is nibble quad
    k % n, high = k >= n, plane = quad n (n nibble quads: PLANES); in byte rows (one byte of R rows) code j is
    nibble row j % 4n, high = j >= 4n, plane row 4n + j % 4, k = j // 4."""
    vb = nib.type
    vi = ir.VectorType(ir.IntType(32), vb.count // 4)

    def shift(v, n):   # n > 0: left, n < 0: right
        w = builder.bitcast(v, vi)
        w = builder.shl(w, ir.Constant(vi, [n] * vi.count)) if n > 0 else \
            builder.lshr(w, ir.Constant(vi, [-n] * vi.count)) if n < 0 else w
        return builder.bitcast(w, vb)

    lo = builder.and_(shift(nib, -4) if high else nib, ir.Constant(vb, [0x0F] * vb.count))
    mask = ((1 << (bits - 4)) - 1) << 4
    return builder.or_(lo, builder.and_(shift(plane, 4 - (bits - 4) * k), ir.Constant(vb, [mask] * vb.count)))


def plane_quad_ir(builder, quads, k, bits):
    """Code vector k (codes 4k..4k+3 of 16 rows) of a U5 / U6 block in quads, from its quads of those rows (the
    nibble quads, then the plane): plane_codes_ir's quads case."""
    n = PLANES[bits][1]
    return plane_codes_ir(builder, quads[k % n], quads[n], k >= n, k, bits)


def _make_plane_rows(bits: int):
    """An intrinsic (dst, src, off, doff): dst's rows j < C from element doff of its data (uint8 [.., 32, R]) = code j
    of R rows of a U5 / U6 block (C = 32 / 16 codes) whose byte rows start at element off of src's data (the
    matrix's byte rows, or dst itself after _code_rows: step i reads and writes only rows i mod 4, all its reads
    first, so no row is read after it is overwritten). Generic LLVM vectors, lowered for any ISA (numba loops on
    uint8 widen to int64)."""
    n_codes, n = PLANES[bits]

    @intrinsic
    def plane_rows(typingctx, dst, src, off, doff):
        sig = types.void(dst, src, types.intp, types.intp)

        def codegen(context, builder, signature, args):
            dp = context.make_array(signature.args[0])(context, builder, args[0]).data
            dp = builder.gep(dp, [args[3]])
            sp = context.make_array(signature.args[1])(context, builder, args[1]).data
            vb, i64 = ir.VectorType(ir.IntType(8), R), ir.IntType(64)

            def row(base, j, off):
                return builder.bitcast(builder.gep(base, [builder.add(off, ir.Constant(i64, j * R))]),
                                       vb.as_pointer())

            zero = ir.Constant(i64, 0)
            for i in range(4):   # plane row i: codes i + 4k from nibble rows i + 4g (n + 1 rows live)
                nibs = [builder.load(row(sp, i + 4 * g, args[2]), align=1) for g in range(n)]
                plane = builder.load(row(sp, 4 * n + i, args[2]), align=1)
                for k in range(n_codes // 4):
                    code = plane_codes_ir(builder, nibs[k % n], plane, k >= n, k, bits)
                    builder.store(code, row(dp, i + 4 * k, zero), align=1)
            return context.get_dummy_value()
        return sig, codegen
    return plane_rows


_five_bit_rows, _six_bit_rows = _make_plane_rows(5), _make_plane_rows(6)


def crumb_codes_ir(builder, v, k):
    """Code vector k of a U2 block (repack.py): bits 2k..2k+1 of every byte of v (its 4 bytes of codes in quads:
    codes 4k..4k+3 of 16 rows; a byte row: code i + 4k of R rows). One shift of 32-bit lanes and one mask."""
    vb = v.type
    vi = ir.VectorType(ir.IntType(32), vb.count // 4)
    if k:
        v = builder.bitcast(builder.lshr(builder.bitcast(v, vi), ir.Constant(vi, [2 * k] * vi.count)), vb)
    return builder.and_(v, ir.Constant(vb, [3] * vb.count))


@intrinsic
def _crumb_rows(typingctx, dst, src, off, doff):
    """_make_plane_rows' staging for U2: dst's rows j < 16 from element doff = code j of R rows of a U2 block whose 4
    byte rows start at element off of src (step i reads row i, then writes rows i + 4k: never a row read later)."""
    sig = types.void(dst, src, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        dp = builder.gep(context.make_array(signature.args[0])(context, builder, args[0]).data, [args[3]])
        sp = context.make_array(signature.args[1])(context, builder, args[1]).data
        vb, i64 = ir.VectorType(ir.IntType(8), R), ir.IntType(64)

        def row(base, j, off):
            return builder.bitcast(builder.gep(base, [builder.add(off, ir.Constant(i64, j * R))]), vb.as_pointer())

        zero = ir.Constant(i64, 0)
        for i in range(4):
            v = builder.load(row(sp, i, args[2]), align=1)
            for k in (3, 2, 1, 0):
                builder.store(crumb_codes_ir(builder, v, k), row(dp, i + 4 * k, zero), align=1)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always")
def _plane_rows(kind, dst, src, off, doff):
    """_five_bit_rows, _six_bit_rows or _crumb_rows, by code kind."""
    if kind == KIND_U5:
        _five_bit_rows(dst, src, off, doff)
    elif kind == KIND_U6:
        _six_bit_rows(dst, src, off, doff)
    else:
        _crumb_rows(dst, src, off, doff)


@njit(inline="always")
def _block_size(kind, n_lines):
    """Weights per block of a tiled matrix whose blocks hold n_lines bytes of each row (U4: two codes a byte, 32- or
    16-weight blocks; U2: four)."""
    return (2 * n_lines if kind == KIND_U4 else 32 if kind == KIND_U5 else 16 if kind == KIND_U6 or kind == KIND_U2
            else n_lines)


@njit(inline="always")
def _block_rows(rows, codes, byte_rows, t, b, kind):
    """(src, tile, block): where the portable loops read block b of tile t as byte rows (src [tiles, nblk, lines,
    R]): the matrix's own byte rows, or staged in `rows` (uint8 [2, 1, 32, R]) from quads (_code_rows) and, for U5,
    U6 and U2, as I8 byte rows of their codes (_plane_rows): one row per code, so the I8 loops read
    them. Called for b = 0, 1, .. of a tile in order: U5 / U6 byte rows are staged one block ahead, into the other
    half of `rows`, so that the loops do not read the rows just stored (U6, one-token decode on an AVX2 target: 1.12
    -> 1.06x the time of the I8 layout's)."""
    quads = codes.shape[4] == 4
    zero = np.intp(0)   # (np.intp throughout: a parfor's index may be unsigned, and uint64 | int64 types as float)
    if quads:
        _code_rows(rows, codes, t, b)
    if kind == KIND_U5 or kind == KIND_U6 or kind == KIND_U2:
        if quads:
            _plane_rows(kind, rows, rows, 0, 0)
            return rows, zero, zero
        first = (np.intp(t) * byte_rows.shape[1]) * byte_rows.shape[2] * R
        if b == 0:
            _plane_rows(kind, rows, byte_rows, first, 0)
        if b + 1 < byte_rows.shape[1]:
            _plane_rows(kind, rows, byte_rows, first + (b + 1) * byte_rows.shape[2] * R, ((b + 1) & 1) * 32 * R)
        return rows, np.intp(b & 1), zero
    if quads:
        return rows, zero, zero
    return byte_rows, np.intp(t), np.intp(b)


# ---------------------------------------------------------------------------------------- block scales
# Scales d and offsets m are stored as half bits (uint16) when the format's own scales are halves (exact, half
# the bytes to stream) or in two levels (K-quants: the file's half super-block scale times a small integer
# sub-block scale, exact in float32). They reach every kernel in ONE argument layout, a triple
#   (half bits uint16 [tiles, nblk, R], super-block scales as half bits uint16 [tiles, nblk/G, R], sub-block
#    scales int8 [tiles, nblk, R])
# of which a matrix uses the first part (two_level False) or the other two; the unused parts are dummies. So each
# kernel has one signature for every quant type of its family: each further quant type used to cost one more
# compile of each kernel (~3 s apiece, kernels/warmup.py). The branch is once per block, outside the inner loops.
_DUMMY_HALF = np.zeros((1, 1, R), np.uint16)
_DUMMY_SUPER = np.zeros((1, 1, R), np.uint16)
_DUMMY_SUB = np.zeros((1, 1, R), np.int8)


def _make_scale_loader(two_level: bool):
    """An intrinsic out[:R] = the scales of block b of tile t as float32, from a kernel scale triple (below):
    two_level False: halves src[0][t, b, :R] widened (vcvtph2ps: exact); True: the halves src[1][t, g, :R] widened
    times float32(src[2][t, b, :R]) (g = the super-block, which holds a power of two of blocks: one rounding).
    In LLVM IR because the numba loops they replace compiled to ~450 scalar instructions per block (behind an
    aliasing check: as many as the block's products), and taking an array out of the tuple in numba code cost
    two reference-count calls per block."""
    @intrinsic
    def load(typingctx, src, t, b, out):
        if not (isinstance(t, types.Integer) and isinstance(b, types.Integer)):
            return None
        sig = types.void(src, t, b, out)

        def codegen(context, builder, signature, args):
            tup_ty = signature.args[0]
            t_, b_ = (context.cast(builder, args[k], signature.args[k], types.intp) for k in (1, 2))
            dst = context.make_array(signature.args[3])(context, builder, args[3]).data
            vf = ir.VectorType(ir.FloatType(), R)
            zero = context.get_constant(types.intp, 0)

            def member(k):
                ty = tup_ty.types[k]
                return ty, context.make_array(ty)(context, builder, builder.extract_value(args[0], k))

            def row(k, i, j):   # pointer to member k's element [i, j, 0]
                ty, arr = member(k)
                return cgutils.get_item_pointer(context, builder, ty, arr, [i, j, zero], wraparound=False)

            if two_level:
                n_sup = builder.extract_value(member(1)[1].shape, 1)
                n_sub = builder.extract_value(member(2)[1].shape, 1)
                # g = b // (n_sub / n_sup), a power of two (256-weight super-blocks of 16- or 32-weight blocks):
                # a shift by the difference of trailing zero counts instead of two divisions per block
                cttz = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(n_sub.type, [n_sub.type, ir.IntType(1)]),
                    f"llvm.cttz.i{n_sub.type.width}")
                no = ir.Constant(ir.IntType(1), 0)
                g = builder.ashr(b_, builder.sub(builder.call(cttz, [n_sub, no]), builder.call(cttz, [n_sup, no])))
                x = builder.fpext(builder.load(builder.bitcast(row(1, t_, g), ir.VectorType(ir.HalfType(), R)
                                                               .as_pointer()), align=2), vf)
                y = builder.load(builder.bitcast(row(2, t_, b_), ir.VectorType(ir.IntType(8), R).as_pointer()),
                                 align=1)
                builder.store(builder.fmul(x, builder.sitofp(y, vf)), builder.bitcast(dst, vf.as_pointer()),
                              align=4)
            else:
                v = builder.load(builder.bitcast(row(0, t_, b_), ir.VectorType(ir.HalfType(), R).as_pointer()),
                                 align=2)
                builder.store(builder.fpext(v, vf), builder.bitcast(dst, vf.as_pointer()), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return load


_halves_scales, _two_level_scales = _make_scale_loader(False), _make_scale_loader(True)


@njit(inline="always", fastmath=True)
def _load_scales(src, two_level, t, b, out):
    """out[:R] = the scales of block b of tile t as float32 (_make_scale_loader)."""
    if two_level:
        _two_level_scales(src, t, b, out)
    else:
        _halves_scales(src, t, b, out)


# The scales are streams of their own beside the codes, which the hardware prefetcher did not keep ahead of:
# prefetching them SCALES_AHEAD blocks ahead made the one-token VNNI product 12-21 % faster on TinyLlama's Q4_0,
# Q8_0 and Q4_K matrices (1 thread, same-process A/B, 2026-12-02). The portable one-token kernel, bound by its
# instruction count, got no faster (0.97-1.2x on an emulated AVX2 target), so it does without.
SCALES_AHEAD = 2


@njit(inline="always")
def _scale_lines(src, two_level):
    """A kernel scale triple's arrays as flat bytes, for _prefetch_scales: (half bits or sub-block scales,
    super-block scales). Taken out of the triple once per call, not per block (reference counting)."""
    if two_level:
        return src[2].reshape(-1).view(np.uint8), src[1].reshape(-1).view(np.uint8)
    return src[0].reshape(-1).view(np.uint8), src[1].reshape(-1).view(np.uint8)


@njit(inline="always")
def _prefetch_scales(lines, two_level, t, b, nblk, group):
    """Prefetch the scales of block b + SCALES_AHEAD of tile t (lines: _scale_lines; group: blocks per super-block):
    halves two lines a block; K-quants one line of int8 sub-scales a block and, at each super-block's start, the
    next super-block's two lines of half scales. Clamped inside the arrays."""
    per, sup = lines
    if two_level:
        _prefetch(per, min((t * nblk + b + SCALES_AHEAD) * R, per.shape[0] - 1))
        if b % group == 0:
            nxt = (t * (nblk // group) + b // group + 1) * R * 2
            for j in range(2):
                _prefetch(sup, min(nxt + 64 * j, sup.shape[0] - 1))
    else:
        o = (t * nblk + b + SCALES_AHEAD) * R * 2
        _prefetch(per, min(o, per.shape[0] - 1))
        _prefetch(per, min(o + 64, per.shape[0] - 1))


@njit(inline="always", fastmath=True)
def _widen_halves(half, t, i, out):
    """out[:R] = the halves half[t, i, :R] as float32, exactly: each half's bits moved into float32's place, then
    rebiased by 2**112 (also for subnormal halves)."""
    bits = out.view(np.uint32)
    for r in range(R):
        h = np.uint32(half[t, i, r])
        bits[r] = ((h & np.uint32(0x8000)) << 16) | ((h & np.uint32(0x7FFF)) << 13)
    for r in range(R):
        out[r] *= F16_TO_F32


@njit(inline="always", fastmath=True)
def _load_scales_scalar(src, two_level, t, b, out):
    """_load_scales in numba loops (the same values: halves and their products are exact), for the portable kernels
    and the prefill GEMM (gemm_vnni.py). The GEMM's micro-kernel reloads a block's scales for every group of
    tokens: after _load_scales' vector stores LLVM forwards the stored vectors into registers for the whole token
    loop, and the micro-kernel, which holds 24 vectors of sums, spills (prefill 1.2-1.6x slower, 2026-12-01);
    these scalar stores are not forwarded, and the loop's cost per block is shared by all the prompt's tokens."""
    if two_level:
        sup = src[1]
        sub = src[2]
        _widen_halves(sup, t, b // (sub.shape[1] // sup.shape[1]), out)
        for r in range(R):
            out[r] *= np.float32(sub[t, b, r])
    else:
        _widen_halves(src[0], t, b, out)


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
        return np.repeat(sup[t, :, lane].view(np.float16).astype(np.float32), g, axis=1) * sub[t, :, lane].astype(
            np.float32)
    a = a[t, :, lane]
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a


def _scale_args(pm: PackedMatrix):
    """(d, m, two_level, has_m) for the kernels (made once per matrix)."""
    if pm.kernel_scales is None:
        pm.kernel_scales = (_kernel_scales(pm.d), _kernel_scales(pm.m), isinstance(pm.d, tuple), pm.m is not None)
    return pm.kernel_scales


# ---------------------------------------------------------------------------------------- activations
# Every tiled product quantizes the activations to int16 with one float scale per
# weight block (|error| <= 1.5e-5 of the block's largest value: ~250x finer than ggml's int8 Q8 activations),
# so the inner loop is integer multiply-adds on codes widened straight from memory.
ACT_MAX = np.float32(32767.0)


def _make_block_quantizer(bs: int):
    """An intrinsic quantizing the bs = 16 or 32 activations at x[xo:]: xq[qo:qo+bs] = int16(rint(x * inv)) with
    inv = ACT_MAX / amax (0 when amax = 0), xd[so] = amax / ACT_MAX, xsum[so] = the block's float sum, xqsum[so] =
    the sum of its codes (flat offsets: the prefill GEMM stores its blocks apart from the token order). Vectors of
    16 floats in explicit operations (no fast-math flag, so no pass reorders them): amax is exact in any order
    (NaNs skipped, as Python's max does); xsum is added in one fixed order, lanes j and j + 16 first, then halves
    (8, 4, 2, 1 lanes), which every kernel gets the same; rint is numba's round(). The loops it replaces were
    scalar (a sum and a max chained through every element: ~4 ns per activation, serial before each product's
    parallel region)."""
    n_vec = bs // 16

    @intrinsic
    def quantize_block(typingctx, x, xo, xq, qo, xd, xsum, xqsum, so):
        if not all(isinstance(a, types.Array) and a.layout == "C" for a in (x, xq, xd, xsum, xqsum)):
            return None
        sig = types.void(x, types.intp, xq, types.intp, xd, xsum, xqsum, types.intp)

        def codegen(context, builder, signature, args):
            xp, qp, dp, sp, qsp = (context.make_array(signature.args[k])(context, builder, args[k]).data
                                   for k in (0, 2, 4, 5, 6))
            base, qbase, so_ = args[1], args[3], args[7]
            f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
            vf, vi = ir.VectorType(f32, 16), ir.VectorType(i32, 16)
            vh = ir.VectorType(ir.IntType(16), 16)

            def fn(name, ret, *argtys):
                return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, list(argtys)), name)

            fabs, rint = fn("llvm.fabs.v16f32", vf, vf), fn("llvm.rint.v16f32", vf, vf)
            vs = [builder.load(builder.bitcast(builder.gep(xp, [builder.add(base, ir.Constant(i64, 16 * k))]),
                                               vf.as_pointer()), align=4) for k in range(n_vec)]

            def vmax(a, c):   # Python's max(a, c) per lane: c if c > a else a
                return builder.select(builder.fcmp_ordered(">", c, a), c, a)

            def halves(v, op):   # op over lanes until one is left, halving: (8, 4, 2, 1)
                n = v.type.count
                while n > 1:
                    n //= 2
                    lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n))))
                    hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, n), list(range(n, 2 * n))))
                    v = op(lo, hi)
                return builder.extract_element(v, ir.Constant(i32, 0))

            m = ir.Constant(vf, [0.0] * 16)
            for v in vs:
                m = vmax(m, builder.call(fabs, [v]))
            amax = halves(m, vmax)
            tot = vs[0]
            for v in vs[1:]:
                tot = builder.fadd(tot, v)
            tot = halves(tot, builder.fadd)
            act_max = ir.Constant(f32, float(ACT_MAX))
            inv = builder.select(builder.fcmp_ordered(">", amax, ir.Constant(f32, 0.0)),
                                 builder.fdiv(act_max, amax), ir.Constant(f32, 0.0))
            inv_v = _splat_ir(builder, inv, vf)
            qsum = ir.Constant(vi, [0] * 16)
            for k, v in enumerate(vs):
                q = builder.trunc(builder.fptosi(builder.call(rint, [builder.fmul(v, inv_v)]), vi), vh)
                dst = builder.gep(qp, [builder.add(qbase, ir.Constant(i64, 16 * k))])
                builder.store(q, builder.bitcast(dst, vh.as_pointer()), align=2)
                qsum = builder.add(qsum, builder.sext(q, vi))
            builder.store(builder.fdiv(amax, act_max), builder.gep(dp, [so_]))
            builder.store(tot, builder.gep(sp, [so_]))
            builder.store(halves(qsum, builder.add), builder.gep(qsp, [so_]))
            return context.get_dummy_value()
        return sig, codegen
    return quantize_block


_quantize_block16, _quantize_block32 = _make_block_quantizer(16), _make_block_quantizer(32)


@njit(fastmath=False)   # helpers called only from other kernels are not cached themselves (kernels/warmup.py)
def _quantize_activations(x, bs, xq, xd, xsum, xqsum):
    """x float32 [K] -> xq int16 [K], per-block scale xd [K/bs], per-block sums xsum (for the float
    offsets m) and per-block integer sums xqsum (for the codes' zero point), blocks of bs = 16 or 32 (every tiled
    format's). One definition of the order of xsum's additions (_make_block_quantizer), called by every kernel:
    the batched decode kernels and the prefill GEMM reproduce the one-token kernels' bits."""
    for b in range(x.shape[0] // bs):
        _quantize_block(x, b * bs, xq, b * bs, xd, xsum, xqsum, b, bs)


@njit(fastmath=False)
def _quantize_block(x, xo, xq, qo, xd, xsum, xqsum, so, bs):
    """One block of _quantize_activations (offsets: _make_block_quantizer). A function of its own, never inlined
    by numba: numba's fast-math pass flags every float operation of the function it runs on, these included."""
    if bs == 32:
        _quantize_block32(x, xo, xq, qo, xd, xsum, xqsum, so)
    elif bs == 16:
        _quantize_block16(x, xo, xq, qo, xd, xsum, xqsum, so)
    else:
        raise ValueError("activation blocks are of 16 or 32 weights")


@njit(fastmath=True)
def _finish_tile(acc, y, t, n_rows, accumulate):
    for r in range(R):
        row = t * R + r
        if row < n_rows:
            if accumulate:
                y[row] += acc[r]
            else:
                y[row] = acc[r]


def _splat_ir(builder, value, vty):
    """A scalar in every lane of a vector of its type (the IR micro-kernels' broadcasts)."""
    u = ir.Constant(vty, ir.Undefined)
    i32 = ir.IntType(32)
    return builder.shuffle_vector(builder.insert_element(u, value, ir.Constant(i32, 0)), u,
                                  ir.Constant(ir.VectorType(i32, vty.count), [0] * vty.count))


def _epilogue_ir(builder, acc, dv, dx, f, mv=None, sx=None):
    """acc + d_row * d_x * f (+ m_row * sum(x)), rounded as fma(d_row * d_x, f, fma(m_row, sum(x), acc)): the ONE
    definition of how a block's integer dot f is scaled and added, emitted by _add_block (decode) and by the
    GEMM micro-kernel (prefill) alike, in explicit operations no fast-math pass can reorder, so that both give
    the same bits (kernels/strict.py). The order is the one LLVM had chosen for _add_block's fast-math source."""
    t = acc if mv is None else fma_ir(builder, mv, sx, acc)
    return fma_ir(builder, builder.fmul(dv, dx), f, t)


@intrinsic
def _scale_add(typingctx, acc, dv, dx, f):
    sig = types.float32(types.float32, types.float32, types.float32, types.float32)
    return sig, lambda context, builder, signature, args: _epilogue_ir(builder, *args)


@intrinsic
def _scale_add_m(typingctx, acc, dv, dx, f, mv, sx):
    sig = types.float32(*(types.float32,) * 6)
    return sig, lambda context, builder, signature, args: _epilogue_ir(builder, *args)


@intrinsic
def _int_diff_f32(typingctx, a, b):
    """float32(a - b) for integers whose difference fits in int32, computed in int32: numba widens integer
    arithmetic to int64, and the epilogue then sign-extended, subtracted and converted 8 lanes per vector
    instead of 16 (vpmovsxdq, vpsubq, vcvtqq2ps). The same exact integer, so the same float. A block's dot
    minus its zero-point term stays far inside int32: |s| <= 32 * 128 * 32767 < 2**28, |zero * sum(xq)| <= 16 *
    32 * 32767 < 2**24."""
    if not (isinstance(a, types.Integer) and isinstance(b, types.Integer)):
        return None
    sig = types.float32(a, b)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        x, y = (v if v.type.width == 32 else builder.trunc(v, i32) if v.type.width > 32 else builder.sext(v, i32)
                for v in args)
        return builder.sitofp(builder.sub(x, y), ir.FloatType())
    return sig, codegen


@njit(inline="always", fastmath=True)
def _add_block(acc, s, t, b, d, m, two_level, has_m, zero, xd, xsum, xqsum, dv, mv):
    """acc += one block's integer dots s, scaled: d_row * d_x * (s - zero * sum(xq)) (+ m_row * sum(x)),
    rounded as _epilogue_ir says."""
    _load_scales_scalar(d, two_level, t, b, dv)   # (the portable kernels': measured no slower on AVX2)
    if has_m:
        _load_scales_scalar(m, two_level, t, b, mv)
    dx = xd[b]
    zq = zero * xqsum[b]
    if has_m:
        sx = xsum[b]
        for r in range(R):
            acc[r] = _scale_add_m(acc[r], dv[r], dx, _int_diff_f32(s[r], zq), mv[r], sx)
    else:
        for r in range(R):
            acc[r] = _scale_add(acc[r], dv[r], dx, _int_diff_f32(s[r], zq))
