"""Numba kernels: load-time weight layouts (repack), quantized matrix products (qmatmul), graph ops (ops).

The process-wide settings they rely on (vector width, OpenMP wait policy, BLAS threads) are made by
llmrun/runtime.py.
"""
from .repack import PackedMatrix, pack_matrix, TILE_ROWS
from .qmatmul import matmul, matvec, dequantize_rows

__all__ = ["PackedMatrix", "pack_matrix", "TILE_ROWS", "matmul", "matvec", "dequantize_rows"]
