"""The batched decode kernel against the one-token kernel, per matrix: CPU time of one call, best of 7, all
kernels interleaved in one run (so load from other jobs hits them alike), one numba thread by default.

    python bench/bench_decode_batch.py                  # the matrices of docs/server.md, T = 2, 4, 8
    python bench/bench_decode_batch.py --tokens 2 3 4 6 8 --threads 2

Matrices are random weights quantized to the named type and shape (speed does not depend on the values); a
product of T tokens is `matvec_batch` (rows bit-identical to `matvec`), "per token" divides its time by T.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

MATRICES = [("SmolLM2 gate/up", "q4_1", 3072, 576), ("SmolLM2 down", "q4_1", 576, 1536),
            ("SmolLM2 head", "q8_0", 49152, 576), ("TinyLlama gate/up", "q4_0", 11264, 2048)]


def _us_per_call(fn, calls: int) -> float:
    t0 = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t0) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    import numba
    from llmrun.ggml import GGMLType
    from llmrun.kernels import matvec, matvec_batch, pack_matrix
    from llmrun.quants import quantize
    numba.set_num_threads(a.threads)
    load = os.getloadavg()
    print(f"{a.threads} thread(s), CPU time per call, best of {a.rounds} (load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f})")
    cols = " | ".join(f"T={t} (per token)" for t in a.tokens)
    print(f"| matrix | type | 1 token | {cols} |")
    print("|---|---|---|" + "---|" * len(a.tokens))
    rng = np.random.default_rng(0)
    for label, name, rows, k in MATRICES:
        w = (rng.standard_normal((rows, k)) * 0.02).astype(np.float32)
        pm = pack_matrix(quantize(w, name), int(GGMLType.from_name(name)), k)
        X = rng.standard_normal((max(a.tokens), k)).astype(np.float32)
        out = np.empty((max(a.tokens), rows), np.float32)
        runs = {1: lambda: matvec(pm, X[0], out[0])}
        runs.update({t: (lambda t=t: matvec_batch(pm, X[:t], out[:t])) for t in a.tokens})
        for fn in runs.values():   # compile / warm the caches
            fn()
        calls = max(3, int(2e4 / (rows * k / 1e4)))   # ~ tens of ms per round
        best = {t: float("inf") for t in runs}
        for _ in range(a.rounds):   # interleaved: each round times every kernel once
            for t, fn in runs.items():
                best[t] = min(best[t], _us_per_call(fn, calls))
        cells = " | ".join(f"{best[t]:.0f} ({best[t] / t:.0f})" for t in a.tokens)
        print(f"| {label} {rows}x{k} | {name} | {best[1]:.0f} | {cells} |")
    load = os.getloadavg()
    print(f"(load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")


if __name__ == "__main__":
    main()
