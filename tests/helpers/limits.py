"""Test-only: run Python code in a fresh process under resource limits (address space, CPU time), so that a
regression that allocates gigabytes or spins fails the test instead of taking the machine down."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# Runs first in the child: after `setup` (imports, warm-up), cap the address space at what is mapped now plus
# the allowance, and the CPU time.
_PRELUDE = """
import resource as _resource
def _limit(extra_mb, cpu_s):
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * _resource.getpagesize()
    _resource.setrlimit(_resource.RLIMIT_AS, (vm + extra_mb * 2**20, _resource.RLIM_INFINITY))
    _resource.setrlimit(_resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
"""


def run_limited(setup: str, body: str, *, extra_mb: int = 300, cpu_seconds: int = 60, stdin: str | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """`setup` runs unlimited, then `body` with at most `extra_mb` more address space and `cpu_seconds`."""
    code = (_PRELUDE + textwrap.dedent(setup) + f"\n_limit({extra_mb}, {cpu_seconds})\n" + textwrap.dedent(body))
    return subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def outcomes(proc: subprocess.CompletedProcess) -> dict:
    """The JSON object a child printed on its last stdout line (asserting that it exited cleanly)."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
