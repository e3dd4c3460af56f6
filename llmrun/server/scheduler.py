"""Continuous batching: N KV-cache slots over one set of weights, stepped together by one worker thread.

* A request is a `Generation` (generate.py). `submit()` queues it (a bounded queue: `ServerBusy` when full);
  between steps the worker gives each queued generation a free slot, the one whose cached tokens share the
  longest prefix with its prompt (so a follow-up turn of a chat only evaluates its new tokens).
* One step advances every running generation by one token, or one chunk of its prompt, with ONE batched
  forward (`generate.step` -> `BatchModel.forward_batch`): the decode steps of all slots share one pass over
  the weights. While some slots decode, prompt chunks are kept small so a long prompt does not stall them.
* Events go back through each request's thread-safe queue (runs.py reads it). `Job.cancel()` (a client went
  away) finishes the generation at the next step, or drops it from the queue at once; either way its slot is
  free again.
* `run_exclusive(fn)` / `call(fn)` run work that needs the model outside the slots (embeddings, prompt
  logprobs) on the worker thread between two steps: the model is never used from two threads at once.
* `close()` refuses new work, lets running and queued generations finish (drain), then stops the worker.
* LoRA adapters (adapters.py): each job carries its adapter configuration. A step runs the jobs of ONE
  configuration (the configurations take turns), after `install(config)` has put its side paths beside the
  weights; the others step in the next forwards. Exclusive work runs under its own configuration too. A slot
  reuses a cached prefix only for a job of the configuration that computed it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue
import threading
import time
from typing import Any, Callable

from ..generate import CacheSlot, Event, Generation, step
from ..protocols import BatchModel
from .errors import RequestError

log = logging.getLogger("llmrun.server")

PROMPT_CHUNK_ALONE = 256     # prompt tokens per step when no other slot is decoding
PROMPT_CHUNK_SHARED = 32     # ... and while others decode: they wait for this chunk at every step


class ServerBusy(RequestError):
    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, 503, code="server_busy", headers={"Retry-After": str(retry_after)})


class Job:
    """One submitted generation; its events go to `sink` (a thread-safe queue shared by a request's jobs) as
    (job, event) pairs, or (job, exception) for a fault in the engine."""

    def __init__(self, scheduler: "Scheduler", generation: Generation, sink: queue.Queue, adapters=None):
        self.scheduler = scheduler
        self.generation = generation
        self.sink = sink
        self.adapters = adapters       # its LoRA configuration (None: whatever the model has)
        self.done = False

    def _deliver(self, item: Event | BaseException) -> None:
        self.sink.put((self, item))

    def cancel(self) -> None:
        self.scheduler.cancel(self)


class Scheduler:
    def __init__(self, model: BatchModel, *, max_queue: int = 16,
                 install: Callable[[Any], None] = lambda adapters: None):
        self.model = model
        self.install = install                    # puts an adapter configuration beside the weights
        self.slots = [CacheSlot(i, int(model.n_ctx)) for i in range(int(model.n_slots))]
        self._slot_adapters: list = [None] * len(self.slots)   # the configuration each slot's cache holds
        self._last_config = None                  # the configuration stepped last (they take turns)
        self.max_queue = int(max_queue)
        self._last_used = [0.0] * len(self.slots)
        self._running: dict[int, Job] = {}        # slot index -> job
        self._queue: collections.deque[Job] = collections.deque()
        self._exclusive: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="llmrun-scheduler", daemon=True)
        self.steps = 0                            # batched forwards run (tests and /health read it)

    # ---- the requests' side (any thread) ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, generation: Generation, sink: queue.Queue, adapters=None) -> Job:
        job = Job(self, generation, sink, adapters)
        with self._cond:
            if self._closing:
                raise ServerBusy("the server is shutting down")
            waiting = len(self._queue) - (len(self.slots) - len(self._running))   # beyond the free slots
            if waiting >= self.max_queue:
                raise ServerBusy(f"all {len(self.slots)} slots are busy and {len(self._queue)} requests are "
                                 f"waiting: try again shortly")
            self._queue.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        with self._cond:
            if job in self._queue:            # never started: gone at once
                self._queue.remove(job)
                job.done = True
                return
        job.generation.cancel()               # running: finishes at the next step, which frees the slot
        with self._cond:
            self._cond.notify()

    def run_exclusive(self, fn: Callable[[], Any], adapters=None) -> concurrent.futures.Future:
        """Run fn() on the worker thread between two steps, under the adapter configuration `adapters`; a
        Future of its result (or exception)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        if threading.current_thread() is self._thread:   # already there (a nested call)
            self.install(adapters)
            future.set_result(fn())
            return future
        with self._cond:
            if self._closing and not self._thread.is_alive():
                raise ServerBusy("the server is shutting down")
            self._exclusive.append((fn, future, adapters))
            self._cond.notify()
        return future

    def call(self, fn: Callable[[], Any], adapters=None) -> Any:
        """run_exclusive and wait for the result (from a request's thread)."""
        return self.run_exclusive(fn, adapters).result()

    def stats(self) -> dict:
        with self._cond:
            return {"slots_total": len(self.slots), "slots_busy": len(self._running),
                    "queued": len(self._queue), "steps": self.steps}

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what is running and queued, stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the worker ------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._running or self._queue or self._exclusive or self._closing):
                    self._cond.wait()
                if self._closing and not (self._running or self._queue or self._exclusive):
                    return
                exclusive = list(self._exclusive)
                self._exclusive.clear()
                self._admit()
                jobs = self._one_config(list(self._running.values()))
            for fn, future, adapters in exclusive:
                if future.set_running_or_notify_cancel():
                    try:
                        self.install(adapters)
                        future.set_result(fn())
                    except BaseException as e:     # delivered to the awaiting handler
                        future.set_exception(e)
            if jobs:
                try:
                    self.install(jobs[0].adapters)
                except BaseException as e:   # cannot happen with checked adapters; never kill the worker
                    self._fail(jobs, e)
                    continue
                self._step(jobs)

    def _one_config(self, jobs: list[Job]) -> list[Job]:
        """The running jobs of the configuration whose turn it is: the first, in order of the slots, after
        the one stepped last, so that every configuration steps in turn."""
        configs = list(dict.fromkeys(j.adapters for j in jobs))
        if len(configs) <= 1:
            chosen = configs[0] if configs else None
        else:
            after = configs.index(self._last_config) + 1 if self._last_config in configs else 0
            chosen = configs[after % len(configs)]
        self._last_config = chosen
        return [j for j in jobs if j.adapters == chosen]

    def _admit(self) -> None:
        """Queued jobs into free slots, in order of arrival (under the lock)."""
        while self._queue and len(self._running) < len(self.slots):
            job = self._queue.popleft()
            slot = self._choose_slot(job.generation.prompt, job.adapters)
            if self._slot_adapters[slot.index] != job.adapters:   # its cache was computed with other weights
                slot.clear()
                self._slot_adapters[slot.index] = job.adapters
            job.generation.slot = slot
            self._running[slot.index] = job

    def _choose_slot(self, prompt: list[int], adapters) -> CacheSlot:
        """The free slot whose cached tokens (computed under the same adapters) share the longest prefix with
        `prompt`; among equals the one used least recently (it keeps the other slots' prefixes for the
        requests that may want them)."""
        best, best_key = None, None
        for slot in self.slots:
            if slot.index in self._running:
                continue
            n = 0
            for a, b in zip(slot.tokens if self._slot_adapters[slot.index] == adapters else (), prompt):
                if a != b:
                    break
                n += 1
            key = (n, -self._last_used[slot.index])
            if best_key is None or key > best_key:
                best, best_key = slot, key
        return best

    def _step(self, jobs: list[Job]) -> None:
        gens = [j.generation for j in jobs]
        chunk = PROMPT_CHUNK_SHARED if any(g.prompt_done for g in gens) else PROMPT_CHUNK_ALONE
        try:
            events = step(self.model, gens, prompt_chunk=chunk)
        except BaseException as e:      # a fault in the engine: these requests fail, the server goes on
            self._fail(jobs, e)
            return
        self.steps += 1
        by_gen = {id(j.generation): j for j in jobs}
        finished = []
        for event in events:
            job = by_gen[id(event.generation)]
            job._deliver(event)
            if event.finish_reason is not None:
                finished.append(job)
        if finished:
            with self._cond:
                for job in finished:
                    self._release(job)

    def _fail(self, jobs: list[Job], e: BaseException) -> None:
        log.error("generation step failed: %s: %s", type(e).__name__, e)
        fault = RequestError("the model failed while generating (see the server log)", 500)
        with self._cond:
            for job in jobs:
                self._release(job)
        for job in jobs:
            job.generation.close()
            job._deliver(fault)

    def _release(self, job: Job) -> None:
        job.done = True
        index = job.generation.slot.index
        if self._running.get(index) is job:
            del self._running[index]
            self._last_used[index] = time.monotonic()
