"""runtime.on_compute_thread: every forward runs on one thread of the process, whichever thread asks (libgomp
slows every parallel region once two threads own OpenMP teams: llmrun/runtime.py)."""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from llmrun import runtime


def test_forwards_from_any_thread_run_on_one_thread_with_the_same_bits(tmp_path, monkeypatch):
    from helpers.tiny_gguf import TinySpec, hf_model, write_gguf
    from llmrun.engine import model as model_mod
    from llmrun.gguf import GGUFReader

    spec = TinySpec(qtype="q4_0", layers=2, seed=5)
    path = write_gguf(tmp_path / "m.gguf", hf_model(spec), spec)
    with GGUFReader(path) as r:
        m = model_mod.LlamaModel.load(r, n_ctx=32)
    seen = []
    here = model_mod.LlamaModel._forward_here

    def recording(self, *args):
        seen.append(threading.get_ident())
        return here(self, *args)
    monkeypatch.setattr(model_mod.LlamaModel, "_forward_here", recording)

    def run():
        m.reset()
        return [m.forward([1, 2, 3, 4]).copy(), m.forward([5]).copy()]
    in_main = run()
    box = {}
    workers = [threading.Thread(target=lambda k=k: box.__setitem__(k, run())) for k in range(2)]
    for w in workers:   # one after the other: each resets the one cache
        w.start()
        w.join()
    for k in range(2):
        for a, b in zip(in_main, box[k]):
            np.testing.assert_array_equal(a, b)
    assert len(seen) == 6 and len(set(seen)) == 1
    assert seen[0] not in {threading.get_ident()} | {w.ident for w in workers}


def test_errors_come_back_and_nested_calls_run_in_place():
    with pytest.raises(ZeroDivisionError):
        runtime.on_compute_thread(lambda: 1 / 0)
    outer = runtime.on_compute_thread(lambda: (threading.get_ident(),
                                               runtime.on_compute_thread(threading.get_ident)))
    assert outer[0] == outer[1] != threading.get_ident()


def test_an_interrupted_caller_gets_its_interrupt_after_the_step_finished():
    """Ctrl-C while the main thread waits: the KeyboardInterrupt arrives, but only once the call in flight
    returned (a step is never abandoned half-way, with another one starting on the same cache)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    finished = threading.Event()

    def step():
        time.sleep(0.6)
        finished.set()
        return "done"

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.2, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            runtime.on_compute_thread(step)
        assert finished.is_set()
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert runtime.on_compute_thread(lambda: 42) == 42   # and the thread still serves
