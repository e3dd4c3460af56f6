"""The writer's temporary `.part` files: never left behind by a failed, interrupted or killed run.

* A part file is named `.NAME.PID.XXXXXXXX.part` (beside the target NAME) and holds an exclusive flock for as
  long as its writer lives.
* It is removed when the write fails, on Ctrl-C, and on SIGTERM / SIGHUP (what `kill`, `timeout` and a closed
  terminal send): while the file exists, those signals (when they would simply end the process) are turned
  into an exception, so the usual cleanup runs; the signal is then raised again, so the process still ends
  the way the sender expects. A program with its own handler for them keeps it.
* SIGKILL and power cuts cannot be handled: the next write of the same target removes part files whose
  writer is gone -- its PID is not running and nobody holds the lock -- and leaves live writers' files alone.
"""
from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS
    fcntl = None

_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)
_RANDOM = re.compile(r"[a-z0-9_]{8}")     # tempfile's name characters


class Terminated(BaseException):
    """A termination signal arrived while a part file existed (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:        # file systems without flock: fall back to the PID check alone
        return True


def stale_parts(target: Path) -> list[Path]:
    """Part files of `target` whose writer is gone (its PID not running and its lock free)."""
    folder = target.parent if str(target.parent) else Path(".")
    prefix = f".{target.name}."
    found = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".part")):
            continue
        middle = name[len(prefix):-len(".part")].split(".")
        if len(middle) == 2 and middle[0].isdigit() and _RANDOM.fullmatch(middle[1]):
            if _pid_alive(int(middle[0])):
                continue
        elif not (len(middle) == 1 and _RANDOM.fullmatch(middle[0])):   # unnamed writer (older llmrun)
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
        except OSError:
            continue
        found.append(Path(entry.path))
    return found


def remove_stale_parts(target: Path) -> None:
    for path in stale_parts(target):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if _try_lock(fd):      # nobody writes it: ours to remove
                os.unlink(path)
        except OSError:
            pass
        finally:
            os.close(fd)


class PartFile:
    """`with PartFile(target) as part:` -- write to part.fd / part.path, then rename it into place inside the
    block. Leaving the block with an exception (or a termination signal) removes the part file."""

    def __init__(self, target: Path):
        self.target = Path(target)
        self.fd: int | None = None
        self.path: str | None = None
        self._previous: dict[int, object] = {}
        self._armed = False
        self._pending: int | None = None

    def _on_signal(self, signum, frame):
        if self._armed:
            self._armed = False
            raise Terminated(signum)
        self._pending = signum          # between creating the file and knowing its name: raise right after

    def _arm(self) -> None:
        self._armed = True
        if self._pending is not None:
            self._armed = False
            raise Terminated(self._pending)

    def __enter__(self) -> "PartFile":
        remove_stale_parts(self.target)
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                previous = signal.getsignal(sig)
                if previous is not signal.SIG_DFL:
                    continue       # ignored on purpose (nohup), or the program's own handler: leave it
                self._previous[sig] = previous
                signal.signal(sig, self._on_signal)
        try:
            folder = self.target.parent if str(self.target.parent) else Path(".")
            fd, path = tempfile.mkstemp(prefix=f".{self.target.name}.{os.getpid()}.", suffix=".part", dir=folder)
            self.fd, self.path = fd, path
            _try_lock(fd)
            self._arm()
        except BaseException as e:
            self.__exit__(type(e), e, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._armed = False
        try:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if exc_type is not None and self.path is not None:
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
        finally:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
            self._previous = {}
        signum = exc.signum if isinstance(exc, Terminated) else self._pending
        if signum is not None:
            # the file is gone: now let the signal do what it would have done (end the process)
            signal.raise_signal(signum)
            raise SystemExit(128 + signum)   # if it could not (blocked): still stop here
        return False
