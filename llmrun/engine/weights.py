"""Tensor loading: GGUF tensors by name, checked for presence, shape and type, and repacked for the kernels.

Matrices become kernels/repack.py tiles; once repacked, the file's pages of a tensor are dropped from the
process (the tiles are what the kernels read). The glibc helpers keep the load's temporaries from staying
resident.
"""
from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

from ..errors import ModelError
from ..kernels.repack import PackedMatrix, pack_matrix

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4   # Linux


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def _drop_file_pages(raw: np.ndarray) -> None:
    """Unmap the pages of a tensor's mmapped bytes once they are repacked: its copy in the tiles is what the
    kernels read, so the file's pages would only double the resident memory (the page cache keeps them,
    later reads of the view simply fault them back). Best effort, Linux only."""
    if _LIBC is None or raw.size == 0:
        return
    start = raw.ctypes.data
    end = start + raw.nbytes
    lo = -(-start // _PAGE) * _PAGE
    hi = end // _PAGE * _PAGE
    if hi > lo:
        _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_DONTNEED))


def fixed_mmap_threshold() -> None:
    """Serve large blocks (>= 1 MiB) from their own mappings, returned to the system when freed. glibc's
    default raises this threshold as large blocks are freed (up to 32 MiB), after which repacking's
    temporaries fragment the heap: ~30 % of the weights' size stayed resident after loading a 1.1B model."""
    fn = getattr(_LIBC, "mallopt", None) if _LIBC is not None else None
    if fn is not None:
        fn(ctypes.c_int(-3), ctypes.c_int(1 << 20))   # M_MMAP_THRESHOLD


def trim_heap() -> None:
    """Give the load's freed temporaries back to the system (glibc keeps them in its arenas otherwise)."""
    fn = getattr(_LIBC, "malloc_trim", None) if _LIBC is not None else None
    if fn is not None:
        fn(ctypes.c_size_t(0))


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

    def vector(self, name, n) -> np.ndarray:
        ti = self.info(name, (n,))
        try:
            return np.array(ti.numpy(), dtype=np.float32).reshape(n)
        except Exception as e:  # an unsupported type for a 1-D tensor
            raise ModelError(f"{self.reader.path}: cannot read tensor {name}: {e}") from None

    def optional_vector(self, name, n) -> np.ndarray | None:
        return self.vector(name, n) if self.has(name) else None

    def matrix(self, names_shapes) -> list[PackedMatrix]:
        """Pack one or more matrices that multiply the same input; consecutive tensors of the same
        type are fused into one PackedMatrix (one kernel call for e.g. Q, K and V)."""
        infos = [self.info(n, s) for n, s in names_shapes]
        groups: list[list] = []
        for ti in infos:
            if groups and groups[-1][0].ggml_type == ti.ggml_type:
                groups[-1].append(ti)
            else:
                groups.append([ti])
        packed = []
        for g in groups:
            raw = g[0].data if len(g) == 1 else np.concatenate([ti.data for ti in g], axis=0)
            try:
                packed.append(pack_matrix(raw, int(g[0].ggml_type), g[0].shape[-1]))
            except ModelError as e:
                raise ModelError(f"{self.reader.path}: tensor {g[0].name} ({g[0].ggml_type.name.lower()}): {e}") \
                    from None
            del raw
            for ti in g:
                if isinstance(ti.data, np.ndarray) and not ti.data.flags.owndata:   # a view into the mmap
                    _drop_file_pages(ti.data)
        return packed
