"""Small helpers shared by the block formats: C's roundf, an input check (fp16 fields: llmrun/ggml.py).

The scalar function is Numba-compiled so that `@njit` kernels can call it; it also works from plain
Python on numpy float32 scalars.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

# Work on this many weights at a time where numpy needs temporaries, to keep memory bounded on big tensors.
CHUNK_WEIGHTS = 1 << 22


@njit(cache=True)
def roundf(v):
    """C's roundf (half away from zero) for a float32 v, returned as int.

    Done in float64, where |v| + 0.5 is exact for any float32 below 2**29, so no double rounding."""
    a = math.floor(abs(np.float64(v)) + 0.5)
    return int(a) if v >= 0 else -int(a)


@njit(cache=True, parallel=True)
def count_non_finite(x2d):
    """How many NaN / inf values a float32 [rows, cols] array holds (one parallel pass, no temporaries)."""
    total = 0
    for i in prange(x2d.shape[0]):
        bad = 0
        for j in range(x2d.shape[1]):
            # x - x is 0 for finite x and NaN for inf/NaN; this form vectorizes
            bad += (x2d[i, j] - x2d[i, j]) != 0
        total += bad
    return total
