"""KV cache storage types (llama.cpp's type_k / type_v): f32, f16, q8_0, and the kernels' access to them.

K is kept transposed in blocks of positions, [n_head_kv, ceil(capacity / KB), k_dim, KB], and V as
[n_head_kv, capacity, v_dim] (ops.attention; the capacity is V's). Within a block, dimension i of KB consecutive positions is one
contiguous run, so the scores of many positions build up as contiguous multiply-adds; and a block (8 KiB for 64
f16 dimensions) is a few pages: reading or writing the keys of a few positions touches 2 pages per K/V group,
not k_dim (one per dimension row, as a [k_dim, capacity] layout does). With the weights streaming through the
caches every token, those page walks and cold lines made decode attention and its cache writes 3-4x slower
(2026-12-01, SmolLM2, 2-vCPU EPYC). KB = K_BLOCK (64), or the capacity when that is smaller; the last
block's positions past the capacity are never used.
  f32   float32
  f16   IEEE half bits (uint16): rounded to nearest even when written (as numpy and ggml do), widened exactly
  q8_0  a pair (int8 codes, half-bits scales): one scale per 32 values of one position's head vector
        (ggml's Q8_0 block: d = max|x| / 127, q = round(x / d); here q is rounded against the stored half d, so
        that d * q is what was meant). K scales [n_head_kv, ceil(capacity / KB), k_dim / 32, KB], V scales
        [n_head_kv, capacity, v_dim / 32].
A cache of any type is one numba value, an array or a pair; the helpers below compile to the code of each
type, so that ops.rope_store and ops.attention keep one source. Leading dimensions may be added in front
(the server's pools: [n_slots, n_head_kv, ...]).
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ..errors import InvalidArgumentError
from ..runtime import cpu_target_has

KV_TYPES = ("f32", "f16", "q8_0")
GGML_CODES = {0: "f32", 1: "f16", 8: "q8_0"}   # llama-cpp-python passes ggml type numbers
Q8_BLOCK = 32
DEFAULT_KV_TYPE = "f16"
BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 1.0 + 2.0 / Q8_BLOCK}   # per value, scales included
K_BLOCK = 64   # positions per K block (see above)


def k_shape(lead: tuple, n_head_kv: int, k_dim: int, capacity: int) -> tuple:
    """K's shape for `capacity` slots: whole blocks of KB = K_BLOCK positions (or one block of a smaller
    capacity); the last block's positions past the capacity are never used."""
    kb = min(K_BLOCK, capacity)
    return lead + (n_head_kv, -(-capacity // kb), k_dim, kb)


def kv_type(value, name: str) -> str:
    """A type_k / type_v value (a name or a ggml type number; None: the default) -> its name."""
    if value is None:
        return DEFAULT_KV_TYPE
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if int(value) in GGML_CODES:
            return GGML_CODES[int(value)]
    elif isinstance(value, str) and value.lower() in KV_TYPES:
        return value.lower()
    raise InvalidArgumentError(f"{name} must be one of {', '.join(KV_TYPES)} (or ggml type 0, 1, 8), "
                               f"got {value!r:.40}")


def check_head_dims(kind: str, k_dim: int, v_dim: int, where: str, names=("type_k", "type_v")) -> None:
    for t, dim, name in zip(kind, (k_dim, v_dim), names):
        if t == "q8_0" and dim % Q8_BLOCK:
            raise InvalidArgumentError(f"{where}: a q8_0 KV cache needs head sizes that are multiples of "
                                       f"{Q8_BLOCK} ({name}: this model's is {dim})")


# ------------------------------------------------------------------------------------------ numpy side
def empty_cache(shape: tuple, kind: str, blocks_axis: int):
    """A zeroed cache of `shape` (K: [..., k_dim, KB], blocks along axis -2; V: [..., cap, v_dim], axis -1).
    Zeros: the pages are only committed as the context fills."""
    if kind == "f32":
        return np.zeros(shape, np.float32)
    if kind == "f16":
        return np.zeros(shape, np.uint16)
    scales = list(shape)
    scales[blocks_axis] //= Q8_BLOCK
    return np.zeros(shape, np.int8), np.zeros(tuple(scales), np.uint16)


def take(cache, index):
    """cache[index] of an array or a pair (the server's pools -> one slot's cache); numba too."""
    return tuple(a[index] for a in cache) if isinstance(cache, tuple) else cache[index]


def codes(cache):
    """The array holding the cache's values (its shape is the cache's shape); numba too."""
    return cache[0] if isinstance(cache, tuple) else cache


def nbytes(cache) -> int:
    return sum(a.nbytes for a in cache) if isinstance(cache, tuple) else cache.nbytes


def _half_to_f32(bits: np.ndarray) -> np.ndarray:
    return bits.view(np.float16).astype(np.float32)


def _unblocked(a: np.ndarray) -> np.ndarray:
    """One group's K blocks [n_blocks, rows, KB] as [rows, n_blocks * KB] (slot p in column p)."""
    return a.transpose(1, 0, 2).reshape(a.shape[1], -1)


def k_f32(k, g: int, slots) -> np.ndarray:
    """K of group g at `slots` (a slice or an index array) as float32 [k_dim, n] (the BLAS attention)."""
    if isinstance(k, tuple):
        codes, scales = _unblocked(k[0][g])[:, slots], _unblocked(k[1][g])[:, slots]
        return codes.astype(np.float32) * np.repeat(_half_to_f32(scales), Q8_BLOCK, axis=0)
    part = _unblocked(k[g])[:, slots]
    return _half_to_f32(part) if part.dtype == np.uint16 else part


def v_f32(v, g: int, slots) -> np.ndarray:
    """V of group g at `slots` as float32 [n, v_dim]."""
    if isinstance(v, tuple):
        codes, scales = v[0][g][slots], v[1][g][slots]
        return codes.astype(np.float32) * np.repeat(_half_to_f32(scales), Q8_BLOCK, axis=1)
    part = v[g][slots]
    return _half_to_f32(part) if part.dtype == np.uint16 else part


# ------------------------------------------------------------------------------------------ numba side
@intrinsic
def _as_f32(typingctx, u):
    """The float32 whose bits are the uint32 u."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@intrinsic
def _as_u32(typingctx, f):
    """The bits of the float32 f."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


HALF_SCALE = np.float32(2.0 ** 112)   # a half's bits moved into float32's place are its value * 2**-112


@njit(inline="always")
def half_to_f32(h):
    """Half bits -> float32, exact (subnormal halves too; a cache holds no inf/nan)."""
    u = np.uint32(h)
    return _as_f32(((u & np.uint32(0x8000)) << 16) | ((u & np.uint32(0x7FFF)) << 13)) * HALF_SCALE


@intrinsic
def _widen16(typingctx, src, dst, j, r):
    """dst[j:j+r] = the halves src[j:j+r] as float32, r <= 16: one fpext of a vector (vcvtph2ps), exact like
    half_to_f32; a masked load and store for r < 16 (the rest of a run). Both 1-D and contiguous."""
    sig = types.void(src, dst, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        sp = context.make_array(signature.args[0])(context, builder, args[0]).data
        dp = context.make_array(signature.args[1])(context, builder, args[1]).data
        vh, vf = ir.VectorType(ir.HalfType(), 16), ir.VectorType(ir.FloatType(), 16)
        i32, i64 = ir.IntType(32), ir.IntType(64)
        lanes = ir.Constant(ir.VectorType(i64, 16), list(range(16)))
        r = builder.insert_element(ir.Constant(ir.VectorType(i64, 16), ir.Undefined), args[3], ir.Constant(i32, 0))
        r = builder.shuffle_vector(r, r, ir.Constant(ir.VectorType(i32, 16), [0] * 16))
        mask = builder.icmp_unsigned("<", lanes, r)
        load = _llvm_fn(builder, "llvm.masked.load.v16f16.p0", vh, [ir.PointerType(), i32, mask.type, vh])
        store = _llvm_fn(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(),
                         [vf, ir.PointerType(), i32, mask.type])
        src_p = builder.bitcast(builder.gep(sp, [args[2]]), ir.PointerType())
        dst_p = builder.bitcast(builder.gep(dp, [args[2]]), ir.PointerType())
        v = builder.call(load, [src_p, ir.Constant(i32, 2), mask, ir.Constant(vh, ir.Undefined)])
        builder.call(store, [builder.fpext(v, vf), dst_p, ir.Constant(i32, 4), mask])
        return context.get_dummy_value()
    return sig, codegen


def _llvm_fn(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


@njit(inline="always")
def _widen_halves_vector(src, dst, n):
    for j in range(0, n, 16):
        _widen16(src, dst, j, min(16, n - j))


@njit(inline="always")
def _widen_halves_scalar(src, dst, n):
    for j in range(n):
        dst[j] = half_to_f32(src[j])


# The cache's halves widened 16 at a time where the CPU converts vectors of halves (x86 F16C, every arm64):
# the scalar bit arithmetic of half_to_f32 did not vectorize and was ~2/3 of decode attention's time at short
# contexts (2 us of 3 per K/V group, SmolLM2, 70 positions). Elsewhere LLVM would need a runtime library call.
_widen_halves = (_widen_halves_vector if cpu_target_has("f16c") or platform.machine().lower() in ("arm64", "aarch64")
                 else _widen_halves_scalar)


@njit(inline="always")
def f32_to_half(x):
    """float32 -> half bits, rounded to nearest even (numpy's astype(float16)); integer arithmetic only, so
    fast-math callers cannot change it. Beyond the half range: inf (NaN stays NaN)."""
    u = _as_u32(np.float32(x))
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x47800000):                 # >= 65536, inf or nan
        h = np.uint32(0x7E00) if a > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif a >= np.uint32(0x38800000):               # a normal half (values rounding up to 65536 give inf)
        h = (a + np.uint32(0xC8000FFF) + ((a >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13)
    else:                                          # a subnormal half or zero: m * 2**(e-150) in units of 2**-24
        e = a >> np.uint32(23)
        shift = np.uint32(126) - e                 # >= 14
        if shift > np.uint32(24):
            h = np.uint32(0)
        else:
            m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
            half_ulp = np.uint32(1) << (shift - np.uint32(1))
            h = (m + half_ulp - np.uint32(1) + ((m >> shift) & np.uint32(1))) >> shift
    return np.uint16(h | sign)


def capacity(v):
    """The slots of a cache, read from its V ([.., n_head_kv, capacity, v_dim]: K's last block may have unused
    positions); numba too."""
    return codes(v).shape[-2]


def store_k(k, g, p, row):
    """K[g, :, p] = row (float32 [k_dim]) in the cache's type."""


def store_v(v, g, p, row):
    """V[g, p, :] = row (float32 [v_dim]) in the cache's type."""


def k_run(k, g, i, lo, n, buf):
    """Row i of group g's K at slots lo..lo+n (lo + n <= capacity), as float32 into buf[:n] (returned)."""


def k_block(k, g, b, out):
    """Group g's whole K block b ([k_dim, KB] positions b*KB..) as float32 into out (the same shape): one run of
    the cache's memory, widened in one pass (a run per dimension cost ~1.2 us of a 4-slot decode job's ~4)."""


def v_rows(v, g, slot, n, buf):
    """V[g, slot:slot+n] (slot + n <= capacity) as float32 into buf[:n] (returned): one run of the cache's
    memory, widened in one pass (a call per row cost ~1 us of a 4-slot decode job's ~7)."""


@overload(codes, inline="always")
def _codes(cache):
    if isinstance(cache, types.BaseTuple):
        return lambda cache: cache[0]
    return lambda cache: cache


@overload(capacity, inline="always")
def _capacity(v):
    return lambda v: codes(v).shape[-2]


@overload(take, inline="always")
def _take(cache, index):
    if isinstance(cache, types.BaseTuple):
        return lambda cache, index: (cache[0][index], cache[1][index])
    return lambda cache, index: cache[index]


@njit(inline="always")
def _q8_scale(amax):
    """The half scale of a block whose largest magnitude is amax, and its float32 value."""
    h = f32_to_half(amax / np.float32(127.0))
    return h, half_to_f32(h)


@njit(inline="always")
def _q8_code(x, inv):
    return np.int8(max(-127, min(127, round(x * inv))))


@njit(inline="always")
def _store_q8(c, s, row):
    """One position's row as q8_0 blocks: codes into the 1-D view c, half scales into the 1-D view s."""
    for b in range(row.shape[0] // Q8_BLOCK):
        amax = np.float32(0.0)
        for i in range(b * Q8_BLOCK, (b + 1) * Q8_BLOCK):
            amax = max(amax, abs(row[i]))
        h, d = _q8_scale(amax)
        inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        s[b] = h
        for i in range(b * Q8_BLOCK, (b + 1) * Q8_BLOCK):
            c[i] = _q8_code(row[i], inv)


@njit(inline="always")
def _store_half(dst, row):
    for i in range(row.shape[0]):
        dst[i] = f32_to_half(row[i])


@njit(inline="always")
def _store_f32(dst, row):
    for i in range(row.shape[0]):
        dst[i] = row[i]


# K is stored transposed in blocks ([group, block, dim, position in block]) and V not ([group, position, dim]):
# both stores are the same row store into a 1-D view, strided for K.
@overload(store_k, inline="always", jit_options={"fastmath": True})
def _store_k(k, g, p, row):
    if isinstance(k, types.BaseTuple):
        def q8(k, g, p, row):
            kb = k[0].shape[-1]
            _store_q8(k[0][g, p // kb, :, p % kb], k[1][g, p // kb, :, p % kb], row)
        return q8

    store = _store_half if k.dtype == types.uint16 else _store_f32

    def plain(k, g, p, row):
        kb = k.shape[-1]
        store(k[g, p // kb, :, p % kb], row)
    return plain


@overload(store_v, inline="always", jit_options={"fastmath": True})
def _store_v(v, g, p, row):
    if isinstance(v, types.BaseTuple):
        def q8(v, g, p, row):
            _store_q8(v[0][g, p, :], v[1][g, p, :], row)
        return q8

    store = _store_half if v.dtype == types.uint16 else _store_f32

    def plain(v, g, p, row):
        store(v[g, p, :], row)
    return plain


def _k_piece(k, g, b, i, a, m, out):
    """Row i of group g's K block b at positions a..a+m of the block, as float32 into out[:m]."""


@overload(_k_piece, inline="always", jit_options={"fastmath": True})
def _k_piece_impl(k, g, b, i, a, m, out):
    if isinstance(k, types.BaseTuple):
        def q8(k, g, b, i, a, m, out):
            src, sc = k[0][g, b, i, a:a + m], k[1][g, b, i // Q8_BLOCK, a:a + m]
            for j in range(m):
                out[j] = np.float32(src[j]) * half_to_f32(sc[j])
        return q8
    if k.dtype == types.uint16:
        def f16(k, g, b, i, a, m, out):
            _widen_halves(k[g, b, i, a:a + m], out, m)
        return f16

    def f32(k, g, b, i, a, m, out):
        out[:m] = k[g, b, i, a:a + m]
    return f32


@overload(k_run, inline="always", jit_options={"fastmath": True})
def _k_run(k, g, i, lo, n, buf):
    def run(k, g, i, lo, n, buf):
        kb = codes(k).shape[-1]
        for b in range(lo // kb, (lo + n + kb - 1) // kb):   # a run crosses blocks: one piece per block
            p0, p1 = max(lo, b * kb), min(lo + n, (b + 1) * kb)
            _k_piece(k, g, b, i, p0 - b * kb, p1 - p0, buf[p0 - lo:p1 - lo])
        return buf[:n]
    return run


@overload(k_block, inline="always", jit_options={"fastmath": True})
def _k_block(k, g, b, out):
    if isinstance(k, types.BaseTuple):
        def q8(k, g, b, out):
            for i in range(out.shape[0]):
                _k_piece(k, g, b, i, 0, out.shape[1], out[i])
        return q8
    if k.dtype == types.uint16:
        def f16(k, g, b, out):
            n = out.shape[0] * out.shape[1]
            _widen_halves(k[g, b].reshape(-1), out.reshape(-1), n)
        return f16

    def f32(k, g, b, out):
        out[:] = k[g, b]
    return f32


@overload(v_rows, inline="always", jit_options={"fastmath": True})
def _v_rows(v, g, slot, n, buf):
    if isinstance(v, types.BaseTuple):
        def q8(v, g, slot, n, buf):
            c, s = v
            for r in range(n):
                src, sc = c[g, slot + r], s[g, slot + r]
                for j in range(src.shape[0]):
                    buf[r, j] = np.float32(src[j]) * half_to_f32(sc[j // Q8_BLOCK])
            return buf[:n]
        return q8
    if v.dtype == types.uint16:
        def f16(v, g, slot, n, buf):
            d = v.shape[-1]
            start = (g * v.shape[-2] + slot) * d
            _widen_halves(v.reshape(-1)[start:start + n * d], buf.reshape(-1), n * d)
            return buf[:n]
        return f16

    def f32(v, g, slot, n, buf):
        buf[:n] = v[g, slot:slot + n]
        return buf[:n]
    return f32
