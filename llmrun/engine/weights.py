"""Tensor loading: GGUF tensors by name, checked for presence, shape and type, and repacked for the kernels.

Matrices become kernels/repack.py tiles; once repacked, the file's pages of a tensor are dropped from the
process (the tiles are what the kernels read; llmrun/runtime.py has the glibc side of loading).
"""
from __future__ import annotations

import numpy as np

from ..errors import ModelError
from ..kernels.repack import pack_matrix
from ..runtime import drop_file_pages
from ..tensors import tensor_to_float32
from .load_checks import check_matrix, check_vector


class MatrixGroup(list):
    """The PackedMatrix parts of one product, their outputs side by side, and the GGUF tensors they hold:
    `tensors` = [(name, first output column, rows, cols)]. `lora` is the active adapters' low-rank side path
    beside this product (engine/adapters.py), None without adapters."""

    def __init__(self, parts, tensors):
        super().__init__(parts)
        self.tensors = tensors
        self.lora = None


class Weights:
    """Fetches tensors by name, checking presence, shape and type with one-line ModelErrors."""

    def __init__(self, reader):
        self.reader = reader
        self.used: set[str] = set()

    def info(self, name, shape):
        ti = self.reader.tensors.get(name)
        if ti is None:
            raise ModelError(f"{self.reader.path}: missing tensor {name}")
        if tuple(ti.shape) != tuple(shape):
            raise ModelError(f"{self.reader.path}: tensor {name} has shape {list(ti.shape)}, "
                             f"expected {list(shape)}")
        self.used.add(name)
        return ti

    def has(self, name) -> bool:
        return name in self.reader.tensors

    def unused(self) -> list[str]:
        return [n for n in self.reader.tensors if n not in self.used]

    def vector(self, name, n, positive: bool = False) -> np.ndarray:
        """A 1-D tensor as float32, finite (and > 0 with `positive`: values that divide)."""
        ti = self.info(name, (n,))
        try:
            v = np.array(tensor_to_float32(ti), dtype=np.float32).reshape(n)
        except Exception as e:  # an unsupported type for a 1-D tensor
            raise ModelError(f"{self.reader.path}: cannot read tensor {name}: {e}") from None
        check_vector(self.reader.path, name, v, positive)
        return v

    def optional_vector(self, name, n) -> np.ndarray | None:
        return self.vector(name, n) if self.has(name) else None

    def matrix(self, names_shapes) -> MatrixGroup:
        """Pack one or more matrices that multiply the same input; consecutive tensors of the same
        type are fused into one PackedMatrix (one kernel call for e.g. Q, K and V)."""
        infos = [self.info(n, s) for n, s in names_shapes]
        tensors, col = [], 0
        for n, (rows, cols) in names_shapes:
            tensors.append((n, col, rows, cols))
            col += rows
        groups: list[list] = []
        for ti in infos:
            if groups and groups[-1][0].ggml_type == ti.ggml_type:
                groups[-1].append(ti)
            else:
                groups.append([ti])
        packed = []
        for g in groups:
            try:   # fused tensors are packed part by part into one set of tiles (no concatenated copy)
                packed.append(pack_matrix([ti.data for ti in g], int(g[0].ggml_type), g[0].shape[-1]))
            except ModelError as e:
                raise ModelError(f"{self.reader.path}: tensor {g[0].name} ({g[0].ggml_type.name.lower()}): {e}") \
                    from None
            check_matrix(self.reader.path, "/".join(ti.name for ti in g), packed[-1])
            for ti in g:
                if isinstance(ti.data, np.ndarray) and not ti.data.flags.owndata:   # a view into the mmap
                    drop_file_pages(ti.data)   # its repacked copy is what the kernels read
        return MatrixGroup(packed, tensors)
