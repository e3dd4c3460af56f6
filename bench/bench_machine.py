"""The machine bench_compare.py runs on: its description for the table's header, the bytes a decode step reads
(for the read-bandwidth ceiling), waiting for a quiet machine, and the CPU time others take meanwhile."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    import numba
    import numpy
    parts = [time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), cpu_name(), f"{os.cpu_count()} cores",
             f"python {platform.python_version()}", f"numpy {numpy.__version__}", f"numba {numba.__version__}"]
    try:
        from importlib.metadata import version
        parts.append(f"llama-cpp-python {version('llama-cpp-python')}")
    except Exception:
        pass
    return ", ".join(parts)


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights one decode step reads from the file: every matrix once; of the token embeddings
    only one row, unless they double as the output matrix (tied)."""
    from llmrun.gguf import GGUFReader

    with GGUFReader(path) as r:
        total = sum(ti.nbytes for ti in r.tensors.values() if ti.name != "token_embd.weight")
        if "output.weight" not in r.tensors and "token_embd.weight" in r.tensors:
            total += r.tensors["token_embd.weight"].nbytes
    return total


def wait_for_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait up to max_wait_s for the 1-minute load average to fall to max_load; return the last reading."""
    deadline = time.monotonic() + max_wait_s
    load = os.getloadavg()[0]
    while load > max_load and time.monotonic() < deadline:
        print(f"[bench] load average {load:.2f} > {max_load}: waiting for a quiet machine ...", flush=True)
        time.sleep(10)
        load = os.getloadavg()[0]
    return load


class ForeignLoad:
    """CPU time the rest of the machine used while a case ran: all busy CPU time (/proc/stat) minus this
    benchmark's own (its process and its finished workers). Average number of cores taken by others."""

    def __init__(self):
        self._start = self._read()

    @staticmethod
    def _read():
        import resource
        try:
            fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            ticks = [int(v) for v in fields]
            busy = (sum(ticks) - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = None
        own = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for f in ("ru_utime", "ru_stime"))
        return time.monotonic(), busy, own

    def cores(self) -> float | None:
        t1, busy1, own1 = self._read()
        t0, busy0, own0 = self._start
        if busy0 is None or busy1 is None or t1 <= t0:
            return None
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)
