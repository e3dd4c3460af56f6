"""Repacking time of a model's matrices: `kernels.repack.pack_matrix` over every 2-D tensor but token_embd
(whose rows are dequantized on demand), per ggml type, page cache warmed first (disk reads are not timed).

    python bench/bench_load.py models/bench/tinyllama-1.1b-random.q4_k_m.gguf
"""
from __future__ import annotations

import argparse
import collections
import time

import numpy as np

from llmrun.gguf.reader import GGUFReader
from llmrun.kernels import repack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    args = ap.parse_args()
    r = GGUFReader(args.model)
    mats = [(n, ti) for n, ti in r.tensors.items() if len(ti.shape) == 2 and n != "token_embd.weight"]
    for _, ti in mats:   # into the page cache
        np.asarray(ti.data).reshape(-1)[::4096].sum()
    repack.pack_matrix(np.zeros((64, 144), np.uint8), 12, 256)   # compiled or loaded from the cache
    seconds, nbytes = collections.Counter(), collections.Counter()
    t0 = time.perf_counter()
    for _, ti in mats:
        t = time.perf_counter()
        repack.pack_matrix(ti.data, int(ti.ggml_type), ti.shape[-1])
        seconds[ti.ggml_type.name] += time.perf_counter() - t
        nbytes[ti.ggml_type.name] += ti.data.nbytes
    print(f"{args.model}: {time.perf_counter() - t0:.2f} s")
    for k, s in seconds.items():
        print(f"  {k:7s} {nbytes[k] / 1e6:7.0f} MB  {s:6.2f} s  {nbytes[k] / s / 1e9:5.2f} GB/s")


if __name__ == "__main__":
    main()
