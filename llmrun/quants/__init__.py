"""Block formats: quantize float32 rows to ggml's bytes and back.

One module per format family registers its functions here:
  floats.py   F32, F16, BF16
  legacy.py   Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
  kquants.py  Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
  iq4_nl.py   IQ4_NL
Each exposes QUANTIZE and DEQUANTIZE dicts mapping GGMLType to
  quantize_fn(x: float32 [rows, cols]) -> uint8 [rows, row_nbytes]
  dequantize_fn(raw: uint8 [rows, row_nbytes], n_cols) -> float32 [rows, cols]
"""
from __future__ import annotations

import numpy as np

from ..runtime import use_kernel_sources_stamp

use_kernel_sources_stamp()   # before any kernel is defined (runtime.py)

from ..errors import QuantError
from ..ggml import GGMLType, GGML_BLOCK, row_nbytes
from . import floats, legacy, kquants, iq4_nl
from .common import count_non_finite

QUANTIZE = {**floats.QUANTIZE, **legacy.QUANTIZE, **kquants.QUANTIZE, **iq4_nl.QUANTIZE}
DEQUANTIZE = {**floats.DEQUANTIZE, **legacy.DEQUANTIZE, **kquants.DEQUANTIZE, **iq4_nl.DEQUANTIZE}


def _as_type(qtype) -> GGMLType:
    try:
        return GGMLType.from_name(qtype) if isinstance(qtype, str) else GGMLType(qtype)
    except ValueError:
        raise QuantError(f"unknown tensor type {qtype!r}") from None


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """Quantize float rows `x[..., n_cols]` to raw blocks, uint8 [rows, row_nbytes], bit-exact with ggml."""
    qtype = _as_type(qtype)
    fn = QUANTIZE.get(qtype)
    if fn is None:
        raise QuantError(f"quantizing to {qtype.lower} is not supported")
    x = np.asarray(x, dtype=np.float32)
    n_cols = x.shape[-1] if x.ndim else 1
    blck = GGML_BLOCK[qtype][0]
    if n_cols % blck:
        raise QuantError(f"row length {n_cols} is not a multiple of {qtype.lower}'s block size {blck}")
    x2 = np.ascontiguousarray(x.reshape(-1, n_cols))
    if qtype != GGMLType.F32 and x2.size and count_non_finite(x2):
        # llama-quantize refuses these too (ggml_validate_row_data); the blocks would hold garbage
        bad = np.argwhere(~np.isfinite(x2))[0]
        raise QuantError(f"cannot quantize to {qtype.lower}: the input holds {count_non_finite(x2)} NaN or "
                         f"infinite values (first at row {bad[0]}, column {bad[1]})")
    return fn(x2)


def dequantize(raw: np.ndarray, qtype, shape) -> np.ndarray:
    """Raw blocks (any uint8 array holding exactly the tensor's bytes) to float32 of numpy `shape`."""
    qtype = _as_type(qtype)
    fn = DEQUANTIZE.get(qtype)
    if fn is None:
        raise QuantError(f"dequantizing {qtype.lower} is not supported")
    shape = tuple(int(s) for s in shape)
    n_cols = shape[-1] if shape else 1
    n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    rb = row_nbytes(qtype, n_cols)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    if raw.size != n_rows * rb:
        raise QuantError(f"{qtype.lower} tensor of shape {shape} needs {n_rows * rb} bytes, got {raw.size}")
    return fn(raw.reshape(n_rows, rb), n_cols).reshape(shape)


__all__ = ["quantize", "dequantize", "QUANTIZE", "DEQUANTIZE", "GGMLType"]
