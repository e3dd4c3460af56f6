"""Numba kernels: load-time weight layouts (repack), quantized matrix products (qmatmul: dispatch to gemv,
gemv_vnni, gemm_vnni, gemm_blas over what blocks shares), graph ops (ops).

The process-wide settings they rely on (vector width, OpenMP wait policy, BLAS threads) are made by
llmrun/runtime.py.
"""
from ..runtime import use_kernel_sources_stamp

use_kernel_sources_stamp()   # before any kernel is defined (runtime.py)

from .repack import PackedMatrix, pack_matrix, TILE_ROWS
from .qmatmul import matmul, matvec, matvec_batch, dequantize_rows

__all__ = ["PackedMatrix", "pack_matrix", "TILE_ROWS", "matmul", "matvec", "matvec_batch", "dequantize_rows"]
