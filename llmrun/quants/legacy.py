"""The legacy 32-weight block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (docs/formats.md §3.1).

Quantizers follow ggml's `quantize_row_<type>_ref` (what llama-quantize runs without an imatrix) and
must stay byte-identical to it, so every step is float32 in ggml's order, with no fused multiply-add
(Numba without fastmath never contracts a*b+c), and C's casts are reproduced: truncation toward zero for
the 4/5-bit codes, roundf (half away from zero) for Q8_0. The fp16 scales are rounded once, at the end;
the codes use the unrounded float32 scale, as in ggml.

Layout of every block: fp16 scale `d` (then fp16 `m` for the _1 types), then for the 5-bit types a
u32 `qh` holding bit 4 of weight j at bit j, then the nibbles (weight j low, weight j+16 high) or int8s.
Kernels run over all blocks of the tensor at once (blocks are contiguous, rows do not matter) in
parallel; the fp16 header fields are converted by numpy outside the kernels.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..errors import QuantError
from ..ggml import GGML_BLOCK, GGMLType, fp16_bytes, fp16_values
from .common import roundf

QK = GGML_BLOCK[GGMLType.Q4_0][0]   # weights per block, 32 in all five formats
_F32 = np.float32


# --- quantize kernels: xb [n_blocks, 32] float32 -> scales [n_blocks, n_scales] float32 + payload in raw ---

@njit(cache=True)
def _signed_absmax(xb, i):
    """The element of block i with the largest magnitude, sign kept; the first one wins ties."""
    amax = _F32(0.0)
    vmax = _F32(0.0)
    for j in range(QK):
        v = xb[i, j]
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    return vmax


@njit(cache=True)
def _min_max(xb, i):
    lo = _F32(3.4028234663852886e38)
    hi = _F32(-3.4028234663852886e38)
    for j in range(QK):
        v = xb[i, j]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return lo, hi


@njit(cache=True)
def _inverse(d):
    return _F32(1.0) / d if d != _F32(0.0) else _F32(0.0)


@njit(cache=True, parallel=True)
def _quantize_q4_0(xb, scales, raw):
    for i in prange(xb.shape[0]):
        d = _signed_absmax(xb, i) / _F32(-8.0)
        inv = _inverse(d)
        scales[i, 0] = d
        for j in range(QK // 2):
            q0 = min(15, int(xb[i, j] * inv + _F32(8.5)))
            q1 = min(15, int(xb[i, j + 16] * inv + _F32(8.5)))
            raw[i, 2 + j] = q0 | (q1 << 4)


@njit(cache=True, parallel=True)
def _quantize_q4_1(xb, scales, raw):
    for i in prange(xb.shape[0]):
        lo, hi = _min_max(xb, i)
        d = (hi - lo) / _F32(15.0)
        inv = _inverse(d)
        scales[i, 0] = d
        scales[i, 1] = lo
        for j in range(QK // 2):
            q0 = min(15, int((xb[i, j] - lo) * inv + _F32(0.5)))
            q1 = min(15, int((xb[i, j + 16] - lo) * inv + _F32(0.5)))
            raw[i, 4 + j] = q0 | (q1 << 4)


@njit(cache=True)
def _store_5bit(raw, i, off, j, q0, q1, qh):
    """Low nibbles into qs at raw[i, off + j]; returns qh with the two fifth bits added."""
    raw[i, off + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4)
    return qh | (((q0 & 0x10) >> 4) << j) | (((q1 & 0x10) >> 4) << (j + 16))


@njit(cache=True)
def _store_qh(raw, i, off, qh):
    for b in range(4):
        raw[i, off + b] = (qh >> (8 * b)) & 0xFF


@njit(cache=True, parallel=True)
def _quantize_q5_0(xb, scales, raw):
    for i in prange(xb.shape[0]):
        d = _signed_absmax(xb, i) / _F32(-16.0)
        inv = _inverse(d)
        scales[i, 0] = d
        qh = 0
        for j in range(QK // 2):
            q0 = min(31, int(xb[i, j] * inv + _F32(16.5)))
            q1 = min(31, int(xb[i, j + 16] * inv + _F32(16.5)))
            qh = _store_5bit(raw, i, 6, j, q0, q1, qh)
        _store_qh(raw, i, 2, qh)


@njit(cache=True, parallel=True)
def _quantize_q5_1(xb, scales, raw):
    for i in prange(xb.shape[0]):
        lo, hi = _min_max(xb, i)
        d = (hi - lo) / _F32(31.0)
        inv = _inverse(d)
        scales[i, 0] = d
        scales[i, 1] = lo
        qh = 0
        for j in range(QK // 2):
            # ggml does not clamp here: (x - min) / d never exceeds 31 by more than rounding
            q0 = int((xb[i, j] - lo) * inv + _F32(0.5))
            q1 = int((xb[i, j + 16] - lo) * inv + _F32(0.5))
            qh = _store_5bit(raw, i, 8, j, q0, q1, qh)
        _store_qh(raw, i, 4, qh)


@njit(cache=True, parallel=True)
def _quantize_q8_0(xb, scales, raw):
    for i in prange(xb.shape[0]):
        amax = _F32(0.0)
        for j in range(QK):
            amax = max(amax, abs(xb[i, j]))
        d = amax / _F32(127.0)
        inv = _inverse(d)
        scales[i, 0] = d
        for j in range(QK):
            raw[i, 2 + j] = roundf(xb[i, j] * inv) & 0xFF


# --- dequantize kernels: raw [n_blocks, bytes] + scales [n_blocks, n_scales] float32 -> out [n_blocks, 32] ---

@njit(cache=True, parallel=True)
def _dequantize_q4_0(raw, scales, out):
    for i in prange(raw.shape[0]):
        d = scales[i, 0]
        for j in range(QK // 2):
            b = raw[i, 2 + j]
            out[i, j] = _F32((b & 0x0F) - 8) * d
            out[i, j + 16] = _F32((b >> 4) - 8) * d


@njit(cache=True, parallel=True)
def _dequantize_q4_1(raw, scales, out):
    for i in prange(raw.shape[0]):
        d = scales[i, 0]
        m = scales[i, 1]
        for j in range(QK // 2):
            b = raw[i, 4 + j]
            out[i, j] = _F32(b & 0x0F) * d + m
            out[i, j + 16] = _F32(b >> 4) * d + m


@njit(cache=True)
def _load_qh(raw, i, off):
    qh = 0
    for b in range(4):
        qh |= np.int64(raw[i, off + b]) << (8 * b)
    return qh


@njit(cache=True, parallel=True)
def _dequantize_q5_0(raw, scales, out):
    for i in prange(raw.shape[0]):
        d = scales[i, 0]
        qh = _load_qh(raw, i, 2)
        for j in range(QK // 2):
            b = raw[i, 6 + j]
            q0 = (b & 0x0F) | (((qh >> j) & 1) << 4)
            q1 = (b >> 4) | (((qh >> (j + 16)) & 1) << 4)
            out[i, j] = _F32(q0 - 16) * d
            out[i, j + 16] = _F32(q1 - 16) * d


@njit(cache=True, parallel=True)
def _dequantize_q5_1(raw, scales, out):
    for i in prange(raw.shape[0]):
        d = scales[i, 0]
        m = scales[i, 1]
        qh = _load_qh(raw, i, 4)
        for j in range(QK // 2):
            b = raw[i, 8 + j]
            q0 = (b & 0x0F) | (((qh >> j) & 1) << 4)
            q1 = (b >> 4) | (((qh >> (j + 16)) & 1) << 4)
            out[i, j] = _F32(q0) * d + m
            out[i, j + 16] = _F32(q1) * d + m


@njit(cache=True, parallel=True)
def _dequantize_q8_0(raw, scales, out):
    for i in prange(raw.shape[0]):
        d = scales[i, 0]
        for j in range(QK):
            q = np.int32(raw[i, 2 + j])
            out[i, j] = _F32(q - 256 if q > 127 else q) * d


# --- numpy wrappers: the contract's fn(x2d) -> raw and fn(raw, n_cols) -> float32 ---

class _Format:
    """One block format: its type, fp16 scale fields at the block's start, and its two kernels."""

    def __init__(self, qtype: GGMLType, n_scales: int, quantize_kernel, dequantize_kernel):
        assert qtype.block_size == QK
        self.qtype = qtype
        self.name = qtype.lower
        self.block_bytes = qtype.type_size
        self.n_scales = n_scales
        self.quantize_kernel = quantize_kernel
        self.dequantize_kernel = dequantize_kernel

    def quantize(self, x: np.ndarray) -> np.ndarray:
        n_rows, n_cols = x.shape
        xb = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, QK)
        raw = np.empty((xb.shape[0], self.block_bytes), dtype=np.uint8)
        scales = np.empty((xb.shape[0], self.n_scales), dtype=np.float32)
        self.quantize_kernel(xb, scales, raw)
        header = fp16_bytes(scales)
        if not np.isfinite(header.view("<f2")).all():
            # ggml would write an inf scale and llama-quantize's row validation then rejects the tensor
            raise QuantError(f"cannot quantize to {self.name}: values up to {np.abs(x).max():.6g} overflow "
                             f"the block's fp16 scale")
        raw[:, :2 * self.n_scales] = header.reshape(xb.shape[0], 2 * self.n_scales)
        return raw.reshape(n_rows, n_cols // QK * self.block_bytes)

    def dequantize(self, raw: np.ndarray, n_cols: int) -> np.ndarray:
        n_rows = raw.shape[0]
        blocks = np.ascontiguousarray(raw).reshape(-1, self.block_bytes)
        scales = fp16_values(blocks[:, :2 * self.n_scales].reshape(-1, self.n_scales, 2))
        out = np.empty((blocks.shape[0], QK), dtype=np.float32)
        self.dequantize_kernel(blocks, scales, out)
        return out.reshape(n_rows, n_cols)


FORMATS = {f.qtype: f for f in (
    _Format(GGMLType.Q4_0, 1, _quantize_q4_0, _dequantize_q4_0),
    _Format(GGMLType.Q4_1, 2, _quantize_q4_1, _dequantize_q4_1),
    _Format(GGMLType.Q5_0, 1, _quantize_q5_0, _dequantize_q5_0),
    _Format(GGMLType.Q5_1, 2, _quantize_q5_1, _dequantize_q5_1),
    _Format(GGMLType.Q8_0, 1, _quantize_q8_0, _dequantize_q8_0),
)}

QUANTIZE = {t: f.quantize for t, f in FORMATS.items()}
DEQUANTIZE = {t: f.dequantize for t, f in FORMATS.items()}
