"""Load-time layouts: ggml's quantized rows -> row tiles the matmul kernels stream through.

Every ggml type is reduced to one of six *families*, each holding weights as small unsigned integers
(or raw floats) plus one float32 scale `d` and one float32 offset `m` per block of `bs` weights of a
row and an integer zero point per matrix, so that `w = d*(q - zero) + m`. Signed formats (Q8_0, Q6_K,
...) are stored with their codes shifted to unsigned: the kernels then see only non-negative bytes
(which LLVM multiplies with vpmaddwd) and subtract the zero point exactly, in integers.

  U4   4-bit codes, two per byte (byte j of a 32-block: code j low, code j+16 high;     Q4_0 Q4_1 Q4_K
       of a 16-block: code j low, code j+8 high)                                       Q3_K Q2_K (16)
  U5   5-bit codes of a 32-block in 20 bytes: U4's 16 nibble bytes and a 1-bit plane   Q5_0 Q5_1 Q5_K
       (byte 16+i: bit 4 of code 4k+i at bit k)
  U6   6-bit codes of a 16-block in 12 bytes: a nibble plane (bytes j < 8: code j low,   Q6_K
       code j+8 high) and a 2-bit plane (byte 8+i: code 4g+i's bits 4-5 at bits 2g)
  I8   8-bit codes, one per byte, bs = 32 (the kernels take 16 too)                     Q8_0 IQ4_NL
  H16  raw 16-bit floats (kind 0 = IEEE half, 1 = bfloat16), no scales                 F16 BF16
  F32  raw float32, no scales                                                           F32

For U4, U5, U6 and I8 (the tiled families), rows are grouped into tiles of TILE_ROWS and the kernels' innermost
loops run over a tile's independent output rows, without reductions (docs/kernels.md). Codes are uint8 [tile,
block, n, R, E], byte j of row r at [t, b, j // E, r, j % E], in one of two layouts, both of one array type (one
compiled kernel):
  quads (E = 4, on AVX-512 VNNI hosts: QUADS): one 64-byte vector holds bytes 4k..4k+3 of 16 consecutive rows,
      4 bytes per 32-bit lane: the operand `vpdpbusd` multiplies with 4 activations at once (gemv_vnni.py);
  byte rows (E = 1, elsewhere): one 64-byte run is byte j of 64 rows, which the portable loops (gemv.py)
      vectorize over; they read quads through a shuffle into byte rows (blocks._code_rows), 15-48 % slower
      than byte rows on an AVX2 target, so hosts that run them keep byte rows.
The high-bit planes of U5 and U6 are arranged so that, in either layout, one shift and one mask of a 64-byte
vector give the high bits of 64 codes (shifts of 32-bit lanes: bits crossing from a neighbouring byte are masked
off), so the kernels rebuild a block's codes in registers or a small scratch (blocks.plane_codes_ir) and multiply
them as I8 codes (the VNNI kernels as U4's: codes below 64 are valid s8), the same integers as when these types
were held in I8. H16 and F32 rows stay row-major. Nothing is dequantized to a
float32 copy: U4 keeps 4 bits per weight, U5 5, U6 6, I8 8 bits, H16 16 bits (prefill widens one chunk of rows at
a time, gemm_blas.py). Q3_K's 3-bit and Q2_K's 2-bit codes take U4's nibbles (4.63 and 5.25 bits per weight with
their scales, for ggml's 3.44 and 2.63): every U4 kernel already multiplies nibbles, and a 16-weight block is
only a block with half the nibble bytes (blocks._block_size).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from ..errors import ModelError
from ..ggml import GGML_BLOCK, IQ4_NL_VALUES, GGMLType, fp16_values
from ..runtime import cpu_target_has

# Rows per tile. The kernels (blocks.py and the product files beside it) compile it in as a constant (a change
# recompiles them all: numba's cache is keyed by all the kernel sources, runtime.py).
TILE_ROWS = 64

U4, U5, U6, I8, H16, FP32 = "u4", "u5", "u6", "i8", "h16", "f32"
TILED = (U4, U5, U6, I8)   # the families in row tiles, read by the integer product kernels

# The product kernels' code-kind argument (one int: one compiled signature for every tiled family).
KIND_I8, KIND_U4, KIND_U6, KIND_U5 = 0, 1, 2, 3
CODE_KIND = {I8: KIND_I8, U4: KIND_U4, U6: KIND_U6, U5: KIND_U5}

# The code layout (module doc) the kernels this host runs read fastest: quads where the VNNI kernels run (on the
# CPU numba compiles for, which NUMBA_CPU_FEATURES may set apart from the host's), byte rows elsewhere.
VNNI_TARGET = cpu_target_has("avx512vnni", "avx512bw")   # what the IR micro-kernels (qmatmul.VNNI) need
QUADS = TILE_ROWS == 64 and VNNI_TARGET

# The ggml types the engine runs and the family each is reduced to (module doc).
FAMILY = {GGMLType.F32: FP32, GGMLType.F16: H16, GGMLType.BF16: H16,
          GGMLType.Q4_0: U4, GGMLType.Q4_1: U4, GGMLType.Q4_K: U4, GGMLType.Q3_K: U4, GGMLType.Q2_K: U4,
          GGMLType.Q8_0: I8, GGMLType.IQ4_NL: I8,
          GGMLType.Q5_0: U5, GGMLType.Q5_1: U5, GGMLType.Q5_K: U5,
          GGMLType.Q6_K: U6}
ENGINE_TYPES = frozenset(FAMILY)


@dataclass
class PackedMatrix:
    """A weight matrix [n_rows, n_cols] in one family's tile layout (see module doc)."""
    family: str
    n_rows: int
    n_cols: int
    codes: np.ndarray          # U4 uint8 [tiles, nblk, 16/E, R, E]; U6 [tiles, nblk, 12/E, R, E];
                               # I8 [tiles, nblk, bs/E, R, E] (E: doc);
                               # H16 uint16 [n_rows, n_cols]; F32 float32 [n_rows, n_cols] (row-major)
    d: np.ndarray | tuple | None  # (tiled) per-block scales: uint16 half bits [tiles, nblk, R] when the format's
                               # scales are halves (exact, 16 bits per block); K-quants: a pair (float32 super-block
                               # scale [tiles, nblk/G, R], int8/uint8 sub-block scale [tiles, nblk, R]) whose product
                               # is the block scale (exact in float32; ~8 bits per block instead of 32)
    m: np.ndarray | tuple | None  # offsets, stored like d, or None when every offset is zero (nothing read)
    bs: int = 1                # weights per scale block (U4: 32, U6: 16, I8: 32 or 16)
    zero: int = 0              # integer zero point of the codes: w = d*(q - zero) + m (exact in the kernels)
    kind: int = 0              # H16: 0 = f16, 1 = bf16
    src_type: int = -1
    kernel_scales: tuple | None = field(default=None, repr=False, compare=False)   # blocks._scale_args

    @property
    def code_kind(self) -> int:
        """The product kernels' `kind` argument (KIND_I8 / KIND_U4 / KIND_U6)."""
        return CODE_KIND[self.family]

    @property
    def nbytes(self) -> int:
        arrays = [self.codes]
        for a in (self.d, self.m):
            arrays += list(a) if isinstance(a, tuple) else [a] if a is not None else []
        return sum(a.nbytes for a in arrays)


def _f16_bits(raw: np.ndarray) -> np.ndarray:
    """Little-endian half bytes [..., 2] -> their uint16 bits [...] (kept as halves: exact and compact)."""
    return np.ascontiguousarray(raw).view("<u2")[..., 0]


def _split_blocks(raw: np.ndarray, n_cols: int, qtype: int) -> np.ndarray:
    blck, size = GGML_BLOCK[qtype]
    return raw.reshape(raw.shape[0], n_cols // blck, size)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes 0..15 [rows, nblk, bs] -> U4 bytes [rows, nblk, bs / 2] (low = code j, high = code j + bs / 2)."""
    half = q.shape[-1] // 2
    return (q[..., :half] | (q[..., half:] << 4)).astype(np.uint8)


def nibble_codes(c: np.ndarray, axis: int = -1) -> np.ndarray:
    """Bytes -> their low nibbles then their high nibbles along `axis` (_pack_nibbles' inverse on the last axis;
    ggml's nibble bytes read the same way)."""
    return np.concatenate([c & 15, c >> 4], axis=axis)


# U6 (module doc): the 2-bit plane's byte i holds bits 4-5 of code 4g + i at bits 2g..2g+1, g = 0..3.
_PLANE_SHIFTS = np.array([0, 2, 4, 6], np.uint8)


def pack_six_bit(q: np.ndarray) -> np.ndarray:
    """Codes 0..63 [..., 16] -> U6 bytes [..., 12]: nibble bytes j < 8 (code j low, code j + 8 high), then the
    2-bit plane."""
    q = q.astype(np.uint8)
    lo = q & 15
    hb = (q >> 4).reshape(q.shape[:-1] + (4, 4))                # [g][i]: code 4g + i
    plane = np.bitwise_or.reduce(hb << _PLANE_SHIFTS[:, None], axis=-2)
    return np.concatenate([lo[..., :8] | (lo[..., 8:] << 4), plane], axis=-1).astype(np.uint8)


def six_bit_codes(c: np.ndarray) -> np.ndarray:
    """U6 bytes [..., 12] -> codes 0..63 [..., 16] (pack_six_bit's inverse)."""
    c = c.astype(np.uint8)
    lo = nibble_codes(c[..., :8])
    hb = (c[..., None, 8:12] >> _PLANE_SHIFTS[:, None]) & 3      # [g][i]
    return lo | (hb.reshape(c.shape[:-1] + (16,)) << 4)


# U5 (module doc): bit 4 of code 4k + i is bit k of the 1-bit plane's byte i, k = 0..7. _PLANE_BITS[m, v]: where
# the bits v of byte m of a 32-bit word of high bits (bit j = code j's) land in the plane read as a little-endian
# uint32: code j = 8m + p goes to byte j % 4, bit j // 4 (a table lookup per byte, not 32 shifts per block).
_BIT_SHIFTS = np.arange(8, dtype=np.uint8)


def _plane_bits_table() -> np.ndarray:
    table = np.zeros((4, 256), np.uint32)
    v = np.arange(256)
    for j in range(32):
        table[j // 8, (v >> (j % 8)) & 1 == 1] |= np.uint32(1 << (8 * (j % 4) + j // 4))
    return table


_PLANE_BITS = _plane_bits_table()


def _five_bit_plane(high: np.ndarray) -> np.ndarray:
    """uint32 words of high bits [...] (bit j: bit 4 of code j of a 32-block, ggml's Q5_0 / Q5_1 qh) -> U5's 1-bit
    plane [..., 4]."""
    high = high.astype(np.uint32)
    plane = _PLANE_BITS[0][high & 255]
    for m in range(1, 4):
        plane |= _PLANE_BITS[m][(high >> np.uint32(8 * m)) & 255]
    return plane.astype("<u4")[..., None].view(np.uint8)


def five_bit_codes(c: np.ndarray) -> np.ndarray:
    """U5 bytes [..., 20] (module doc) -> codes 0..31 [..., 32]."""
    c = c.astype(np.uint8)
    lo = nibble_codes(c[..., :16])
    hb = (c[..., None, 16:20] >> _BIT_SHIFTS[:, None]) & 1      # [k][i]
    return lo | (hb.reshape(c.shape[:-1] + (32,)) << 4)


def _kquant_scales_mins(sc: np.ndarray):
    """Q4_K/Q5_K 12-byte 6-bit packing [..., 12] -> scales, mins [..., 8] (docs/formats.md §3.2)."""
    sc = sc.astype(np.uint8)
    s = np.empty(sc.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(s)
    s[..., :4] = sc[..., 0:4] & 63
    mn[..., :4] = sc[..., 4:8] & 63
    s[..., 4:] = (sc[..., 8:12] & 15) | ((sc[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (sc[..., 8:12] >> 4) | ((sc[..., 4:8] >> 6) << 4)
    return s, mn


def _two_bit_plane(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low bits qs [..., 64] -> codes [..., 256]: weight 128h+32s+l = bits 2s.. of qs[32h+l]."""
    q = qs.reshape(qs.shape[:-1] + (2, 1, 32))
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)
    return ((q >> shifts) & 3).reshape(qs.shape[:-1] + (256,))


def _unpack(raw: np.ndarray, n_cols: int, qtype: int):
    """Raw rows of one type -> (family, codes [rows, nblk, ...], d, m, bs, zero) before tiling."""
    rows = raw.shape[0]
    if qtype == GGMLType.F32:
        return FP32, raw.view("<f4").reshape(rows, n_cols), None, None, 1, 0
    if qtype in (GGMLType.F16, GGMLType.BF16):
        return H16, raw.view("<u2").reshape(rows, n_cols), None, None, 1, 0
    b = _split_blocks(raw, n_cols, qtype)
    if qtype == GGMLType.Q4_0:
        return U4, b[..., 2:18], _f16_bits(b[..., 0:2]), None, 32, 8
    if qtype == GGMLType.Q4_1:
        return U4, b[..., 4:20], _f16_bits(b[..., 0:2]), _f16_bits(b[..., 2:4]), 32, 0
    if qtype == GGMLType.Q8_0:
        return I8, b[..., 2:34] ^ np.uint8(0x80), _f16_bits(b[..., 0:2]), None, 32, 128   # int8 + 128
    if qtype == GGMLType.IQ4_NL:
        qs = b[..., 2:18]
        q = nibble_codes(qs)
        return I8, (IQ4_NL_VALUES[q].astype(np.int16) + 128).astype(np.uint8), _f16_bits(b[..., 0:2]), None, 32, 128
    if qtype in (GGMLType.Q5_0, GGMLType.Q5_1):
        off = 2 if qtype == GGMLType.Q5_0 else 4
        qh = np.ascontiguousarray(b[..., off:off + 4]).view("<u4")[..., 0]
        # ggml's qs bytes are U4's nibble bytes already (docs/formats.md): only the high bits move
        codes = np.concatenate([b[..., off + 4:off + 20], _five_bit_plane(qh)], axis=-1)
        d = _f16_bits(b[..., 0:2])
        if qtype == GGMLType.Q5_0:
            return U5, codes, d, None, 32, 16
        return U5, codes, d, _f16_bits(b[..., 2:4]), 32, 0
    if qtype in (GGMLType.Q4_K, GGMLType.Q5_K):
        d = fp16_values(b[..., 0:2])
        dmin = fp16_values(b[..., 2:4])
        sc, mn = _kquant_scales_mins(b[..., 4:16])
        qs_off = 16 if qtype == GGMLType.Q4_K else 48
        qs = b[..., qs_off:qs_off + 128].reshape(rows, -1, 4, 1, 32)
        q = nibble_codes(qs, axis=3).reshape(rows, -1, 8, 32)  # sub-block 2c, 2c+1
        nblk = q.shape[1] * 8
        sc, mn = sc.reshape(rows, nblk), mn.reshape(rows, nblk)
        nibbles = _pack_nibbles(q.reshape(rows, nblk, 32))
        if qtype == GGMLType.Q4_K:
            return U4, nibbles, (d, sc), (-dmin, mn), 32, 0
        # bit s of qh[l] is bit 4 of code l of sub-block s: packed over l, one word of high bits per sub-block
        qh = b[..., 16:48].reshape(rows, -1, 1, 32)
        high = np.packbits((qh >> _BIT_SHIFTS.reshape(8, 1)) & 1, axis=-1, bitorder="little").view("<u4")
        plane = _five_bit_plane(high.reshape(rows, nblk))
        return U5, np.concatenate([nibbles, plane], axis=-1), (d, sc), (-dmin, mn), 32, 0
    if qtype == GGMLType.Q6_K:
        ql = b[..., 0:128].reshape(rows, -1, 2, 2, 32)       # [h][half][l]: ql[64h + 32*half + l]
        qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32)     # qh[32h + l]
        lo = nibble_codes(ql, axis=3)      # [h][quarter][l]: weights 128h + 32*quarter + l
        hb = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3
        q = lo | (hb << 4)                                    # 0..63, weight = q - 32
        sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8)
        d = fp16_values(b[..., 208:210])
        nblk = q.shape[1] * 16
        return U6, pack_six_bit(q.reshape(rows, nblk, 16)), (d, sc.reshape(rows, nblk)), None, 16, 32
    if qtype == GGMLType.Q3_K:
        hmask = b[..., 0:32]
        low = _two_bit_plane(b[..., 32:96]).reshape(rows, -1, 8, 32)
        hbit = (hmask[..., None, :] >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1  # [8][32]: weight 32k + l
        q = low | (hbit << 2)                                 # 0..7, weight = q - 4
        s = b[..., 96:108]
        low4 = nibble_codes(s[..., 0:8])            # codes j = 0..15
        hi2 = (s[..., 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3             # [j%4][j/4]
        hi2 = np.swapaxes(hi2, -1, -2).reshape(rows, -1, 16)                             # index j
        c = ((low4 | (hi2 << 4)).astype(np.int16) - 32).astype(np.int8)
        d = fp16_values(b[..., 108:110])
        nblk = q.shape[1] * 16
        return U4, _pack_nibbles(q.reshape(rows, nblk, 16)), (d, c.reshape(rows, nblk)), None, 16, 4
    if qtype == GGMLType.Q2_K:
        sc = b[..., 0:16]
        q = _two_bit_plane(b[..., 16:80])
        d = fp16_values(b[..., 80:82])
        dmin = fp16_values(b[..., 82:84])
        nblk = q.shape[1] * 16
        dd = (d, (sc & 15).reshape(rows, nblk))
        mm = (-dmin, (sc >> 4).reshape(rows, nblk))
        return U4, _pack_nibbles(q.reshape(rows, nblk, 16)), dd, mm, 16, 0
    raise ModelError(f"tensor type {qtype} is not supported by the engine")


@njit(cache=True, nogil=True)
def _rows_to_tiles(src, out):
    """src [n_rows, M, E] -> out [tiles, M, TILE_ROWS, E]: out[t, c, r] = src[t*TILE_ROWS + r, c], zero past
    n_rows, for elements of E = 1, 2 or 4 bytes: one compiled kernel for codes, scales and offsets."""
    E = src.shape[2]
    if E == 1:
        _move_rows(src[:, :, 0], out[:, :, :, 0])
    elif E == 2:
        _move_rows(src[:, :, 0], out[:, :, :, 0])
        _move_rows(src[:, :, 1], out[:, :, :, 1])
    else:
        for e in range(E):
            _move_rows(src[:, :, e], out[:, :, :, e])


@njit(nogil=True)
def _move_rows(src, out):
    n_rows = src.shape[0]
    for t in range(out.shape[0]):
        for c in range(out.shape[1]):
            for r in range(TILE_ROWS):
                row = t * TILE_ROWS + r
                out[t, c, r] = src[row, c] if row < n_rows else 0


def _tile(a: np.ndarray, n_rows_padded: int) -> np.ndarray:
    """[rows, nblk, ...] -> [tiles, nblk, ..., TILE_ROWS] (rows zero-padded to a whole tile)."""
    inner = a.shape[1:]
    src = np.ascontiguousarray(a).reshape(a.shape[0], -1)
    out = np.empty((n_rows_padded // TILE_ROWS, src.shape[1], TILE_ROWS), a.dtype)
    size = a.dtype.itemsize
    # (a numpy moveaxis copy took half of the load time)
    _rows_to_tiles(src.view(np.uint8).reshape(src.shape + (size,)), out.view(np.uint8).reshape(out.shape + (size,)))
    return out.reshape((out.shape[0],) + inner + (TILE_ROWS,))


def _tile_codes(codes: np.ndarray, n_rows_padded: int, quads: bool) -> np.ndarray:
    """Codes [rows, nblk, bytes] -> [tiles, nblk, bytes/E, TILE_ROWS, E] (module doc): quads are tiled as 4-byte
    words."""
    if not quads:
        tiled = _tile(codes, n_rows_padded)                    # [tiles, nblk, bytes, TILE_ROWS]
        return tiled.reshape(tiled.shape + (1,))
    words = np.ascontiguousarray(codes).view("<u4")            # [rows, nblk, bytes/4]
    tiled = _tile(words, n_rows_padded)                        # [tiles, nblk, bytes/4, TILE_ROWS]
    return tiled.view(np.uint8).reshape(tiled.shape + (4,))


def _tile_any(a, n_rows_padded):
    """_tile for an array, a (super, sub) scale pair or None."""
    if a is None:
        return None
    if isinstance(a, tuple):
        return tuple(_tile_any(x, n_rows_padded) for x in a)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    return _tile(np.ascontiguousarray(a), n_rows_padded)


def _join_any(parts):
    """Concatenate the tiled pieces of consecutive row steps (arrays, pairs or None)."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], tuple):
        return tuple(_join_any([p[i] for p in parts]) for i in range(len(parts[0])))
    return np.ascontiguousarray(np.concatenate(parts) if len(parts) > 1 else parts[0])


# Rows converted per step, to bound the temporaries numpy needs while unpacking a big tensor.
_ROWS_PER_STEP = 2048


def pack_matrix(raw: np.ndarray, qtype: int, n_cols: int, quads: bool = QUADS) -> PackedMatrix:
    """ggml rows (uint8 [n_rows, row_nbytes]) of type `qtype` -> PackedMatrix (tiled codes in quads or byte rows:
    module doc)."""
    qtype = int(qtype)
    if qtype not in ENGINE_TYPES:
        raise ModelError(f"type code {qtype} is not supported by the engine")
    qtype = GGMLType(qtype)
    blck = qtype.block_size
    if n_cols % blck:
        raise ModelError(f"{qtype.lower} row length {n_cols} is not a multiple of {blck}")
    n_rows = raw.shape[0]
    kind = 1 if qtype == GGMLType.BF16 else 0
    if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        # float rows stay row-major (BLAS reads them directly / after a per-chunk widening)
        family, codes, _, _, _, _ = _unpack(np.ascontiguousarray(raw), n_cols, qtype)
        return PackedMatrix(family, n_rows, n_cols, np.array(codes), None, None, 1, kind=kind,
                            src_type=int(qtype))
    n_pad = -(-n_rows // TILE_ROWS) * TILE_ROWS
    parts: list[tuple] = []
    family = bs = None
    step = _ROWS_PER_STEP  # a multiple of TILE_ROWS, so tiles never straddle steps
    for r0 in range(0, n_rows, step):
        chunk = np.asarray(raw[r0:r0 + step])
        family, codes, d, m, bs, zero = _unpack(chunk, n_cols, qtype)
        rows_here = min(step, n_pad - r0)
        parts.append((_tile_codes(codes, rows_here, quads),) + tuple(_tile_any(a, rows_here) for a in (d, m)))

    codes, d, m = (_join_any([p[i] for p in parts]) for i in range(3))
    return PackedMatrix(family, n_rows, n_cols, codes, d, m, bs, zero=zero, kind=kind, src_type=int(qtype))
