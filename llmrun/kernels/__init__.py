"""Numba kernels: load-time weight layouts (repack), quantized matrix products (matmul), graph ops (ops)."""
from .repack import PackedMatrix, pack_matrix, TILE_ROWS
from .qmatmul import matmul, matvec, dequantize_rows

__all__ = ["PackedMatrix", "pack_matrix", "TILE_ROWS", "matmul", "matvec", "dequantize_rows"]
