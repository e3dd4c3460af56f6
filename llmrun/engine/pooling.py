"""Sentence embeddings from per-token hidden states, as llama.cpp pools them.

The hidden states are the model's final-normed activations (``LlamaModel.forward(..., hidden=True)``). The
pooling comes from the file's ``{arch}.pooling_type`` (llama.cpp's enum: 0 none, 1 mean, 2 cls, 3 last,
4 rank) or the caller; a file without the key is mean-pooled. "none" keeps one vector per token.
"""
from __future__ import annotations

import numpy as np

from ..errors import EmbeddingError

POOLING_TYPES = {0: "none", 1: "mean", 2: "cls", 3: "last"}


def pooling_name(value) -> str:
    """A pooling given as llama.cpp's enum number or a name; -1 / None mean "not specified" (mean)."""
    if value is None or (isinstance(value, (int, np.integer)) and int(value) == -1):
        return "mean"
    if isinstance(value, str) and value.lower() in POOLING_TYPES.values():
        return value.lower()
    if isinstance(value, (int, np.integer)) and int(value) in POOLING_TYPES:
        return POOLING_TYPES[int(value)]
    if value in (4, "rank"):
        raise EmbeddingError("pooling 'rank' needs a reranker's classification head, which this model runner "
                             "does not have")
    raise EmbeddingError(f"unknown pooling type {value!r} (known: {', '.join(POOLING_TYPES.values())})")


def pool(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """[T, n_embd] hidden states -> [n_embd] (mean / cls / last) or [T, n_embd] (none), float32."""
    hidden = np.asarray(hidden, dtype=np.float32)
    if pooling == "mean":
        return hidden.mean(axis=0, dtype=np.float64).astype(np.float32)
    if pooling == "cls":
        return hidden[0].copy()
    if pooling == "last":
        return hidden[-1].copy()
    if pooling == "none":
        return hidden.copy()
    raise EmbeddingError(f"unknown pooling {pooling!r}")


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Unit Euclidean length along the last axis (zero vectors stay zero)."""
    v = np.asarray(vectors, dtype=np.float32)
    norm = np.linalg.norm(v.astype(np.float64), axis=-1, keepdims=True)
    return np.where(norm > 0, v / np.where(norm > 0, norm, 1.0), v).astype(np.float32)
