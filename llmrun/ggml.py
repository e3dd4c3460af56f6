"""ggml's tensor-type facts, in one place: type codes, block geometry, lookup tables, half-float fields.

These are properties of the tensor formats themselves (ggml.h, ggml-common.h), shared by the container
(llmrun/gguf), the block codecs (llmrun/quants) and the engine's kernels (llmrun/kernels). This module is a
leaf: it imports nothing from llmrun, so each of those packages can depend on it without depending on the
others.
"""
from __future__ import annotations

import enum

import numpy as np

QK_K = 256               # weights per K-quant super-block
GGML_QUANT_VERSION = 2   # ggml's GGML_QNT_VERSION, stored as general.quantization_version


class GGMLType(enum.IntEnum):
    """ggml's tensor type codes (enum ggml_type); the names, lower-cased, are ggml's type names."""
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39

    @property
    def block_size(self) -> int:
        return GGML_BLOCK[self][0]

    @property
    def type_size(self) -> int:
        return GGML_BLOCK[self][1]

    @property
    def lower(self) -> str:
        return self.name.lower()

    @classmethod
    def from_name(cls, name: str) -> "GGMLType":
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown tensor type {name!r}") from None


# type -> (weights per block, bytes per block)
GGML_BLOCK: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q8_1: (32, 36),
    GGMLType.Q2_K: (QK_K, 84),
    GGMLType.Q3_K: (QK_K, 110),
    GGMLType.Q4_K: (QK_K, 144),
    GGMLType.Q5_K: (QK_K, 176),
    GGMLType.Q6_K: (QK_K, 210),
    GGMLType.Q8_K: (QK_K, 292),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.BF16: (1, 2),
    # Known to ggml but not (de)quantizable here: listed so that any llama.cpp file can be
    # read and described (`llmrun info`); using such a tensor fails later with a QuantError.
    GGMLType.IQ2_XXS: (QK_K, 66),
    GGMLType.IQ2_XS: (QK_K, 74),
    GGMLType.IQ3_XXS: (QK_K, 98),
    GGMLType.IQ1_S: (QK_K, 50),
    GGMLType.IQ3_S: (QK_K, 110),
    GGMLType.IQ2_S: (QK_K, 82),
    GGMLType.IQ4_XS: (QK_K, 136),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (QK_K, 56),
    GGMLType.TQ1_0: (QK_K, 54),
    GGMLType.TQ2_0: (QK_K, 66),
    GGMLType.MXFP4: (32, 17),
}


def row_nbytes(ggml_type: GGMLType, n_cols: int) -> int:
    """Bytes of one row of n_cols weights (n_cols must be a multiple of the block size)."""
    blck, size = GGML_BLOCK[ggml_type]
    return n_cols // blck * size


# kvalues_iq4nl: the 16 levels an IQ4_NL index selects (sorted)
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                         dtype=np.int8)


# Half-precision scale fields (the `d`/`m` of most block formats), little-endian.
def fp16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 values -> their IEEE half bytes (little-endian), shape [..., 2].

    numpy rounds to nearest-even like ggml's F16C path (GGML_FP32_TO_FP16); out-of-range values become
    inf there too, silently."""
    with np.errstate(over="ignore"):
        half = np.ascontiguousarray(values, dtype=np.float32).astype("<f2")
    return half.view(np.uint8).reshape(*np.shape(values), 2)


def fp16_values(raw: np.ndarray) -> np.ndarray:
    """IEEE half bytes [..., 2] (uint8, any strides) -> float32 [...]."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)
