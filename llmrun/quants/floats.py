"""Plain float storage: F32, F16, BF16 (docs/formats.md §2, §3.0).

"Quantizing" here is a per-element conversion; ggml rounds both F16 and BF16 to nearest-even.
Rows are processed in chunks so big tensors need no full-size temporaries beyond the output.
"""
from __future__ import annotations

import numpy as np

from ..errors import QuantError
from ..ggml import GGMLType
from .common import CHUNK_WEIGHTS


def _chunked(x: np.ndarray, out: np.ndarray, convert) -> np.ndarray:
    """Apply convert(x_rows) -> out_rows over row chunks of at most ~CHUNK_WEIGHTS weights."""
    n_rows, n_cols = x.shape
    step = max(1, CHUNK_WEIGHTS // max(1, n_cols))
    for r in range(0, n_rows, step):
        out[r:r + step] = convert(x[r:r + step])
    return out


def quantize_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype="<f4").view(np.uint8).copy()


def dequantize_f32(raw: np.ndarray, n_cols: int) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f4").astype(np.float32, copy=True).reshape(raw.shape[0], n_cols)


def _f16_checked(rows: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        half = rows.astype("<f2")
    if np.isinf(half).any():
        # ggml would store inf; llama-quantize's row validation rejects such a tensor, and so do we
        raise QuantError(f"cannot convert to f16: values up to {np.abs(rows).max():.6g} exceed its range (65504)")
    return half.view(np.uint8)


def quantize_f16(x: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], x.shape[1] * 2), dtype=np.uint8)
    return _chunked(x, out, _f16_checked)


def dequantize_f16(raw: np.ndarray, n_cols: int) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32).reshape(raw.shape[0], n_cols)


def _bf16_bits(rows: np.ndarray) -> np.ndarray:
    """ggml_compute_fp32_to_bf16: round to nearest-even on the bit pattern; NaNs are kept and made quiet."""
    u = np.ascontiguousarray(rows, dtype="<f4").view(np.uint32)
    rounded = (u + (np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1)))) >> 16
    # A NaN could carry into the exponent when rounded; ggml instead truncates it and sets the quiet bit.
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    bits = np.where(nan, (u >> 16) | np.uint32(64), rounded)
    return bits.astype("<u2").view(np.uint8)


def quantize_bf16(x: np.ndarray) -> np.ndarray:
    out = np.empty((x.shape[0], x.shape[1] * 2), dtype=np.uint8)
    return _chunked(x, out, _bf16_bits)


def dequantize_bf16(raw: np.ndarray, n_cols: int) -> np.ndarray:
    bits = np.ascontiguousarray(raw).view("<u2").reshape(raw.shape[0], n_cols)
    out = np.empty((raw.shape[0], n_cols), dtype=np.float32)
    # bf16 is the top half of a float32: widen the bit pattern, no rounding involved.
    return _chunked(bits, out, lambda rows: (rows.astype(np.uint32) << 16).view(np.float32))


QUANTIZE = {
    GGMLType.F32: quantize_f32,
    GGMLType.F16: quantize_f16,
    GGMLType.BF16: quantize_bf16,
}
DEQUANTIZE = {
    GGMLType.F32: dequantize_f32,
    GGMLType.F16: dequantize_f16,
    GGMLType.BF16: dequantize_bf16,
}
