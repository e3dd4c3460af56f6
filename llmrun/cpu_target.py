"""Numba code-generation target: let LLVM use 512-bit vectors on AVX-512 machines.

LLVM's tuning for recent Intel cores ("prefer-256-bit") keeps auto-vectorized loops at 256 bits, which
halves the work per instruction of the decode kernels (kernels/qmatmul.py: the 4-bit matrix-vector
product ran 1.4-1.5x faster with 512-bit vectors on a Xeon). Numba reads its target features once, when
its code generator starts (the first @njit decoration), so this runs from llmrun/__init__.py before any
numba import. The host's own feature list is kept (never features the CPU lacks); a user-set
NUMBA_CPU_FEATURES, or numba already being loaded, leaves everything alone. Numba's on-disk cache is keyed
by the feature string, so cached code never mixes the two settings.
"""
from __future__ import annotations

import os
import sys

_WIDE = ",-prefer-256-bit"


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512f", "avx512bw", "avx512vl"} <= flags
    except OSError:
        pass
    return False


def prefer_wide_vectors() -> None:
    if os.environ.get("NUMBA_CPU_FEATURES") or os.environ.get("NUMBA_CPU_NAME") or "numba" in sys.modules:
        return
    if os.environ.get("LLMRUN_VECTOR_WIDTH") == "256" or not _has_avx512():
        return
    try:
        import llvmlite.binding as ll
        features = ll.get_host_cpu_features().flatten()
    except Exception:   # no llvmlite / unknown host: numba's defaults
        return
    if "+avx512f" in features:
        os.environ["NUMBA_CPU_FEATURES"] = features + _WIDE
