"""One request's generations in the scheduler: its choices (n per prompt), their merged events, cancel.

Both API families use it: the OpenAI routes turn its events into SSE chunks, the Ollama routes into NDJSON
lines. A client that goes away cancels every choice (their slots are free at the next step).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import AsyncIterator

from ..completion_options import CompletionOptions
from ..errors import LlmrunError
from ..generate import Event
from .errors import RequestError
from .host import ModelHost
from .scheduler import Job, Scheduler


@dataclasses.dataclass
class Choice:
    index: int
    prompt_index: int
    job: Job
    parts: list[str] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


class Run:
    """n generations for each prompt (choice index = prompt * n + i, as OpenAI numbers them). With a seed,
    choice i samples with seed + i, so the choices differ and the request still repeats exactly."""

    def __init__(self, host: ModelHost, scheduler: Scheduler, prompts: list[list[int]], options: CompletionOptions,
                 n: int = 1):
        self.started = time.perf_counter()
        self.prompt_tokens = sum(len(p) for p in prompts)
        generations = []
        try:
            for p, tokens in enumerate(prompts):
                for i in range(n):
                    opts = options if options.seed is None or i == 0 else \
                        dataclasses.replace(options, seed=options.seed + i)
                    generations.append((p, host.generation(tokens, opts)))
        except LlmrunError as e:   # bad options or a prompt past the context: the client's mistake
            raise RequestError(str(e), code=_code(e)) from None
        self.choices: list[Choice] = []
        self._by_gen: dict[int, Choice] = {}
        try:
            for index, (p, gen) in enumerate(generations):
                choice = Choice(index, p, scheduler.submit(gen))
                self.choices.append(choice)
                self._by_gen[id(gen)] = choice
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        for c in self.choices:
            if not c.job.done:
                c.job.cancel()

    async def events(self) -> AsyncIterator[tuple[Choice, Event]]:
        """(choice, event) as they come from all choices, until every choice has finished."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice):
            try:
                async for event in choice.job.events():
                    await merged.put((choice, event))
            except BaseException as e:
                await merged.put((choice, e))

        tasks = [asyncio.ensure_future(pump(c)) for c in self.choices]
        left = len(self.choices)
        try:
            while left:
                choice, item = await merged.get()
                if isinstance(item, BaseException):
                    raise item
                if item.text:
                    choice.parts.append(item.text)
                if item.finish_reason is not None:
                    choice.finish_reason, choice.usage = item.finish_reason, item.usage
                    left -= 1
                yield choice, item
        finally:
            for t in tasks:
                t.cancel()
            self.cancel()

    async def finish(self) -> list[Choice]:
        async for _ in self.events():
            pass
        return self.choices

    def usage(self) -> dict:
        gen = sum(c.usage["completion_tokens"] if c.usage else 0 for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": gen,
                "total_tokens": self.prompt_tokens + gen}


def _code(e: LlmrunError) -> str | None:
    from ..errors import ContextFullError
    return "context_length_exceeded" if isinstance(e, ContextFullError) else None
