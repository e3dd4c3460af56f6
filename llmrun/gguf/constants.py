"""GGUF container constants (docs/formats.md §1): magic, version, alignment, value types, file types.

ggml's tensor-type facts live in llmrun/ggml.py; GGMLType, GGML_BLOCK, row_nbytes and GGML_QUANT_VERSION
are re-exported here so that older imports from llmrun.gguf.constants keep working.
"""
from __future__ import annotations

import enum

from ..ggml import GGML_BLOCK, GGML_QUANT_VERSION, GGMLType, row_nbytes  # noqa: F401  (re-exports)

GGUF_MAGIC = 0x46554747  # b"GGUF" read as a little-endian u32
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
# Limits of a tensor-info record (ggml's GGML_MAX_NAME / GGML_MAX_DIMS, which the GGUF spec adopts)
GGML_MAX_NAME = 64  # tensor names must be shorter than this (63 bytes at most)
GGML_MAX_DIMS = 4


class GGUFValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# numpy dtype strings (little-endian) of the fixed-size value types
VALUE_DTYPES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


class LlamaFileType(enum.IntEnum):
    """`general.file_type` values (llama.cpp's llama_ftype): GGUF metadata naming a file's overall mix of
    tensor types. A container fact (the GGUF spec lists it), not a property of any one tensor type."""
    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_IQ2_XXS = 19  # IQ* and TQ*: named so `llmrun info` can describe such files; not produced here
    MOSTLY_IQ2_XS = 20
    MOSTLY_Q2_K_S = 21
    MOSTLY_IQ3_XS = 22
    MOSTLY_IQ3_XXS = 23
    MOSTLY_IQ1_S = 24
    MOSTLY_IQ4_NL = 25
    MOSTLY_IQ3_S = 26
    MOSTLY_IQ3_M = 27
    MOSTLY_IQ2_S = 28
    MOSTLY_IQ2_M = 29
    MOSTLY_IQ4_XS = 30
    MOSTLY_IQ1_M = 31
    MOSTLY_BF16 = 32
    MOSTLY_TQ1_0 = 36
    MOSTLY_TQ2_0 = 37
    GUESSED = 1024

