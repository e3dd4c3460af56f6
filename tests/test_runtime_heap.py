"""runtime.forward_heap: after a load, a forward's multi-MB temporaries are reused from the heap instead of
being fresh mappings whose pages fault in again every layer (llmrun/runtime.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

CODE = r"""
import resource, sys
import numpy as np
from llmrun import runtime
try:
    from numpy._core.multiarray import _set_madvise_hugepage
except ImportError:   # numpy 1.x
    from numpy.core.multiarray import _set_madvise_hugepage
_set_madvise_hugepage(False)   # numpy's huge pages would fault in 2 MiB at a time: count 4 KiB pages

def faults_of_second_use():
    a = np.ones(4 << 20, np.uint8); del a          # 4 MiB, touched, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = np.ones(4 << 20, np.uint8)                 # the same size again
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

runtime.fixed_mmap_threshold()                     # what a load runs under
during_load = faults_of_second_use()
runtime.trim_heap(); runtime.forward_heap()        # what the end of a load sets
after_load = faults_of_second_use()
print(during_load, after_load)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")
def test_forward_temporaries_reuse_the_heap():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True).stdout.split()
    during_load, after_load = int(out[0]), int(out[1])
    assert during_load >= 512        # 4 MiB = 1024 pages: a fresh mapping faults them all in
    assert after_load < 64           # reused from the heap
