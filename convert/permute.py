"""Q/K row permutation (docs/formats.md §4).

HF's rotate_half pairs dimension i with i + hd/2 inside each head; ggml's NORM RoPE, which llama.cpp uses for
the llama architecture, pairs 2i with 2i+1. Reordering the output rows of q_proj/k_proj per head as
GGUF_row[h*hd + 2i + j] = HF_row[h*hd + j*hd/2 + i] makes the two agree. Only output rows move, so this
works for weights (out, in) and biases (out,) alike, and must run after any LoRA merge in the HF layout.
"""
from __future__ import annotations

import numpy as np

from llmrun.errors import ConvertError


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of w (n_heads*hd, ...) regrouped per head from (2, hd/2) to (hd/2, 2); returns a new array."""
    rows = w.shape[0]
    if n_heads <= 0 or rows % (2 * n_heads):
        raise ConvertError(f"cannot permute a tensor with {rows} rows for {n_heads} heads "
                           "(rows must be a multiple of 2*heads)")
    half = rows // n_heads // 2
    out = w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return np.ascontiguousarray(out)
