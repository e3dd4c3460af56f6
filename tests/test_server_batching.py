"""Continuous batching in the server: the scheduler on scripted fakes (slot choice by shared prefix, prompt
chunks interleaved with decoding, queue bounds, cancel), then the real server: 8 parallel greedy streams give
the sequential answers, and streams dropped mid-answer (or mid-prompt) free their slots."""
from __future__ import annotations

import json
import queue
import threading

import httpx
import pytest

from helpers.fake_llm import GO, ByteTokenizer, ScriptedModel
from helpers.server import ServerProcess
from llmrun.generate import CacheSlot, Generation, PerSlotModels
from llmrun.server.scheduler import PROMPT_CHUNK_SHARED, Scheduler, ServerBusy
from llmrun.text.sampling import Sampler, SamplingParams


class RecordingBatch:
    """A BatchModel wrapper recording each step as [(slot, pos, n_tokens), ...]."""

    def __init__(self, inner):
        self.inner, self.n_slots, self.n_ctx = inner, inner.n_slots, inner.n_ctx
        self.calls: list[list[tuple[int, int, int]]] = []

    def forward_batch(self, batch):
        self.calls.append([(item.slot, item.pos, len(item.tokens)) for item in batch])
        return self.inner.forward_batch(batch)


def gen(prompt: bytes, max_tokens=None) -> Generation:
    tokens = list(prompt) + [GO]
    return Generation(tokens, CacheSlot(-1, 1024), ByteTokenizer(), Sampler(SamplingParams(temperature=0)),
                      max_tokens=max_tokens)


def submit(sched, generation):
    """A job with a queue of its own; events(job) reads it (bounded waits)."""
    return sched.submit(generation, queue.Queue())


def events(job):
    while True:
        got, item = job.sink.get(timeout=60)
        assert got is job
        if isinstance(item, BaseException):
            raise item
        yield item
        if item.finish_reason is not None:
            return


def text_of(job) -> tuple[str, str]:
    parts, finish = [], None
    for ev in events(job):
        parts.append(ev.text)
        finish = ev.finish_reason
    return "".join(parts), finish


def fake_scheduler(n_slots=2, script=b"reply", max_queue=4, delay=0.0):
    engine = RecordingBatch(PerSlotModels([ScriptedModel(script, n_ctx=1024, delay=delay) for _ in range(n_slots)]))
    sched = Scheduler(engine, max_queue=max_queue)
    sched.start()
    return sched, engine


def test_slot_with_longest_shared_prefix_is_chosen():
    sched, engine = fake_scheduler()
    try:
        a = submit(sched, gen(b"system: be nice. user: hello"))
        assert text_of(a) == ("reply", "stop")
        b = submit(sched, gen(b"another request entirely"))
        text_of(b)
        assert a.generation.slot.index != b.generation.slot.index   # the free, least recently used slot
        follow = gen(b"system: be nice. user: hello" + b" and more")
        c = submit(sched, follow)
        text_of(c)
        assert c.generation.slot.index == a.generation.slot.index
        assert follow.timings["n_prompt_reused"] == len(b"system: be nice. user: hello")
    finally:
        sched.close(10)


def test_prompt_chunks_stay_small_while_others_decode():
    sched, engine = fake_scheduler(script=b"x" * 200, delay=0.005)   # the first still decodes meanwhile
    try:
        first = submit(sched, gen(b"short", max_tokens=150))
        it = events(first)
        next(it)                                   # decoding now
        second = submit(sched, gen(b"p" * 300, max_tokens=2))
        text_of(second)
        for _ in it:
            pass
    finally:
        sched.close(10)
    with_prompt = [c for c in engine.calls if any(n > 1 for _, _, n in c)]
    # every step that fed the long prompt also decoded the first generation, with a small chunk
    assert sum(n for c in with_prompt for _, _, n in c if n > 1) >= 300 - 1
    for c in with_prompt[1:]:
        assert len(c) == 2 and max(n for _, _, n in c) <= PROMPT_CHUNK_SHARED


def test_queue_bound_cancel_while_queued_and_work_between_steps():
    sched, engine = fake_scheduler(n_slots=1, script=b"y" * 50, max_queue=1, delay=0.01)
    try:
        running = submit(sched, gen(b"a", max_tokens=40))
        it = events(running)
        next(it)
        queued = submit(sched, gen(b"b"))
        with pytest.raises(ServerBusy) as e:
            submit(sched, gen(b"c"))
        assert e.value.status == 503 and e.value.headers["Retry-After"]
        queued.cancel()                            # never ran: gone at once, room in the queue again
        assert sched.stats()["queued"] == 0
        again = submit(sched, gen(b"d", max_tokens=1))
        worker = sched.call(threading.current_thread)   # runs on the scheduler's thread, between steps
        assert worker.name == "llmrun-scheduler"
        running.cancel()
        assert [ev.finish_reason for ev in it][-1] == "cancelled"
        assert text_of(again)[1] == "length"
        assert queued.generation.slot.index == -1      # the cancelled one never got a slot
    finally:
        sched.close(10)


# ---- the real server -------------------------------------------------------------------------------------------
QUESTIONS = ["What is the capital of France?", "Name three colours.", "What is 2 + 2?", "Say hello in Spanish.",
             "What is the largest planet?", "Who wrote Hamlet?", "What do bees make?", "How many legs has a cat?"]


@pytest.fixture(scope="module")
def server(default_model):
    with ServerProcess(default_model, "--parallel", "4", "--ctx", "1024") as srv:
        yield srv


def stream_text(http: httpx.Client, question: str, max_tokens=32) -> str:
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": max_tokens,
            "stream": True}
    parts = []
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                parts.append(choice["delta"].get("content", ""))
    return "".join(parts)


def test_parallel_greedy_streams_equal_sequential(server):
    with server.client() as http:
        sequential = [stream_text(http, q) for q in QUESTIONS]
    results: dict[int, str] = {}
    errors = []

    def worker(i):
        try:
            with server.client() as http:
                results[i] = stream_text(http, QUESTIONS[i])
        except Exception as e:   # reported below
            errors.append(e)

    steps_before = server.wait_idle()["steps"]
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and len(results) == len(QUESTIONS)
    assert [results[i] for i in range(len(QUESTIONS))] == sequential
    assert all(sequential)
    # they really ran together: far fewer batched steps than tokens generated
    steps = server.wait_idle()["steps"] - steps_before
    assert steps < 0.6 * sum(len(s) for s in sequential)


def test_dropped_streams_free_their_slots(server):
    body = {"messages": [{"role": "user", "content": "Tell me a very long story about dragons."}],
            "max_tokens": 500, "temperature": 1, "stop": ["never"], "stream": True}
    clients = [server.client() for _ in range(4)]
    try:
        for http in clients:
            with http.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                got = 0
                while got < 2:                         # two chunks, then hang up
                    if next(lines).startswith("data: "):
                        got += 1
        server.wait_idle(30)
        # dropped while its prompt is still being read: the slot frees too
        long_prompt = {"messages": [{"role": "user", "content": "word " * 700}], "max_tokens": 500, "stream": True}
        with clients[0].stream("POST", "/v1/chat/completions", json=long_prompt) as r:
            assert r.status_code == 200
        server.wait_idle(30)
        # a non-streaming request whose client gives up (a long prompt: with a short one the model may end its
        # answer at once, before the client's timeout)
        with pytest.raises(httpx.ReadTimeout):
            clients[1].post("/v1/chat/completions", json={**long_prompt, "stream": False}, timeout=0.5)
        server.wait_idle(30)
    finally:
        for http in clients:
            http.close()
    with server.client() as http:
        assert stream_text(http, QUESTIONS[0], max_tokens=4)
