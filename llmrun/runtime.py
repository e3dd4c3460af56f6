"""Every process-wide setting llmrun makes, in one place: what, when and why.

At `import llmrun` (llmrun/__init__.py calls configure_before_numba() before anything imports numba):
  NUMBA_CPU_FEATURES  set to the host's own LLVM feature list plus "-prefer-256-bit" on AVX-512 hosts, so that
      LLVM vectorizes the kernels with 512-bit registers. Its tuning for recent Intel cores keeps loops at 256
      bits, which halves the work per instruction of the decode kernels (the 4-bit matrix-vector product ran
      1.4-1.5x faster with 512-bit vectors on a Xeon). Numba reads its target once, when its code generator
      starts, hence before numba loads. Never features the CPU lacks; left alone when the user set
      NUMBA_CPU_FEATURES or NUMBA_CPU_NAME, set LLMRUN_VECTOR_WIDTH=256, or numba was already imported.
      Numba's on-disk cache is keyed by the feature string, so cached code never mixes the two settings.
  GOMP_SPINCOUNT  defaults to 20000 (~0.2 ms of spinning before a waiting OpenMP thread sleeps), unless the user
      set it or OMP_WAIT_POLICY. Decode launches ~110-150 short parallel regions per token, a few to a hundred
      microseconds apart: a thread that sleeps between them pays a wake-up each time (passive waiting: 1.1B
      q4_0 2-thread decode 24.6 tok/s, 1 thread 23.6), one that spins a little does not (35.9 tok/s;
      2026-12-01, quiet 2-vCPU EPYC). Spinning is what collapses when another process holds a core (10 tok/s
      with a busy loop beside it), so the thread count follows the free cores (free_threads, below). libgomp
      reads it once, when numba first loads its OpenMP pool. Child processes inherit it.

At the engine's first BLAS product (prefill through sgemm, float32 weights, the BLAS attention path):
  BLAS threads  numpy's BLAS (every BLAS library loaded by then) runs on one thread for the rest of the
      process, through threadpoolctl. Its worker threads busy-wait: beside Numba's threads (or other
      processes) on few cores they made prefill 10-50x slower. llmrun parallelizes those products itself.

While a model loads (engine/model.py, glibc on Linux only; elsewhere nothing happens):
  mallopt(M_MMAP_THRESHOLD, 1 MiB)  from the start of the first load on: large blocks get their own mappings,
      returned to the system when freed. glibc's default raises this threshold as large blocks are freed (up to
      32 MiB), after which repacking's temporaries fragment the heap: ~30 % of the weights' size stayed
      resident after loading a 1.1B model.
  malloc_trim(0)  at the end of each load: gives the load's freed temporaries back to the system.
  then mallopt(M_MMAP_THRESHOLD, 32 MiB), mallopt(M_TRIM_THRESHOLD, 64 MiB)  for the forwards that follow: their
      temporaries (a few MB each, a fresh set per layer) are reused from the heap instead of being new mappings
      whose pages fault in and are zeroed per layer (~3,000 page faults a layer of a 1.1B model's 128-token
      prefill, serial: 8-20 % of it); up to 64 MiB of freed heap stays resident for the next call. The next load
      sets the 1 MiB threshold again.
  madvise(MADV_DONTNEED)  on each tensor's memory-mapped file pages once its repacked copy exists: the file's
      pages would only double the resident memory (the page cache keeps them; a later read faults them back).

When llmrun.kernels or llmrun.quants is first imported (before their kernels are defined):
  numba's cache stamp  the on-disk cache of llmrun's kernels is keyed by ONE digest of all the sources their
      machine code is built from (llmrun/kernels, llmrun/quants, ggml.py: kernel_sources_digest), not by each
      kernel's own file: numba's stamp is the hash of the file a kernel is defined in, so changing a helper that
      kernels of other files inline (blocks.py) left their stale machine code in use, after an upgrade too. A
      digest of contents (not of times) also keeps valid the cache that a wheel build compiled (setup.py):
      installing changes the files' times, not their bytes. Numba's other caches are left alone.

Every forward (engine/model.py) runs on ONE long-lived thread of the process, the compute thread (on_compute_thread),
whichever thread asked for it: libgomp keeps the OpenMP team of each thread that starts parallel regions, and once
two teams exist (the main thread's and, say, the server's scheduler's or an app's worker thread's) it counts more
threads than cores and stops spinning between regions, so every region pays a wake-up: SmolLM2's decode ran at
42-58 tok/s from a second thread instead of 145-180 (2026-12-04, 2-vCPU EPYC). A caller interrupted while it
waits (Ctrl-C) gets its KeyboardInterrupt once the forward in flight has finished (the KV cache is never left
half-written by a step still running).

Per forward call (engine/model.py), numba's thread count (numba.set_num_threads is per OS thread): the threads
asked for, but no more than the cores other processes left free over the last quarter second (free_threads:
/proc/stat's busy time minus this process's own CPU time; after a pause of over a second, the other processes'
threads running at that instant; Linux only, elsewhere the threads asked for), looked at again before each layer
of a prompt chunk (a prefill lasts seconds; a decode step checks once). Not
process-wide, so not here: the chat REPL's SIGINT handler (installed and restored around each answer,
cli/chat_session.py).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import queue
import sys
import threading
import time

# ------------------------------------------------------------------------------------------ at import


def configure_before_numba() -> None:
    """The import-time settings above; must run before numba is imported (llmrun/__init__.py)."""
    _prefer_wide_vectors()
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


SPIN_COUNT = "20000"


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


def _prefer_wide_vectors() -> None:
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


def cpu_target_has(*features: str) -> bool:
    """Whether the CPU numba compiles for has all `features` (LLVM names such as "avx512vnni"): the ones listed
    in NUMBA_CPU_FEATURES when that is set (by the user or at import, above), else the host's."""
    forced = os.environ.get("NUMBA_CPU_FEATURES")
    if forced is not None:
        listed = forced.split(",")
        return all("+" + f in listed for f in features)
    try:
        import llvmlite.binding as ll
        host = ll.get_host_cpu_features()
        return all(bool(host.get(f)) for f in features)
    except Exception:   # an unknown host: claim nothing
        return False


# ------------------------------------------------------------------------------------------ numba's cache
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_KERNEL_SOURCES = ("kernels", "quants", "ggml.py")   # what the kernels' machine code is built from


@functools.cache
def kernel_sources_digest() -> bytes:
    """sha256 over the contents of every source file llmrun's compiled kernels come from (the module doc)."""
    h = hashlib.sha256()
    for entry in _KERNEL_SOURCES:
        path = os.path.join(_PACKAGE_DIR, entry)
        files = [path] if entry.endswith(".py") else sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(".py"))
        for f in files:
            with open(f, "rb") as fh:
                data = fh.read()
            h.update(os.path.relpath(f, _PACKAGE_DIR).encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return h.digest()


def _ours(py_file) -> bool:
    try:
        return os.path.commonpath([os.path.abspath(py_file), _PACKAGE_DIR]) == _PACKAGE_DIR
    except (TypeError, ValueError):
        return False


_stamp_installed = False


def use_kernel_sources_stamp() -> None:
    """Key numba's on-disk cache of llmrun's kernels by kernel_sources_digest() (module doc). Called by
    llmrun.kernels and llmrun.quants before they define kernels; does nothing on a numba without these
    internals (its own per-file stamp then applies)."""
    global _stamp_installed
    if _stamp_installed:
        return
    _stamp_installed = True
    try:
        from numba.core import caching
        impl = caching.CacheImpl
        bases = (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator,   # in the order numba tries them
                 caching.UserWideCacheLocator)
    except AttributeError:
        return

    def locator(base):
        class Locator(base):
            @classmethod
            def from_function(cls, py_func, py_file):
                return super().from_function(py_func, py_file) if _ours(py_file) else None

            def get_source_stamp(self):
                return kernel_sources_digest()
        Locator.__name__ = Locator.__qualname__ = "Llmrun" + base.__name__
        return Locator

    impl._locator_classes = [locator(b) for b in bases] + list(impl._locator_classes)


# ------------------------------------------------------------------------------------------ free cores
_SAMPLE_S = 0.25
# An average over a longer interval (the time since the previous call: a pause between requests, or the
# seconds another program just spent on its own burst) says what ran then, not now: averaged over the 3 s
# before a prefill, a 2-core burst that had ended 0.3 s earlier put the whole prefill on one thread.
_STALE_S = 1.0


class _CoreShare:
    """What other processes took of the machine's cores over the last sample interval."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[float, float, float] | None = None   # (wall, busy CPU s of the machine, own CPU s)
        self.others = 0.0

    def update(self) -> float:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last[0] < _SAMPLE_S:
                return self.others
            busy = _machine_busy_seconds()
            if busy is None:
                return 0.0
            own = time.process_time()
            if self._last is not None and now - self._last[0] <= _STALE_S:
                wall = now - self._last[0]
                self.others = max(0.0, (busy - self._last[1] - (own - self._last[2])) / wall)
            else:   # the first call, or the first after a pause: what runs now, not what ran seconds ago
                self.others = _others_running_now()
            self._last = (now, busy, own)
            return self.others


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have run since boot (/proc/stat's first line without idle and iowait)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = f.readline().split()
        ticks = [int(v) for v in fields[1:9]]   # user nice system idle iowait irq softirq steal
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _others_running_now() -> float:
    """Threads of other processes running or runnable at this instant (/proc/stat's procs_running minus this
    process's threads in state R, the caller among them): a snapshot, for when no recent average exists."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            running = next(int(line.split()[1]) for line in f if line.startswith("procs_running "))
        own = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat", encoding="ascii", errors="replace") as f:
                    own += f.read().rpartition(")")[2].split()[:1] == ["R"]
            except OSError:   # the thread ended meanwhile
                pass
        return float(max(0, running - max(own, 1)))
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0


_CORE_SHARE = _CoreShare()


def free_threads(wanted: int) -> int:
    """wanted, or fewer when other processes keep cores busy: a thread without a core of its own stalls every
    parallel region of a token (and spinning threads then burn the time slices the others need)."""
    if wanted <= 1:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    free = cores - _CORE_SHARE.update()
    return max(1, min(wanted, int(free + 0.4)))   # others at more than 0.4 of a core take one away


# ------------------------------------------------------------------------------------------ BLAS threads
_blas_limited = False
_blas_lock = threading.Lock()


def limit_blas_threads() -> None:
    """Run every loaded BLAS library on one thread from now on (see the module doc). Cheap after the first call."""
    global _blas_limited
    if _blas_limited:
        return
    with _blas_lock:
        if _blas_limited:
            return
        import threadpoolctl
        # Called, not entered as a `with` block: the limit stays for the whole process. A scoped limit would not
        # do: OpenBLAS's pthreads pool is shared by all threads, so one Llama per thread would undo each other's.
        threadpoolctl.threadpool_limits(limits=1, user_api="blas")
        # threadpoolctl >= 3.8 lets only the thread that last set a shared OpenBLAS pool change it again; hand
        # that back so that the application's own threadpoolctl calls keep working.
        release = getattr(getattr(threadpoolctl, "OpenBLASController", None), "clear_controlling_thread", None)
        if release is not None:
            release()
        _blas_limited = True


# ------------------------------------------------------------------------------------------ glibc memory
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # mallopt parameters (malloc.h)
# After loading: a forward's temporaries (a 128-token prefill of a 1.1B model: ~13 MB a layer, in blocks of
# 1-6 MB) come from the heap and stay there between layers and calls, instead of each being a fresh mapping whose
# pages fault in and are zeroed again (prefill 1.08-1.2x faster, 2026-12-02). 32 MiB: glibc's largest threshold.
_FORWARD_MMAP_THRESHOLD = 32 << 20
_FORWARD_TRIM_THRESHOLD = 64 << 20
_MADV_DONTNEED = 4       # Linux


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def fixed_mmap_threshold() -> None:
    """mallopt(M_MMAP_THRESHOLD, 1 MiB): see the module doc. Best effort."""
    fn = getattr(_libc(), "mallopt", None)
    if fn is not None:
        fn(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(1 << 20))


def forward_heap() -> None:
    """mallopt(M_MMAP_THRESHOLD, 32 MiB) and mallopt(M_TRIM_THRESHOLD, 64 MiB): see the module doc. Best effort."""
    fn = getattr(_libc(), "mallopt", None)
    if fn is not None:
        fn(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(_FORWARD_MMAP_THRESHOLD))
        fn(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(_FORWARD_TRIM_THRESHOLD))


def trim_heap() -> None:
    """malloc_trim(0): give freed heap memory back to the system. Best effort."""
    fn = getattr(_libc(), "malloc_trim", None)
    if fn is not None:
        fn(ctypes.c_size_t(0))


def drop_file_pages(raw) -> None:
    """madvise(MADV_DONTNEED) on the whole pages of `raw`, a numpy view into a read-only file mapping, so they
    stop counting as resident (see the module doc). Best effort."""
    libc = _libc()
    if libc is None or raw.size == 0:
        return
    page = mmap.PAGESIZE
    start = raw.ctypes.data
    end = start + raw.nbytes
    lo = -(-start // page) * page
    hi = end // page * page
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(_MADV_DONTNEED))


# ------------------------------------------------------------------------------------------ the compute thread
class _ComputeThread:
    """One daemon thread running the calls handed to it, in order (module doc)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._calls: queue.SimpleQueue = queue.SimpleQueue()

    def _serve(self) -> None:
        while True:
            fn, args, done, box = self._calls.get()
            try:
                box["value"] = fn(*args)
            except BaseException as e:   # handed back to the caller, whatever it is
                box["error"] = e
            finally:
                done.set()
            del fn, args, box

    def run(self, fn, *args):
        if threading.current_thread() is self._thread:   # a call made from a call already here
            return fn(*args)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="llmrun-compute", daemon=True)
                self._thread.start()
        done, box = threading.Event(), {}
        self._calls.put((fn, args, done, box))
        try:
            done.wait()
        except BaseException:        # interrupted while waiting: let the step finish first
            while not done.is_set():
                try:
                    done.wait()
                except BaseException:
                    pass
            raise
        if "error" in box:
            raise box["error"]
        return box["value"]


_COMPUTE = _ComputeThread()


def on_compute_thread(fn, *args):
    """fn(*args) on the compute thread (module doc), its result or its exception here."""
    return _COMPUTE.run(fn, *args)

