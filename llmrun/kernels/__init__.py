"""Numba kernels: load-time weight layouts (repack), quantized matrix products (qmatmul), graph ops (ops)."""
import os

# Decode launches ~150 short parallel regions per token. With libgomp's default busy-waiting, a machine
# whose cores are shared with other work (or oversubscribed) slows down 5-10x; passive waiting costs a few
# microseconds per region instead. Set before numba loads its OpenMP pool; users can still override it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .repack import PackedMatrix, pack_matrix, TILE_ROWS  # noqa: E402
from .qmatmul import matmul, matvec, matvec_batch, dequantize_rows  # noqa: E402

__all__ = ["PackedMatrix", "pack_matrix", "TILE_ROWS", "matmul", "matvec", "matvec_batch", "dequantize_rows"]
