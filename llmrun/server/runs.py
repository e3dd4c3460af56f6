"""One request's generations in the scheduler.

Requests run through the Python API's own methods (`create_chat_completion`, `create_completion`, ...), so
the server takes every parameter they take and shapes results as they do. Only the running differs:
`ServedLlama._run_choices` (host.py) hands a call's generations to the scheduler instead of running them
one after the other, and registers them with the request's `Run`, found through a context variable that
the route sets before it calls the API in a worker thread. The Run cancels them all when the client goes
away, and knows what the OpenAI and Ollama shapes need beyond the API's results (usage for
`stream_options.include_usage`, Ollama's durations and context).
"""
from __future__ import annotations

import contextvars
import queue
import threading
import time
from typing import Iterator

from ..generate import Event, Generation
from .scheduler import Job, Scheduler

current_run: contextvars.ContextVar["Run | None"] = contextvars.ContextVar("llmrun_server_run", default=None)


class Run:
    """The jobs of one request (several API calls may add theirs: one per prompt of a completion)."""

    def __init__(self, adapters=None):
        self.started = time.perf_counter()
        self.adapters = adapters             # the LoRA configuration its generations run with (adapters.py)
        self.calls: list[list[Job]] = []     # per API call: its choices' jobs (they share one prompt)
        self._lock = threading.Lock()
        self._cancelled = False

    @property
    def jobs(self) -> list[Job]:
        return [job for call in self.calls for job in call]

    def add(self, jobs: list[Job]) -> None:
        with self._lock:
            self.calls.append(jobs)
            cancelled = self._cancelled
        if cancelled:             # the client left while this call was being set up
            for job in jobs:
                job.cancel()

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            jobs = list(self.jobs)
        for job in jobs:
            if not job.done:
                job.cancel()

    def usage(self) -> dict:
        """OpenAI's usage over every choice (each prompt counted once)."""
        n_prompt = sum(len(call[0].generation.prompt) for call in self.calls if call)
        n_gen = sum(len(j.generation.generated) for j in self.jobs)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    @property
    def first(self) -> Generation | None:
        return self.jobs[0].generation if self.jobs else None


def run_choices(scheduler: Scheduler, generations: list[Generation]) -> Iterator[tuple[int, Event]]:
    """Submit a call's generations (its n choices) at once and yield (choice index, event) as the scheduler
    steps them. Choices after the first get random streams of their own, spawned from the call's generator,
    so that a seed gives the same choices whatever else the server runs beside them."""
    if len(generations) > 1:
        for gen, child in zip(generations[1:], generations[0].sampler.rng.spawn(len(generations) - 1)):
            gen.sampler.rng = child
    sink: queue.Queue = queue.Queue()
    jobs: list[Job] = []
    run = current_run.get()
    try:
        for gen in generations:
            jobs.append(scheduler.submit(gen, sink, run.adapters if run is not None else None))
    except BaseException:
        for job in jobs:
            job.cancel()
        raise
    if run is not None:
        run.add(jobs)
    index = {id(job): i for i, job in enumerate(jobs)}

    def events() -> Iterator[tuple[int, Event]]:
        left = len(jobs)
        try:
            while left:
                job, item = sink.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None:
                    left -= 1
                yield index[id(job)], item
        finally:
            for job in jobs:          # the consumer stopped early: free the slots
                if not job.done:
                    job.cancel()
    return events()
