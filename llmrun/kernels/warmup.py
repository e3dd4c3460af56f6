"""Compiling the kernels a model needs before its first forward: only those, once per machine, in parallel.

Numba compiles a kernel the first time it is called with new argument types and keeps the machine code in
its on-disk cache (``cache=True``: in ``__pycache__`` beside the source, or numba's user-wide cache when that
folder is read-only). Left to itself, a cold first run compiled the kernels one after the other inside the
first forward, silently, and each further quant type compiled every product kernel again. Instead:

* every kernel has exactly ONE signature: one dtype per argument, the scale layouts of all the quant types of a
  family share one argument layout (blocks.py), and the tiled families (U2, U4, U5, U6, I8) share each product
  kernel (an int `kind` argument, repack.KIND_*). The registry below spells them out, in units (one or two
  kernels compiled together); tests/test_kernel_warmup.py runs models of every type and checks that nothing else
  gets compiled.
* ``start(units)``, at the beginning of a model load, looks the signatures up in numba's cache index (no
  compiling). If some are missing it prints ONE line on stderr and starts worker processes
  (``python -m llmrun.kernels.warmup --queue DIR UNIT...``), one per core but one, that take the missing units
  dearest first from a queue of claim folders while the weights load; once loaded, the loading process takes
  units from the same queue. The model's first calls then load the machine code from the cache.
* ``python -m llmrun.kernels.warmup --all`` (``make install``) compiles every unit of this host the same way;
  setup.py runs it on the build tree, so a wheel built on this machine (``pip install .``) carries the cache.

Two processes must never write different signatures of one function's cache at the same time (numba's
index is read-modify-write: the entries could be crossed). Hence one signature per kernel, each unit compiled
by one process, and helpers that are only called from other kernels carry no ``cache=True`` of their own
(their code is part of every caller's cached machine code).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

MESSAGE = "llmrun: compiling kernels for {what} (first run only)..."   # the one line on stderr


@dataclass(frozen=True)
class Unit:
    """Kernels compiled together (by one worker). `cost`: CPU seconds one compile took on the development
    machine, only used to share units out evenly among the workers."""
    name: str
    cost: float
    kernels: Callable[[], list]     # -> [(dispatcher, signature tuple)], built on demand (imports numba)


# ------------------------------------------------------------------------------------------ signatures
def _array(dtype, ndim: int):
    from numba import from_dtype, types
    return types.Array(from_dtype(np.dtype(dtype)), ndim, "C")


def _units() -> dict[str, Unit]:
    """The registry. Signatures are spelled out here; the kernels' callers (qmatmul's matvec / matvec_batch /
    matmul, repack's pack_matrix, the engine) pass exactly these types (tests/test_kernel_warmup.py)."""
    from numba import types
    from . import gemm_blas, gemm_vnni, gemv, gemv_vnni, gemv_vnni_batch, kv_formats, ops, repack, token_draw

    f32_1, f32_2, f32_3, f32_4 = (_array(np.float32, n) for n in (1, 2, 3, 4))
    u8_3, u16_2, u16_3 = _array(np.uint8, 3), _array(np.uint16, 2), _array(np.uint16, 3)
    raw_rows = types.Array(types.uint8, 2, "C", readonly=True)   # a GGUF tensor's rows (repack.pack_matrix)
    quads = _array(np.uint8, 5)   # tiled codes (repack.py), with their kind (repack.KIND_*)
    i16_3, i32_3, i64_1 = _array(np.int16, 3), _array(np.int32, 3), _array(np.int64, 1)
    i64, f32, f64, b1 = types.int64, types.float32, types.float64, types.boolean
    # a family's block scales or offsets: (half bits, super-block scales, sub-block scales), blocks.py
    sc = types.Tuple((_array(np.uint16, 3), _array(np.uint16, 3), _array(np.int8, 3)))
    scales = (sc, sc, b1, b1, i64)          # d, m, two_level, has_m, zero

    def cache(kind, ndim):   # a KV cache of one type (kv_formats.py)
        if kind == "q8_0":
            return types.Tuple((_array(np.int8, ndim), _array(np.uint16, ndim)))
        return _array(np.float32 if kind == "f32" else np.uint16, ndim)

    units = [
        Unit("repack", 4.5, lambda: [(repack._pack_rows, (raw_rows, i64, i64, i64, i64, quads, u8_3, u8_3, u16_3,
                                                        u16_3))]),
        Unit("graph", 1.0, lambda: [
            (ops.rmsnorm, (f32_2, f32_1, f32, f32_2)),
            (ops.head_rmsnorm, (f32_2, i64, i64, f32_1, f32)),
            (ops.swiglu, (f32_2, i64, f32_2)),
            (ops.geglu, (f32_2, i64, f32_2)),
            (token_draw.draw_token, (f32_1, i64, f64, f64, f64, f64))]),
        Unit("gemv", 4.5, lambda: [(gemv._gemv, (quads, i64, *scales, f32_1, f32_1, b1))]),
        Unit("gemv_vnni", 3.0, lambda: [
            (gemv_vnni._gemv_vnni, (quads, i64, *scales, f32_1, f32_1, b1))]),
        Unit("gemv_h16", 1.5, lambda: [(gemv._gemv_h16, (u16_2, i64, f32_1, f32_1, b1))]),
        Unit("batch_vnni", 5.0, lambda: [
            (gemv_vnni_batch.gemv_batch_vnni, (quads, i64, *scales, f32_2, f32_2, b1))]),
        Unit("batch", 5.0, lambda: [(gemv._gemv_batch, (quads, i64, *scales, f32_2, f32_2, b1))]),
        Unit("igemm", 3.5, lambda: [
            (gemm_vnni._igemm, (quads, i64, *scales, i32_3, f32_2, f32_2, f32_2)),
            (gemm_vnni._quantize_token_blocks, (f32_2, i64, i16_3, f32_2, f32_2))]),
        Unit("widen", 2.5, lambda: [(gemm_blas._widen, (quads, i64, *scales, i64, i64, f32_3))]),
        Unit("widen_h16", 1.0, lambda: [(gemm_blas._widen_h16, (u16_2, i64, i64, i64, f32_2))]),
    ]
    for tk in kv_formats.KV_TYPES:       # the cache kernels, per (type_k, type_v)
        for tv in kv_formats.KV_TYPES:
            # K [.., n_head_kv, blocks, k_dim, KB], V [.., n_head_kv, capacity, v_dim]; pools add a slot axis
            k1, v1, kn, vn = cache(tk, 4), cache(tv, 3), cache(tk, 5), cache(tv, 4)
            units += [
                Unit(f"attention:{tk},{tv}", 4.0, lambda k1=k1, v1=v1: [
                    (ops.rope_store, (f32_2, f32_2, f32_2, f32_3, k1, v1, i64, i64, i64, i64, i64, b1)),
                    (ops.attention, (f32_3, k1, v1, i64, f32, f32_2, i64, f32))]),
                Unit(f"attention_slots:{tk},{tv}", 4.0, lambda kn=kn, vn=vn: [
                    (ops.attention_slots, (f32_2, f32_2, f32_2, kn, vn, i64_1, i64_1, i64, i64, i64, b1, f32, f32_2,
                                           i64, f32))])]
    return {u.name: u for u in units}


_REGISTRY: dict[str, Unit] | None = None


def units() -> dict[str, Unit]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _units()
    return _REGISTRY


def host_units() -> list[str]:
    """What `--all` compiles: every unit this host runs, with the default KV cache types (VNNI hosts prefill
    tiled codes through the integer GEMM, others through BLAS)."""
    from .kv_formats import DEFAULT_KV_TYPE as d
    from .qmatmul import VNNI, VNNI_GEMV
    skip = {"widen"} if VNNI else {"igemm"}
    skip |= {"gemv", "batch"} if VNNI_GEMV else {"gemv_vnni", "batch_vnni"}
    return [n for n in units() if n not in skip and (":" not in n or n.endswith(f":{d},{d}"))]


def units_for(families: Iterable[str], kv_types: tuple[str, str], batched: bool = False) -> list[str]:
    """Units a model whose matrices are of these repack families, with K/V caches of kv_types, runs on this
    host. `batched`: what forward_batch over pooled caches (the server's decode steps) adds instead: the
    several-token gemv kernels and the pooled attention."""
    from .qmatmul import VNNI, VNNI_GEMV
    from .repack import H16, TILED
    fams = set(families)
    kv = ",".join(kv_types)
    if batched:
        need = [f"attention_slots:{kv}"]
        if fams & set(TILED):
            need.append("batch_vnni" if VNNI_GEMV else "batch")
        return need
    need = ["graph", f"attention:{kv}"]
    if fams & set(TILED):   # tiled at load (repack), then products
        need += ["repack", "gemv_vnni" if VNNI_GEMV else "gemv", "igemm" if VNNI else "widen"]
    if H16 in fams:
        need += ["gemv_h16", "widen_h16"]
    return list(dict.fromkeys(need))


# ------------------------------------------------------------------------------------------ the cache
def is_cached(dispatcher, sig) -> bool:
    """Whether `dispatcher` already holds `sig`, or numba's on-disk cache does (read from its index, nothing
    compiled or loaded). False when that cannot be told (no cache, another numba's internals)."""
    if tuple(sig) in dispatcher.overloads:
        return True
    try:
        cache = dispatcher._cache
        key = cache._index_key(tuple(sig), dispatcher.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:
        return False


def missing(names: Iterable[str]) -> list[str]:
    reg = units()
    return [n for n in names if not all(is_cached(d, s) for d, s in reg[n].kernels())]


def compile_units(names: Iterable[str]) -> None:
    """Compile (or load from the cache) every kernel of these units, in this process."""
    reg = units()
    for name in names:
        for dispatcher, sig in reg[name].kernels():
            dispatcher.compile(tuple(sig))


# ------------------------------------------------------------------------------------------ workers
def _free_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def by_cost(names: Iterable[str]) -> list[str]:
    """Dearest first: with every process taking the next unclaimed unit, the last to finish is a cheap one."""
    reg = units()
    return sorted(names, key=lambda n: -reg[n].cost)


def _claim(folder: str, name: str) -> bool:
    """Take unit `name` from the queue in `folder` (whoever makes the folder entry first compiles it)."""
    try:
        os.mkdir(os.path.join(folder, name))
        return True
    except FileExistsError:
        return False


def compile_claimed(folder: str, names: Sequence[str]) -> None:
    """Compile, in this process, each of `names` that no other process has taken yet."""
    for name in names:
        if _claim(folder, name):
            compile_units([name])


def _worker_env() -> dict[str, str]:
    """The environment of a worker: the same interpreter settings, the same llmrun, and the same numba target
    (numba's cache is keyed by the CPU name and features: runtime.py sets them at import unless numba was
    imported first, in which case the worker must not set them either)."""
    import numba
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if numba.config.CPU_NAME:
        env["NUMBA_CPU_NAME"] = numba.config.CPU_NAME
    if numba.config.CPU_FEATURES:
        env["NUMBA_CPU_FEATURES"] = numba.config.CPU_FEATURES
    if not numba.config.CPU_NAME and not numba.config.CPU_FEATURES:
        env.pop("NUMBA_CPU_FEATURES", None)
        env["LLMRUN_VECTOR_WIDTH"] = "256"   # keeps runtime.py from choosing a feature string of its own
    return env


class Pending:
    """Units being compiled: by worker processes from the start, and by this process in `wait()` (after the
    load), each process taking the next unit nobody has taken."""

    def __init__(self, names: list[str], procs: list[subprocess.Popen], folder: str | None):
        self.names = names
        self.procs = procs
        self.folder = folder

    def wait(self) -> None:
        try:
            if self.folder is not None:
                compile_claimed(self.folder, self.names)
            for p in self.procs:
                p.wait()
        finally:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
        left = missing(self.names)
        if left:   # a worker failed: compile here (the old lazy path's cost, never a wrong result)
            compile_units(left)
        self.names, self.procs, self.folder = [], [], None


def start(names: Sequence[str], what: str, stream=None, workers: int | None = None, message: str = MESSAGE) -> Pending:
    """Begin compiling what of these units is not compiled yet, in `workers` extra processes (default: one per
    core but the one this process will use once it has loaded the weights); one line on `stream` (stderr) if
    anything is missing. "repack" is compiled by this process itself, when the load reaches it."""
    import numba
    lacking = [] if numba.config.DISABLE_JIT else missing(names)   # (no JIT: nothing to compile)
    if not lacking:
        return Pending([], [], None)
    print(message.format(what=what), file=stream or sys.stderr, flush=True)
    todo = by_cost(n for n in lacking if n != "repack")
    n = min(len(todo), _free_cores() - 1 if workers is None else workers)
    if n <= 0 or not sys.executable:
        return Pending(todo, [], None)
    folder = tempfile.mkdtemp(prefix="llmrun-kernels-")
    env, procs = _worker_env(), []
    for _ in range(n):
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "llmrun.kernels.warmup", "--queue", folder, *todo],
                                          env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        except OSError:
            break
    return Pending(todo, procs, folder)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m llmrun.kernels.warmup --all` compiles every unit of this host, in parallel (make install);
    `--queue FOLDER UNIT...` is a worker of start(); `UNIT...` compiles those units here."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--all"]:
        t0 = time.perf_counter()
        if not missing(host_units()):
            return 0
        pending = start(host_units(), "", message="llmrun: compiling the kernels for this machine (once)...")
        compile_units(["repack"])
        pending.wait()
        if missing(host_units()):
            print("llmrun: compiling kernels failed", file=sys.stderr)
            return 1
        print(f"llmrun: kernels compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return 0
    if len(args) >= 2 and args[0] == "--queue":
        folder, args = args[1], args[2:]
    else:
        folder = None
    unknown = [a for a in args if a not in units()]
    if unknown or not args:
        print(f"usage: python -m llmrun.kernels.warmup --all | UNIT... (units: {', '.join(units())})",
              file=sys.stderr)
        return 2
    if folder is None:
        compile_units(args)
    else:
        compile_claimed(folder, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
