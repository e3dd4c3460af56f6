"""Temporary files of interrupted writes (issue 10, defect 6): SIGTERM / SIGHUP during quantize or convert
remove the `.part` file, and the next write of the same target removes part files of killed writers -- but
never the file of a writer that is still running."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from llmrun.gguf import GGMLType, GGUFWriter

SLOW_WRITER = textwrap.dedent("""
    import signal, sys, time
    # as from a terminal: a test run under nohup would hand SIGHUP down ignored, which the writer rightly keeps
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    import numpy as np
    from llmrun.gguf import GGMLType, GGUFWriter
    w = GGUFWriter(sys.argv[1], overwrite=True)
    def slow():
        print("writing", flush=True)
        time.sleep(60)
        return np.zeros(32, np.float32)
    w.add_tensor("a", (32,), GGMLType.F32, np.zeros(32, np.float32))
    w.add_tensor("b", (32,), GGMLType.F32, slow)
    w.write()
""")


def _parts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def _start_and_wait(args, folder: Path, marker=None) -> subprocess.Popen:
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _parts(folder):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "no part file appeared"
        time.sleep(0.02)
    if marker:
        assert proc.stdout.readline().strip() == marker
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_signal_during_write_removes_the_part_file(tmp_path, sig):
    target = tmp_path / "out.gguf"
    proc = _start_and_wait([sys.executable, "-c", SLOW_WRITER, str(target)], tmp_path, marker="writing")
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode == -sig          # still ends the way the sender expects
    assert _parts(tmp_path) == [] and not target.exists()
    assert "Traceback" not in proc.stderr.read()


def test_sigterm_during_quantize_cli(tmp_path, default_model):
    target = tmp_path / "q.gguf"
    proc = _start_and_wait([sys.executable, "-m", "llmrun.cli", "quantize", str(default_model), str(target),
                            "--type", "q4_k_m"], tmp_path)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr.read()
    assert _parts(tmp_path) == [] and not target.exists()


def test_next_write_removes_stale_parts_of_dead_writers_only(tmp_path):
    from llmrun.gguf.partfiles import stale_parts
    target = tmp_path / "m.gguf"
    # a writer that is alive right now, and then one killed with SIGKILL (its part file stays)
    live = _start_and_wait([sys.executable, "-c", SLOW_WRITER, str(target)], tmp_path, marker="writing")
    try:
        live_part = _parts(tmp_path)
        assert len(live_part) == 1 and str(live.pid) in live_part[0]
        victim = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        assert victim.stdout.readline().strip() == "writing"
        assert _parts(tmp_path) != live_part            # the victim did not touch the live writer's file
        victim.kill()
        victim.wait()
        killed = [p for p in _parts(tmp_path) if str(victim.pid) in p]
        assert len(killed) == 1 and live_part[0] in _parts(tmp_path)
        # an old-style name (no pid) that nobody holds; unrelated files that only look similar
        (tmp_path / ".m.gguf.abcd1234.part").write_bytes(b"x")
        for other in (".m.gguf.x.gguf.123.abcdefgh.part", ".m.gguf.keep", "m.gguf.abcdefgh.part"):
            (tmp_path / other).write_bytes(b"y")
        assert sorted(p.name for p in stale_parts(target)) == sorted(killed + [".m.gguf.abcd1234.part"])
        w = GGUFWriter(target, overwrite=True)
        w.add_tensor("a", (32,), GGMLType.F32, np.ones(32, np.float32))
        w.write()
        assert _parts(tmp_path) == sorted(live_part + [".m.gguf.x.gguf.123.abcdefgh.part", "m.gguf.abcdefgh.part"])
        assert (tmp_path / ".m.gguf.keep").exists() and target.exists()
    finally:
        live.kill()
        live.wait()


def test_a_held_lock_protects_a_part_file_whatever_its_name(tmp_path):
    """A writer in another PID namespace (a container) looks dead by PID; its flock still protects it."""
    import fcntl
    part = tmp_path / ".c.gguf.999999999.abcdefgh.part"
    part.write_bytes(b"z")
    with open(part, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        w = GGUFWriter(tmp_path / "c.gguf")
        w.add_tensor("a", (32,), GGMLType.F32, np.ones(32, np.float32))
        w.write()
        assert part.exists()
    w = GGUFWriter(tmp_path / "c.gguf", overwrite=True)
    w.add_tensor("a", (32,), GGMLType.F32, np.ones(32, np.float32))
    w.write()
    assert not part.exists()


def test_part_file_names_carry_the_pid(tmp_path):
    seen = []

    def data():
        seen.extend(_parts(tmp_path))
        return np.zeros(32, np.float32)

    w = GGUFWriter(tmp_path / "n.gguf")
    w.add_tensor("a", (32,), GGMLType.F32, data)
    w.write()
    assert len(seen) == 1 and seen[0].startswith(f".n.gguf.{os.getpid()}.") and _parts(tmp_path) == []
