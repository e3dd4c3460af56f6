"""The fuzz harness: a registry of entry points and the rules every case must keep.

An entry point is registered with ``@target(name, n_cases)`` on a function ``cases(rng, env)`` that yields
``Case`` objects; each case's ``run(workdir)`` drives one real entry point (a file opened, a template
rendered, a CLI command, an API call ...) with one generated input. Every case must end in

* success, or a clean error: an LlmrunError (or a CLI exit 1 / click usage exit 2) whose message is one line
  and is not the CLI's "internal error" fallback -- never any other exception, never a traceback;
* bounded time: a watchdog (SIGALRM) fails a case that runs longer than CASE_SECONDS;
* bounded memory: the process's peak RSS may not grow by more than CASE_MEGABYTES during a case (and
  targets marked `isolated` run in a child process under an address-space limit, see run_isolated);
* no files left behind: the case's work folder holds afterwards exactly what it held before, plus the
  outputs the case declares (on success only).

New entry points (e.g. the server's HTTP bodies) are a new generator function decorated with ``@target``
in a module imported by test_fuzz.py. Counts per target are collected in STATS and printed by conftest.py.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

CASE_SECONDS = 30          # default hang detector, far above any case's normal time
CASE_MEGABYTES = 300       # default peak-RSS growth allowed during one case
ISOLATED_EXTRA_MB = 1500   # address space a child process may add after its imports


@dataclass
class Case:
    label: str                                  # what was generated (shown when the case fails)
    run: Callable[[Path], object]               # run(workdir); return value ignored
    outputs: tuple[str, ...] = ()               # files the case may leave in workdir when it succeeds
    setup: Callable[[Path], None] | None = None  # writes the case's input files into workdir


@dataclass
class Target:
    name: str
    n_cases: int
    generate: Callable[[random.Random, dict], Iterator[Case]]
    isolated: bool = False                      # run in a child process under resource limits
    seconds: float = CASE_SECONDS               # per case
    megabytes: float = CASE_MEGABYTES           # per case


@dataclass
class TargetStats:
    cases: int = 0
    clean_errors: int = 0
    successes: int = 0
    failures: list = field(default_factory=list)
    errors_seen: Counter = field(default_factory=Counter)


TARGETS: dict[str, Target] = {}
STATS: dict[str, TargetStats] = {}


def target(name: str, n_cases: int, isolated: bool = False, seconds: float = CASE_SECONDS,
           megabytes: float = CASE_MEGABYTES):
    """Register a case generator `fn(rng, env) -> Iterator[Case]` as fuzz target `name`."""
    def register(fn):
        TARGETS[name] = Target(name, n_cases, fn, isolated, seconds, megabytes)
        return fn
    return register


class CaseTimeout(BaseException):
    pass


class CleanCliError(Exception):
    """Raised by cli() for an exit that is a clean error (so the harness counts it as one)."""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _alarm(signum, frame):
    raise CaseTimeout("case ran longer than its time bound")


def check_clean_message(message: str) -> str | None:
    """Why an error message is not a clean one-liner (None when it is)."""
    if "\n" in message.strip():
        return "message has several lines"
    if "internal error" in message or "Traceback" in message:
        return "internal error / traceback"
    return None


def run_case(case: Case, stats: TargetStats, base: Path, seconds: float = CASE_SECONDS,
             megabytes: float = CASE_MEGABYTES) -> None:
    from llmrun.errors import LlmrunError

    stats.cases += 1
    workdir = Path(tempfile.mkdtemp(prefix="case-", dir=base))
    try:
        if case.setup is not None:
            case.setup(workdir)
        before = _listing(workdir)
        rss0 = _peak_rss_mb()
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            previous = signal.signal(signal.SIGALRM, _alarm)
            signal.setitimer(signal.ITIMER_REAL, seconds)
        ok, problem = True, None
        try:
            case.run(workdir)
        except (LlmrunError, CleanCliError) as e:
            ok = False
            problem = check_clean_message(str(e))
            stats.errors_seen[type(e).__name__] += 1
        except BaseException as e:  # anything else is a failure (KeyboardInterrupt passes through)
            if isinstance(e, KeyboardInterrupt):
                raise
            ok = False
            problem = f"{type(e).__name__}: {str(e)[:300]} | {traceback.format_exc(limit=-3)[-600:]}"
        finally:
            if in_main:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        grown = _peak_rss_mb() - rss0
        if grown > megabytes and problem is None:
            problem = f"peak memory grew by {grown:.0f} MB"
        after = _listing(workdir)
        allowed = set(before) | (set(case.outputs) if ok else set())
        if problem is None and not set(after) <= allowed:
            problem = f"files left behind: {sorted(set(after) - allowed)[:5]}"
        if problem is not None:
            stats.failures.append(f"{case.label[:300]}: {problem}")
        elif ok:
            stats.successes += 1
        else:
            stats.clean_errors += 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_target(name: str, env: dict, base: Path, seed: int = 0) -> TargetStats:
    t = TARGETS[name]
    stats = STATS.setdefault(name, TargetStats())
    rng = random.Random(f"{name}-{seed}")
    for i, case in enumerate(t.generate(rng, env)):
        if i >= t.n_cases:
            break
        run_case(case, stats, base, t.seconds, t.megabytes)
    return stats


def run_isolated(name: str, env_setup: str, base: Path, seed: int = 0) -> TargetStats:
    """run_target in a child process whose address space may grow by only ISOLATED_EXTRA_MB after its
    imports and setup (so a huge allocation fails loudly there instead of swapping the machine)."""
    import subprocess
    code = f"""
import json, resource, sys
sys.path[:0] = {[str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]!r}
import harness, test_fuzz  # registers the targets
from pathlib import Path
{env_setup}
with open("/proc/self/statm") as f:
    vm = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + {ISOLATED_EXTRA_MB} * 2**20, resource.RLIM_INFINITY))
s = harness.run_target({name!r}, env, Path({str(base)!r}), {seed})
print(json.dumps(dict(cases=s.cases, clean_errors=s.clean_errors, successes=s.successes,
                      failures=s.failures[:20], errors_seen=dict(s.errors_seen))))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    stats = STATS.setdefault(name, TargetStats())
    if res.returncode != 0:
        stats.failures.append(f"isolated run of {name} died ({res.returncode}): {res.stderr[-1500:]}")
        return stats
    data = json.loads(res.stdout.strip().splitlines()[-1])
    stats.cases += data["cases"]
    stats.clean_errors += data["clean_errors"]
    stats.successes += data["successes"]
    stats.failures += data["failures"]
    stats.errors_seen.update(data["errors_seen"])
    return stats


def cli(args: list[str], stdin: str | None = None) -> None:
    """Run the llmrun CLI in-process; return on exit 0, raise CleanCliError on a clean error exit, and raise
    AssertionError for anything else (a traceback, several error lines, a crash)."""
    from click.testing import CliRunner
    from llmrun.cli import main

    res = CliRunner().invoke(main, args, input=stdin)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"exception escaped the CLI: {type(res.exception).__name__}: {res.exception}")
    if "Traceback" in res.output:
        raise AssertionError("traceback in the CLI output")
    if res.exit_code == 0:
        return
    err = res.stderr.strip()
    if res.exit_code == 1:
        lines = err.splitlines()
        if len(lines) != 1 or not lines[0].startswith("error: "):
            raise AssertionError(f"exit 1 without exactly one error line: {err[-400:]!r}")
        raise CleanCliError(lines[0])
    if res.exit_code == 2 and ("Error:" in err or res.output.startswith("Usage:")):
        raise CleanCliError("usage: " + (err.splitlines()[-1] if err else "help shown"))   # click's usage exit
    raise AssertionError(f"exit code {res.exit_code}: {err[-400:]!r}")


def summary_lines() -> list[str]:
    if not STATS:
        return []
    lines = [f"{'target':<22}{'cases':>7}{'clean errors':>14}{'successes':>11}{'failures':>10}"]
    total = TargetStats()
    for name, s in STATS.items():
        lines.append(f"{name:<22}{s.cases:>7}{s.clean_errors:>14}{s.successes:>11}{len(s.failures):>10}")
        total.cases += s.cases
        total.clean_errors += s.clean_errors
        total.successes += s.successes
        total.failures += s.failures
    lines.append(f"{'total':<22}{total.cases:>7}{total.clean_errors:>14}{total.successes:>11}"
                 f"{len(total.failures):>10}")
    return lines
