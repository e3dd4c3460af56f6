"""runtime.free_threads: the decode thread count follows the cores other processes leave free, so that llmrun's
spinning OpenMP threads never wait for a core another process holds (llmrun/runtime.py)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from llmrun import runtime


class FakeClock:
    def __init__(self):
        self.wall = self.busy = self.own = 0.0
        self.running_now = 0.0   # other processes' threads running at this instant

    def advance(self, seconds, others, own):
        """`seconds` pass; other processes use `others` cores, this process `own` cores."""
        self.wall += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(runtime, "_CORE_SHARE", runtime._CoreShare())
    monkeypatch.setattr(runtime, "_machine_busy_seconds", lambda: c.busy)
    monkeypatch.setattr(runtime, "_others_running_now", lambda: c.running_now)
    monkeypatch.setattr(runtime.time, "monotonic", lambda: c.wall)
    monkeypatch.setattr(runtime.time, "process_time", lambda: c.own)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    return c


@pytest.mark.parametrize("others, own, expected", [(0.0, 2.0, 2), (0.3, 1.7, 2), (0.7, 1.3, 1), (1.0, 1.0, 1),
                                                   (1.9, 0.1, 1)])
def test_threads_follow_the_free_cores(clock, others, own, expected):
    assert runtime.free_threads(2) == 2           # the first call has nothing to compare with
    clock.advance(0.3, others, own)
    assert runtime.free_threads(2) == expected
    assert runtime.free_threads(1) == 1


def test_samples_at_most_every_quarter_second(clock):
    runtime.free_threads(2)
    clock.advance(0.3, 1.0, 1.0)
    assert runtime.free_threads(2) == 1
    clock.advance(0.1, 0.0, 2.0)                  # too soon: the last sample stands
    assert runtime.free_threads(2) == 1
    clock.advance(0.3, 0.0, 2.0)
    assert runtime.free_threads(2) == 2


def test_a_burst_that_ended_does_not_count_after_a_pause(clock):
    runtime.free_threads(2)
    clock.advance(2.5, 2.0, 0.0)                  # another program's 2-core burst while this one waited
    clock.advance(0.3, 0.0, 0.0)                  # ... which ended 0.3 s ago: its average is stale
    assert runtime.free_threads(2) == 2
    clock.advance(0.3, 1.0, 1.0)                  # then a fresh quarter second decides again
    assert runtime.free_threads(2) == 1


def test_after_a_pause_what_runs_now_decides(clock):
    runtime.free_threads(2)
    clock.advance(3.0, 0.0, 0.0)
    clock.running_now = 1.0                       # a busy thread of another process, right now
    assert runtime.free_threads(2) == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux's /proc/stat and two cores")
def test_the_snapshot_sees_a_busy_process_but_not_this_one():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        seen = max(runtime._others_running_now() for _ in range(20))
    finally:
        busy.kill()
        busy.wait()
    assert seen >= 1.0


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux's /proc/stat and two cores")
def test_a_busy_process_takes_a_core_away():
    cores = len(os.sched_getaffinity(0))
    share = runtime._CoreShare()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        share.update()
        time.sleep(0.6)
        others = share.update()
    finally:
        busy.kill()
        busy.wait()
    assert others >= 0.6          # the loop's core (plus whatever else runs here)
    assert int(cores - others + 0.4) <= cores - 1


def test_llmrun_spins_briefly_unless_told_otherwise():
    code = "import llmrun, os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True,
                                   check=True).stdout.split()
    assert run(env) == [runtime.SPIN_COUNT, "None"]
    assert run({**env, "OMP_WAIT_POLICY": "PASSIVE"}) == ["None", "PASSIVE"]     # a user's policy is kept
    assert run({**env, "GOMP_SPINCOUNT": "0"}) == ["0", "None"]


def test_a_prompt_rechecks_the_free_cores_per_layer_with_the_same_bits(tmp_path, monkeypatch):
    """A prefill lasts seconds: the thread count is looked at again before every layer (a decode step once), and
    changing it between layers changes no bit of the logits."""
    import numba
    import numpy as np

    from helpers.tiny_gguf import TinySpec, hf_model, write_gguf
    from llmrun.engine import model as model_mod
    from llmrun.gguf import GGUFReader

    spec = TinySpec(qtype="q4_0", layers=3, seed=11)
    path = write_gguf(tmp_path / "m.gguf", hf_model(spec), spec)
    with GGUFReader(path) as r:
        m = model_mod.LlamaModel.load(r, n_ctx=32)
    prompt, nxt = list(range(1, 20)), [7]
    m.n_threads = 2
    steady = [m.forward(prompt).copy(), m.forward(nxt).copy()]

    asked = []
    def alternating(wanted):   # 2, 1, 2, 1, ... threads, whatever the machine does
        asked.append(wanted)
        return min(wanted, 1 + len(asked) % 2)
    monkeypatch.setattr(model_mod, "free_threads", alternating)
    m.cache = m.new_cache()
    prefill = m.forward(prompt)
    assert len(asked) == spec.layers
    decode = m.forward(nxt)
    assert len(asked) == spec.layers + 1
    np.testing.assert_array_equal(prefill, steady[0])
    np.testing.assert_array_equal(decode, steady[1])
    assert numba.get_num_threads() in (1, 2)
