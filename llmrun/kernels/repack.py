"""Load-time layouts: ggml's quantized rows -> row tiles the matmul kernels stream through.

Every ggml type is reduced to one of seven *families*, each holding weights as small unsigned integers
(or raw floats) plus one float32 scale `d` and one float32 offset `m` per block of `bs` weights of a
row and an integer zero point per matrix, so that `w = d*(q - zero) + m`. Signed formats (Q8_0, Q6_K,
...) are stored with their codes shifted to unsigned: the kernels then see only non-negative bytes
(which LLVM multiplies with vpmaddwd) and subtract the zero point exactly, in integers.

  U4   4-bit codes, two per byte (byte j of a 32-block: code j low, code j+16 high;     Q4_0 Q4_1 Q4_K
       of a 16-block: code j low, code j+8 high)                                       Q3_K (16)
  U2   2-bit codes of a 16-block in 4 bytes (byte i: code 4k + i at bits 2k, k < 4)   Q2_K
  U5   5-bit codes of a 32-block in 20 bytes: U4's 16 nibble bytes and a 1-bit plane   Q5_0 Q5_1 Q5_K
       (byte 16+i: bit 4 of code 4k+i at bit k)
  U6   6-bit codes of a 16-block in 12 bytes: a nibble plane (bytes j < 8: code j low,   Q6_K
       code j+8 high) and a 2-bit plane (byte 8+i: code 4g+i's bits 4-5 at bits 2g)
  I8   8-bit codes, one per byte, bs = 32 (the kernels take 16 too)                     Q8_0 IQ4_NL
  H16  raw 16-bit floats (kind 0 = IEEE half, 1 = bfloat16), no scales                 F16 BF16
  F32  raw float32, no scales                                                           F32

For U2, U4, U5, U6 and I8 (the tiled families), rows are grouped into tiles of TILE_ROWS and the kernels' innermost
loops run over a tile's independent output rows, without reductions (docs/kernels.md). Codes are uint8 [tile,
block, n, R, E], byte j of row r at [t, b, j // E, r, j % E], in one of two layouts, both of one array type (one
compiled kernel):
  quads (E = 4, on AVX-512 VNNI hosts: QUADS): one 64-byte vector holds bytes 4k..4k+3 of 16 consecutive rows,
      4 bytes per 32-bit lane: the operand `vpdpbusd` multiplies with 4 activations at once (gemv_vnni.py);
  byte rows (E = 1, elsewhere): one 64-byte run is byte j of 64 rows, which the portable loops (gemv.py)
      vectorize over; they read quads through a shuffle into byte rows (blocks._code_rows), 15-48 % slower
      than byte rows on an AVX2 target, so hosts that run them keep byte rows.
The high-bit planes of U5 and U6, and U2's 2-bit fields, are arranged so that, in either layout, one shift and one
mask of a 64-byte vector give the (high) bits of 64 codes (shifts of 32-bit lanes: bits crossing from a neighbouring
byte are masked off), so the kernels rebuild a block's codes in registers or a small scratch (blocks.plane_codes_ir,
blocks.crumb_codes_ir) and multiply them as I8 codes (the VNNI kernels as U4's: codes below 64 are valid s8), the
same integers as when these types were held in I8. H16 and F32 rows stay row-major. Nothing is dequantized to a
float32 copy: U2 keeps 2 bits per weight, U4 4, U5 5, U6 6, I8 8 bits, H16 16 bits (prefill widens one chunk of
rows at a time, gemm_blas.py). Q2_K is 3.13 bits per weight with its int8 sub-block scales and offsets (ggml's 2.63).
Q3_K's 3-bit codes take U4's nibbles (4.56 bits per weight with their scales, for ggml's 3.44): every U4 kernel
already multiplies nibbles, and a 16-weight block is only a block with half the nibble bytes (blocks._block_size).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import numba
from numba import njit

from ..errors import ModelError
from ..ggml import GGML_BLOCK, IQ4_NL_VALUES, GGMLType
from ..runtime import cpu_target_has, free_threads

# Rows per tile. The kernels (blocks.py and the product files beside it) compile it in as a constant (a change
# recompiles them all: numba's cache is keyed by all the kernel sources, runtime.py).
TILE_ROWS = 64

U2, U4, U5, U6, I8, H16, FP32 = "u2", "u4", "u5", "u6", "i8", "h16", "f32"
TILED = (U2, U4, U5, U6, I8)   # the families in row tiles, read by the integer product kernels

# The product kernels' code-kind argument (one int: one compiled signature for every tiled family).
KIND_I8, KIND_U4, KIND_U6, KIND_U5, KIND_U2 = 0, 1, 2, 3, 4
CODE_KIND = {I8: KIND_I8, U4: KIND_U4, U6: KIND_U6, U5: KIND_U5, U2: KIND_U2}

# The code layout (module doc) the kernels this host runs read fastest: quads where the VNNI kernels run (on the
# CPU numba compiles for, which NUMBA_CPU_FEATURES may set apart from the host's), byte rows elsewhere.
VNNI_TARGET = cpu_target_has("avx512vnni", "avx512bw")   # what the IR micro-kernels (qmatmul.VNNI) need
QUADS = TILE_ROWS == 64 and VNNI_TARGET

# The ggml types the engine runs and the family each is reduced to (module doc).
FAMILY = {GGMLType.F32: FP32, GGMLType.F16: H16, GGMLType.BF16: H16,
          GGMLType.Q4_0: U4, GGMLType.Q4_1: U4, GGMLType.Q4_K: U4, GGMLType.Q3_K: U4, GGMLType.Q2_K: U2,
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
    codes: np.ndarray          # U4 uint8 [tiles, nblk, 16/E, R, E] (8/E: 16-blocks); U6 [tiles, nblk, 12/E, R, E];
                               # U5 [tiles, nblk, 20/E, R, E]; U2 [tiles, nblk, 4/E, R, E];
                               # I8 [tiles, nblk, bs/E, R, E] (E: doc);
                               # H16 uint16 [n_rows, n_cols]; F32 float32 [n_rows, n_cols] (row-major)
    d: np.ndarray | tuple | None  # (tiled) per-block scales: uint16 half bits [tiles, nblk, R] when the format's
                               # scales are halves (exact, 16 bits per block); K-quants: a pair (the file's half
                               # super-block scale as uint16 bits [tiles, nblk/G, R], int8/uint8 sub-block scale
                               # [tiles, nblk, R]) whose product is the block scale (exact in float32; ~8 bits per
                               # block instead of 32)
    m: np.ndarray | tuple | None  # offsets, stored like d, or None when every offset is zero (nothing read)
    bs: int = 1                # weights per scale block (U4: 32, U6: 16, I8: 32 or 16)
    zero: int = 0              # integer zero point of the codes: w = d*(q - zero) + m (exact in the kernels)
    kind: int = 0              # H16: 0 = f16, 1 = bf16
    src_type: int = -1
    kernel_scales: tuple | None = field(default=None, repr=False, compare=False)   # blocks._scale_args

    @property
    def code_kind(self) -> int:
        """The product kernels' `kind` argument (KIND_I8 / KIND_U4 / KIND_U6 / KIND_U5 / KIND_U2)."""
        return CODE_KIND[self.family]

    @property
    def nbytes(self) -> int:
        arrays = [self.codes]
        for a in (self.d, self.m):
            arrays += list(a) if isinstance(a, tuple) else [a] if a is not None else []
        return sum(a.nbytes for a in arrays)


def nibble_codes(c: np.ndarray, axis: int = -1) -> np.ndarray:
    """Bytes -> their low nibbles then their high nibbles along `axis` (U4 bytes -> codes on the last axis; ggml's
    nibble bytes read the same way)."""
    return np.concatenate([c & 15, c >> 4], axis=axis)


# The 2-bit fields of a byte: U6's plane (module doc: byte i holds bits 4-5 of code 4g + i at bits 2g..2g+1) and
# U2's codes (code 4k + i at bits 2k..2k+1 of byte i).
_TWO_BIT_SHIFTS = np.array([0, 2, 4, 6], np.uint8)


def six_bit_codes(c: np.ndarray) -> np.ndarray:
    """U6 bytes [..., 12] (module doc) -> codes 0..63 [..., 16]."""
    c = c.astype(np.uint8)
    lo = nibble_codes(c[..., :8])
    hb = (c[..., None, 8:12] >> _TWO_BIT_SHIFTS[:, None]) & 3      # [g][i]
    return lo | (hb.reshape(c.shape[:-1] + (16,)) << 4)


def crumb_codes(c: np.ndarray) -> np.ndarray:
    """U2 bytes [..., 4] (module doc) -> codes 0..3 [..., 16]."""
    c = c.astype(np.uint8)
    return ((c[..., None, :] >> _TWO_BIT_SHIFTS[:, None]) & 3).reshape(c.shape[:-1] + (16,))


# U5 (module doc): bit 4 of code 4k + i is bit k of the 1-bit plane's byte i, k = 0..7.
_BIT_SHIFTS = np.arange(8, dtype=np.uint8)


def five_bit_codes(c: np.ndarray) -> np.ndarray:
    """U5 bytes [..., 20] (module doc) -> codes 0..31 [..., 32]."""
    c = c.astype(np.uint8)
    lo = nibble_codes(c[..., :16])
    hb = (c[..., None, 16:20] >> _BIT_SHIFTS[:, None]) & 1      # [k][i]
    return lo | (hb.reshape(c.shape[:-1] + (32,)) << 4)


# ------------------------------------------------------------------------------------------- the kernel
# ggml type codes as compile-time constants of the kernel below
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _IQ4_NL = (int(GGMLType.Q4_0), int(GGMLType.Q4_1), int(GGMLType.Q5_0),
                                               int(GGMLType.Q5_1), int(GGMLType.Q8_0), int(GGMLType.IQ4_NL))
_Q2_K, _Q3_K, _Q4_K, _Q5_K, _Q6_K = (int(GGMLType.Q2_K), int(GGMLType.Q3_K), int(GGMLType.Q4_K),
                                     int(GGMLType.Q5_K), int(GGMLType.Q6_K))
_IQ4_NL_CODES = (IQ4_NL_VALUES.astype(np.int16) + 128).astype(np.uint8)   # IQ4_NL's values as I8 codes


@dataclass(frozen=True)
class _Layout:
    """How one quantized type is held: family, weights per block, code bytes per block and row, zero point,
    whether its block scales are two-level (K-quants: a half per 256 weights times a small integer per block),
    whether those sub-block scales are signed, and whether it has offsets."""
    family: str
    bs: int
    code_bytes: int
    zero: int
    two_level: bool = False
    signed_sub: bool = False
    has_m: bool = False


_LAYOUTS = {
    GGMLType.Q4_0: _Layout(U4, 32, 16, 8), GGMLType.Q4_1: _Layout(U4, 32, 16, 0, has_m=True),
    GGMLType.Q8_0: _Layout(I8, 32, 32, 128), GGMLType.IQ4_NL: _Layout(I8, 32, 32, 128),
    GGMLType.Q5_0: _Layout(U5, 32, 20, 16), GGMLType.Q5_1: _Layout(U5, 32, 20, 0, has_m=True),
    GGMLType.Q4_K: _Layout(U4, 32, 16, 0, two_level=True, has_m=True),
    GGMLType.Q5_K: _Layout(U5, 32, 20, 0, two_level=True, has_m=True),
    GGMLType.Q6_K: _Layout(U6, 16, 12, 32, two_level=True, signed_sub=True),
    GGMLType.Q3_K: _Layout(U4, 16, 8, 4, two_level=True, signed_sub=True),
    GGMLType.Q2_K: _Layout(U2, 16, 4, 0, two_level=True, has_m=True),
}


@njit(nogil=True)
def _b(raw, i, o):
    """Byte raw[i, o] as an int64 (numba types uint8-with-int64 arithmetic as floats)."""
    return np.int64(raw[i, o])


@njit(nogil=True)
def _half(raw, i, o):
    """The little-endian 16 bits at raw[i, o:o + 2]."""
    return np.uint16(_b(raw, i, o) | (_b(raw, i, o + 1) << 8))


@njit(nogil=True)
def _put(codes, t, b, j, r, v):
    """Byte j of block b of row r of tile t (module doc: quads when E = 4, byte rows when E = 1)."""
    e = codes.shape[4]                  # 4 or 1: j // e = j >> (e >> 1), without a branch
    codes[t, b, j >> (e >> 1), r, j & (e - 1)] = v


@njit(nogil=True)
def _put_plane(codes, t, b, j0, r, high):
    """U5's 1-bit plane (module doc) of a 32-block whose codes' bit 4 are the bits of `high` (bit j: code j's) at
    bytes j0..j0 + 3: byte j0 + i holds code 4k + i's at bit k."""
    for i in range(4):
        v = 0
        for k in range(8):
            v |= ((high >> (4 * k + i)) & 1) << k
        _put(codes, t, b, j0 + i, r, np.uint8(v))


@njit(nogil=True)
def _put_nibble_block16(codes, t, b, r, q):
    """A 16-block's codes q[0:16] (< 16) as U4 bytes: byte i = code i low, code i + 8 high."""
    for i in range(8):
        _put(codes, t, b, i, r, np.uint8(q[i] | (q[i + 8] << 4)))


@njit(nogil=True)
def _put_crumb_block16(codes, t, b, r, q):
    """A 16-block's codes q[0:16] (< 4) as U2 bytes: byte i = codes i, i + 4, i + 8, i + 12 at bits 0, 2, 4, 6."""
    for i in range(4):
        _put(codes, t, b, i, r, np.uint8(q[i] | (q[i + 4] << 2) | (q[i + 8] << 4) | (q[i + 12] << 6)))


@njit(nogil=True)
def _pack_tile(raw, qtype, row0, t, ra, rb, codes, sub_d, sub_m, half_d, half_m, q):
    """Rows ra..rb-1 of tile t from raw's rows (tile row r = raw row t * TILE_ROWS + r - row0); q: a 16-byte
    scratch. Blocks outer, rows inner: one block of 64 rows is a few KB of output, written while it is in L1."""
    nblk = codes.shape[1]
    base = t * TILE_ROWS - row0
    if qtype == _Q4_0 or qtype == _Q4_1 or qtype == _Q8_0 or qtype == _IQ4_NL:
        # d, [m], then the codes: ggml's nibble bytes are U4's (docs/formats.md); Q8_0's int8 shift to I8 codes
        size = 18 if qtype == _Q4_0 or qtype == _IQ4_NL else 20 if qtype == _Q4_1 else 34
        qo = 4 if qtype == _Q4_1 else 2
        for b in range(nblk):
            o = b * size
            for r in range(ra, rb):
                i = base + r
                half_d[t, b, r] = _half(raw, i, o)
                if qtype == _Q4_1:
                    half_m[t, b, r] = _half(raw, i, o + 2)
                if qtype == _Q8_0:
                    for j in range(32):
                        _put(codes, t, b, j, r, np.uint8(_b(raw, i, o + qo + j) ^ 0x80))
                elif qtype == _IQ4_NL:
                    for j in range(16):
                        v = _b(raw, i, o + qo + j)
                        _put(codes, t, b, j, r, _IQ4_NL_CODES[v & 15])
                        _put(codes, t, b, j + 16, r, _IQ4_NL_CODES[v >> 4])
                else:
                    for j in range(16):
                        _put(codes, t, b, j, r, np.uint8(_b(raw, i, o + qo + j)))
    elif qtype == _Q5_0 or qtype == _Q5_1:
        size = 22 if qtype == _Q5_0 else 24
        ho = 2 if qtype == _Q5_0 else 4      # qh, a little-endian uint32 (bit j: bit 4 of code j), then qs
        for b in range(nblk):
            o = b * size
            for r in range(ra, rb):
                i = base + r
                half_d[t, b, r] = _half(raw, i, o)
                if qtype == _Q5_1:
                    half_m[t, b, r] = _half(raw, i, o + 2)
                high = 0
                for k in range(4):
                    high |= _b(raw, i, o + ho + k) << (8 * k)
                for j in range(16):
                    _put(codes, t, b, j, r, np.uint8(_b(raw, i, o + ho + 4 + j)))
                _put_plane(codes, t, b, 16, r, high)
    elif qtype == _Q4_K or qtype == _Q5_K:
        # super-block: d, dmin, 12 bytes of 6-bit scales and mins (docs/formats.md), [qh,] qs
        size = 144 if qtype == _Q4_K else 176
        qs = 16 if qtype == _Q4_K else 48
        for sb in range(nblk // 8):
            o = sb * size
            for r in range(ra, rb):
                i = base + r
                half_d[t, sb, r] = _half(raw, i, o)
                half_m[t, sb, r] = _half(raw, i, o + 2)
                for s in range(8):
                    b = 8 * sb + s
                    if s < 4:
                        sub_d[t, b, r] = _b(raw, i, o + 4 + s) & 63
                        sub_m[t, b, r] = _b(raw, i, o + 8 + s) & 63
                    else:
                        sub_d[t, b, r] = (_b(raw, i, o + 8 + s) & 15) | ((_b(raw, i, o + s) >> 6) << 4)
                        sub_m[t, b, r] = (_b(raw, i, o + 8 + s) >> 4) | ((_b(raw, i, o + 4 + s) >> 6) << 4)
                    # sub-block s = the low (even s) or high nibbles of qs[32 (s // 2):][:32]
                    src, sh = o + qs + 32 * (s >> 1), 4 * (s & 1)
                    for j in range(16):
                        lo = (_b(raw, i, src + j) >> sh) & 15
                        hi = (_b(raw, i, src + j + 16) >> sh) & 15
                        _put(codes, t, b, j, r, np.uint8(lo | (hi << 4)))
                    if qtype == _Q5_K:
                        high = 0      # bit s of qh[l]: bit 4 of code l of sub-block s
                        for j in range(32):
                            high |= ((_b(raw, i, o + 16 + j) >> s) & 1) << j
                        _put_plane(codes, t, b, 16, r, high)
    elif qtype == _Q6_K:
        # ql[128], qh[64], 16 int8 scales, d: weight 128h + 32c + l = low nibble (c < 2) or high nibble of
        # ql[64h + 32 (c % 2) + l], bits 4-5 from bits 2c of qh[32h + l]
        for sb in range(nblk // 16):
            o = sb * 210
            for r in range(ra, rb):
                i = base + r
                half_d[t, sb, r] = _half(raw, i, o + 208)
                for k in range(16):
                    b = 16 * sb + k
                    sub_d[t, b, r] = _b(raw, i, o + 192 + k)
                    h, c, l0 = k >> 3, (k >> 1) & 3, 16 * (k & 1)
                    for j in range(16):
                        lo = (_b(raw, i, o + 64 * h + 32 * (c & 1) + l0 + j) >> (4 * (c >> 1))) & 15
                        hb = (_b(raw, i, o + 128 + 32 * h + l0 + j) >> (2 * c)) & 3
                        q[j] = lo | (hb << 4)
                    for j in range(8):
                        _put(codes, t, b, j, r, np.uint8((q[j] & 15) | ((q[j + 8] & 15) << 4)))
                    for g in range(4):
                        v = 0
                        for p in range(4):
                            v |= ((q[4 * p + g] >> 4) & 3) << (2 * p)
                        _put(codes, t, b, 8 + g, r, np.uint8(v))
    elif qtype == _Q3_K or qtype == _Q2_K:
        # 2-bit codes: weight 128h + 32s + l = bits 2s of qs[32h + l]; Q3_K adds bit 2 = bit w // 32 of hmask[w % 32]
        size = 110 if qtype == _Q3_K else 84
        qs = 32 if qtype == _Q3_K else 16
        for sb in range(nblk // 16):
            o = sb * size
            for r in range(ra, rb):
                i = base + r
                if qtype == _Q3_K:
                    half_d[t, sb, r] = _half(raw, i, o + 108)
                else:
                    half_d[t, sb, r] = _half(raw, i, o + 80)
                    half_m[t, sb, r] = _half(raw, i, o + 82)
                for k in range(16):
                    b = 16 * sb + k
                    if qtype == _Q3_K:   # 6-bit scales: low 4 bits in bytes 0-7, high 2 in bytes 8-11, minus 32
                        low4 = _b(raw, i, o + 96 + k) & 15 if k < 8 else _b(raw, i, o + 96 + k - 8) >> 4
                        hi2 = (_b(raw, i, o + 104 + (k & 3)) >> (2 * (k >> 2))) & 3
                        sub_d[t, b, r] = np.uint8(((low4 | (hi2 << 4)) - 32) & 255)
                    else:
                        sub_d[t, b, r] = _b(raw, i, o + k) & 15
                        sub_m[t, b, r] = _b(raw, i, o + k) >> 4
                    for j in range(16):
                        w = 16 * k + j
                        v = (_b(raw, i, o + qs + 32 * (w >> 7) + (w & 31)) >> (2 * ((w >> 5) & 3))) & 3
                        if qtype == _Q3_K:
                            v |= ((_b(raw, i, o + (w & 31)) >> (w >> 5)) & 1) << 2
                        q[j] = v
                    if qtype == _Q3_K:
                        _put_nibble_block16(codes, t, b, r, q)
                    else:
                        _put_crumb_block16(codes, t, b, r, q)


@njit(cache=True, nogil=True)
def _pack_rows(raw, qtype, row0, t_lo, t_hi, codes, sub_d, sub_m, half_d, half_m):
    """ggml rows raw (uint8 [n, row bytes], read-only) of type qtype -> the parts of tiles t_lo..t_hi-1 that hold
    output rows row0..row0 + n: codes [tiles, nblk, bytes / E, R, E], sub-block scales / offsets uint8 [tiles,
    nblk, R] (K-quants), halves uint16 [tiles, nblk, R] (half-scaled types) or [tiles, nblk / G, R] (K-quants'
    super-block d and dmin). Outputs a type has no use for are ignored."""
    n = raw.shape[0]
    q = np.empty(16, np.uint8)
    for t in range(t_lo, t_hi):
        ra = max(row0, t * TILE_ROWS) - t * TILE_ROWS
        rb = min(row0 + n, (t + 1) * TILE_ROWS) - t * TILE_ROWS
        _pack_tile(raw, qtype, row0, t, ra, rb, codes, sub_d, sub_m, half_d, half_m, q)


def _pack_part(raw, qtype: int, row0: int, outputs: tuple) -> None:
    """_pack_rows over the tiles of one part, split among threads: Python threads around a serial nogil kernel,
    not a numba parallel region. (An OpenMP team started in the loading thread made every parallel region that
    another thread starts later, the server's scheduler thread's decode, run at a third of its speed.) Tiles never
    share bytes, so the threads need no locks."""
    t0 = row0 // TILE_ROWS
    t1 = (row0 + raw.shape[0] + TILE_ROWS - 1) // TILE_ROWS
    n = max(1, min(free_threads(numba.get_num_threads()), (t1 - t0) // 4))   # >= 4 tiles a thread
    bounds = [t0 + (t1 - t0) * k // n for k in range(n + 1)]
    threads = [threading.Thread(target=_pack_rows, args=(raw, qtype, row0, bounds[k], bounds[k + 1], *outputs))
               for k in range(1, n)]
    for th in threads:
        th.start()
    try:
        _pack_rows(raw, qtype, row0, bounds[0], bounds[1], *outputs)
    finally:
        for th in threads:
            th.join()


def _read_only(part: np.ndarray) -> np.ndarray:
    """A C-contiguous read-only uint8 view (one compiled signature for file pages and arrays alike)."""
    v = np.ascontiguousarray(np.asarray(part, dtype=np.uint8)).view()
    v.flags.writeable = False
    return v


def pack_matrix(raw, qtype: int, n_cols: int, quads: bool = QUADS) -> PackedMatrix:
    """ggml rows (uint8 [n_rows, row_nbytes], or a list of such parts stacked in order, e.g. Q, K and V) of type
    `qtype` -> PackedMatrix (tiled codes in quads or byte rows: module doc)."""
    parts = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    qtype = int(qtype)
    if qtype not in ENGINE_TYPES:
        raise ModelError(f"type code {qtype} is not supported by the engine")
    qtype = GGMLType(qtype)
    blck, size = GGML_BLOCK[qtype]
    if n_cols % blck:
        raise ModelError(f"{qtype.lower} row length {n_cols} is not a multiple of {blck}")
    row_bytes = n_cols // blck * size
    parts = [_read_only(p) for p in parts]
    for p in parts:
        if p.ndim != 2 or p.shape[1] != row_bytes:
            raise ModelError(f"{qtype.lower} rows of {n_cols} weights take {row_bytes} bytes, got shape "
                             f"{list(p.shape)}")
    n_rows = sum(p.shape[0] for p in parts)
    if qtype in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        # float rows stay row-major (BLAS reads them directly / after a per-chunk widening)
        rows = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
        if qtype == GGMLType.F32:
            return PackedMatrix(FP32, n_rows, n_cols, rows.view("<f4"), None, None, 1, src_type=int(qtype))
        return PackedMatrix(H16, n_rows, n_cols, rows.view("<u2"), None, None, 1,
                            kind=1 if qtype == GGMLType.BF16 else 0, src_type=int(qtype))
    lay = _LAYOUTS[qtype]
    tiles, nblk, E = -(-n_rows // TILE_ROWS), n_cols // lay.bs, 4 if quads else 1
    n_half = n_cols // blck if lay.two_level else nblk     # one half per super-block or per block
    codes = np.zeros((tiles, nblk, lay.code_bytes // E, TILE_ROWS, E), np.uint8)
    half_d = np.zeros((tiles, n_half, TILE_ROWS), np.uint16)
    unused_u16, unused_u8 = np.zeros((1, 1, 1), np.uint16), np.zeros((1, 1, 1), np.uint8)
    half_m = np.zeros_like(half_d) if lay.has_m else unused_u16
    sub_d = np.zeros((tiles, nblk, TILE_ROWS), np.uint8) if lay.two_level else unused_u8
    sub_m = np.zeros_like(sub_d) if lay.two_level and lay.has_m else unused_u8
    row0 = 0
    for p in parts:
        _pack_part(p, int(qtype), row0, (codes, sub_d, sub_m, half_d, half_m))
        row0 += p.shape[0]
    if not lay.two_level:
        d, m = half_d, half_m if lay.has_m else None
    else:
        d = (half_d, sub_d.view(np.int8) if lay.signed_sub else sub_d)
        m = None
        if lay.has_m:
            half_m ^= np.uint16(0x8000)       # -dmin (sign bit): w = d*q - dmin*m (docs/formats.md)
            half_m[-1, :, n_rows - (tiles - 1) * TILE_ROWS:] = 0     # padding rows: +0.0, not -0.0
            m = (half_m, sub_m)
    return PackedMatrix(lay.family, n_rows, n_cols, codes, d, m, lay.bs, zero=lay.zero, src_type=int(qtype))
