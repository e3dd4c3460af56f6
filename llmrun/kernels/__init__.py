"""Numba kernels: load-time weight layouts (repack), quantized matrix products (matmul), graph ops (ops)."""
from .repack import PackedMatrix, pack_matrix, TILE_ROWS
from .matmul import matmul, dequantize_rows

__all__ = ["PackedMatrix", "pack_matrix", "TILE_ROWS", "matmul", "dequantize_rows"]
