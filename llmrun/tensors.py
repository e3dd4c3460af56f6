"""Dequantize-on-read: GGUF tensors as float32.

This joins the container and the codecs from above: llmrun/gguf parses files and hands out each tensor's raw
bytes, llmrun/quants turns raw blocks into floats, and neither imports the other.
"""
from __future__ import annotations

import numpy as np

from .errors import GGUFError
from .gguf.reader import GGUFReader, TensorInfo
from .quants import dequantize


def tensor_to_float32(info: TensorInfo) -> np.ndarray:
    """A tensor of an open GGUFReader as float32 of `info.shape` (numpy order), dequantized."""
    return dequantize(info.data, info.ggml_type, info.shape)


def read_tensor(path, name: str) -> np.ndarray:
    """One tensor of a GGUF file as float32 in numpy order (dequantized)."""
    with GGUFReader(path) as r:
        ti = r.tensors.get(name)
        if ti is None:
            raise GGUFError(f"{path}: no tensor named {name!r}")
        return tensor_to_float32(ti)


__all__ = ["tensor_to_float32", "read_tensor"]
