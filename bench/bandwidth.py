"""Memory read bandwidth of this machine, per thread count: the ceiling of any decode step.

Decoding one token reads every weight once, so `read bandwidth / weight bytes per token` is the fastest any
engine can decode. `python bench/bandwidth.py [--threads 1,2] [--mib 1024]` prints GB/s per thread count
(best of several passes over an array far larger than the caches); `--json` prints {threads: GB/s}.
"""
from __future__ import annotations

import argparse
import json
import time

import numba
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def _read_all(a):
    # A reduction the compiler cannot skip; 8-byte loads stream the whole array once.
    s = np.uint64(0)
    for i in prange(a.size):
        s += a[i]
    return s


def read_bandwidth(threads: int, mib: int = 1024, passes: int = 5) -> float:
    """Best-of-`passes` read bandwidth in GB/s with `threads` threads."""
    a = np.ones(mib * 2**20 // 8, dtype=np.uint64)
    numba.set_num_threads(threads)
    _read_all(a[:1024])            # compile (or load from cache) outside the timing
    best = float("inf")
    for _ in range(passes):
        t = time.perf_counter()
        _read_all(a)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--mib", type=int, default=1024, help="array size in MiB")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    counts = [int(t) for t in a.threads.split(",") if t]
    counts = [t for t in counts if 1 <= t <= numba.config.NUMBA_NUM_THREADS]
    result = {t: read_bandwidth(t, a.mib) for t in counts}
    if a.json:
        print(json.dumps(result))
    else:
        for t, gbs in result.items():
            print(f"{t} thread{'s' if t > 1 else ''}: {gbs:.1f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
