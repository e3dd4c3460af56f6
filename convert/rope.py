"""Llama 3 ("llama3") RoPE frequency factors: the `rope_freqs.weight` tensor (docs/formats.md §5).

ggml divides each rotation angle theta_i by factor_i; these factors reproduce HF's llama3 inv_freq scaling.
The arithmetic follows what torch does with the reference's float32 tensors and python scalars, so the
values come out bit-identical to llama.cpp's convert_hf_to_gguf.py.
"""
from __future__ import annotations

import math

import numpy as np


def llama3_rope_factors(head_dim: int, base: float, factor: float = 8.0, low_freq_factor: float = 1.0,
                        high_freq_factor: float = 4.0, original_context: int = 8192) -> np.ndarray:
    """float32 [head_dim/2]: 1 for high frequencies, `factor` for low ones, a smooth blend in between."""
    f32 = np.float32
    # torch evaluates `python_float ** float32_tensor` with the base rounded to float32 and a (near) correctly
    # rounded pow; double precision rounded once reproduces it
    exponents = np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim)
    freqs = f32(1.0) / np.power(np.float64(f32(base)), exponents.astype(np.float64)).astype(f32)
    low_wavelen = original_context / low_freq_factor      # python floats, compared against float32 below
    high_wavelen = original_context / high_freq_factor
    out = np.empty(len(freqs), dtype=f32)
    for i, f in enumerate(freqs):
        # torch evaluates `scalar / tensor` as reciprocal(tensor) * scalar in float32
        wavelen = (f32(1.0) / f) * f32(2 * math.pi)
        if wavelen < high_wavelen:
            out[i] = 1.0
        elif wavelen > low_wavelen:
            out[i] = factor
        else:
            ratio = (f32(1.0) / wavelen) * f32(original_context)
            smooth = (ratio - f32(low_freq_factor)) / f32(high_freq_factor - low_freq_factor)
            out[i] = f32(1.0) / ((f32(1.0) - smooth) / f32(factor) + smooth)
    return out
