"""KV cache storage types (llama.cpp's type_k / type_v): f32, f16, q8_0, and the kernels' access to them.

K is kept transposed, [n_head_kv, k_dim, capacity], and V as [n_head_kv, capacity, v_dim] (ops.attention).
  f32   float32
  f16   IEEE half bits (uint16): rounded to nearest even when written (as numpy and ggml do), widened exactly
  q8_0  a pair (int8 codes, half-bits scales): one scale per 32 values of one position's head vector
        (ggml's Q8_0 block: d = max|x| / 127, q = round(x / d); here q is rounded against the stored half d, so
        that d * q is what was meant). K scales [n_head_kv, k_dim / 32, capacity], V scales
        [n_head_kv, capacity, v_dim / 32].
A cache of any type is one numba value, an array or a pair; the helpers below compile to the code of each
type, so that ops.rope_store and ops.attention keep one source. Leading dimensions may be added in front
(the server's pools: [n_slots, n_head_kv, ...]).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from ..errors import InvalidArgumentError

KV_TYPES = ("f32", "f16", "q8_0")
GGML_CODES = {0: "f32", 1: "f16", 8: "q8_0"}   # llama-cpp-python passes ggml type numbers
Q8_BLOCK = 32
DEFAULT_KV_TYPE = "f16"
BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 1.0 + 2.0 / Q8_BLOCK}   # per value, scales included


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
    """A zeroed cache of `shape` (K: [..., k_dim, cap], blocks along axis -2; V: [..., cap, v_dim], axis -1).
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


def k_f32(k, g: int, slots) -> np.ndarray:
    """K of group g at `slots` (a slice or an index array) as float32 [k_dim, n] (the BLAS attention)."""
    if isinstance(k, tuple):
        codes, scales = k[0][g][:, slots], k[1][g][:, slots]
        return codes.astype(np.float32) * np.repeat(_half_to_f32(scales), Q8_BLOCK, axis=0)
    part = k[g][:, slots]
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


def store_k(k, g, p, row):
    """K[g, :, p] = row (float32 [k_dim]) in the cache's type."""


def store_v(v, g, p, row):
    """V[g, p, :] = row (float32 [v_dim]) in the cache's type."""


def k_run(k, g, i, lo, n, buf):
    """Row i of group g's K at slots lo..lo+n, as float32 into buf[:n] (returned)."""


def v_row(v, g, slot, buf):
    """V[g, slot] as float32 into buf (returned)."""


@overload(codes, inline="always")
def _codes(cache):
    if isinstance(cache, types.BaseTuple):
        return lambda cache: cache[0]
    return lambda cache: cache


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


# K is stored transposed ([group, dim, position]) and V not ([group, position, dim]): both stores are the same
# row store into a 1-D view, strided for K.
@overload(store_k, inline="always", jit_options={"fastmath": True})
def _store_k(k, g, p, row):
    if isinstance(k, types.BaseTuple):
        def q8(k, g, p, row):
            _store_q8(k[0][g, :, p], k[1][g, :, p], row)
        return q8

    store = _store_half if k.dtype == types.uint16 else _store_f32

    def plain(k, g, p, row):
        store(k[g, :, p], row)
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


@overload(k_run, inline="always", jit_options={"fastmath": True})
def _k_run(k, g, i, lo, n, buf):
    if isinstance(k, types.BaseTuple):
        def q8(k, g, i, lo, n, buf):
            c, s = k
            src, sc = c[g, i, lo:lo + n], s[g, i // Q8_BLOCK, lo:lo + n]
            for j in range(n):
                buf[j] = np.float32(src[j]) * half_to_f32(sc[j])
            return buf[:n]
        return q8
    if k.dtype == types.uint16:
        def f16(k, g, i, lo, n, buf):
            src = k[g, i, lo:lo + n]
            for j in range(n):
                buf[j] = half_to_f32(src[j])
            return buf[:n]
        return f16

    def f32(k, g, i, lo, n, buf):
        buf[:n] = k[g, i, lo:lo + n]
        return buf[:n]
    return f32


@overload(v_row, inline="always", jit_options={"fastmath": True})
def _v_row(v, g, slot, buf):
    if isinstance(v, types.BaseTuple):
        def q8(v, g, slot, buf):
            c, s = v
            src, sc = c[g, slot], s[g, slot]
            for j in range(src.shape[0]):
                buf[j] = np.float32(src[j]) * half_to_f32(sc[j // Q8_BLOCK])
            return buf
        return q8
    if v.dtype == types.uint16:
        def f16(v, g, slot, buf):
            src = v[g, slot]
            for j in range(src.shape[0]):
                buf[j] = half_to_f32(src[j])
            return buf
        return f16

    def f32(v, g, slot, buf):
        buf[:] = v[g, slot]
        return buf
    return f32
