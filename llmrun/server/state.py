"""What every route needs: the configuration, the model host, the scheduler; calling the Python API for a
request (in a worker thread, its generations registered with the request's Run) while watching for the client
to go away."""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import threading
from typing import Awaitable, Iterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .. import __version__
from ..errors import ContextFullError, LlmrunError
from .errors import RequestError
from .host import ModelHost
from .runs import Run, current_run
from .scheduler import Scheduler

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None         # every endpoint but the static chat page then needs Bearer KEY
    cors_origins: tuple[str, ...] = ()  # browsers on these origins may call the API (none by default)
    max_body_bytes: int = 8 << 20      # 413 beyond
    max_queue: int = 16                # requests waiting for a slot beyond the free ones (503 beyond)
    max_tokens: int | None = None      # per request; None: the context size
    max_n: int = 8                     # choices per request
    drain_seconds: float = 60.0        # SIGTERM: how long running requests may take to finish
    log_requests: bool = False         # access log (method, path, status; never a prompt)

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


class ServerState:
    def __init__(self, host: ModelHost, config: ServerConfig):
        self.host = host
        self.config = config
        self.scheduler = Scheduler(host.batch, max_queue=config.max_queue, install=host.adapters.install)
        host.attach(self.scheduler)
        self.fingerprint = f"llmrun-{__version__}"

    @staticmethod
    def of(request: Request) -> "ServerState":
        return request.app.state.server

    async def call(self, request: Request, run: Run, fn, *args, **kwargs):
        """fn(*args, **kwargs) (an API call) in a worker thread with `run` as its request, so that the
        generations it makes join the scheduler under this request; cancelled if the client disconnects.
        Bad input the API refuses becomes a 400 (ContextFullError: context_length_exceeded)."""
        token = current_run.set(run)     # run_in_threadpool copies the context into the worker thread
        try:
            return await until_disconnect(request, run, run_in_threadpool(_client_errors, fn, *args, **kwargs))
        finally:
            current_run.reset(token)


def _client_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RequestError:
        raise
    except ContextFullError as e:
        raise RequestError(str(e), code="context_length_exceeded") from None
    except RecursionError:
        raise RequestError("the request is nested too deeply") from None
    except LlmrunError as e:
        raise RequestError(str(e)) from None


async def until_disconnect(request: Request, run, work: Awaitable):
    """Await `work` (a non-streaming run), cancelling the run if the client disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    run.cancel()
    raise ClientGone()


async def iterate_in_thread(iterator: Iterator):
    """The items of a blocking iterator (an API call's stream), run to its end in one worker thread that hands
    each item to the event loop as it comes. (A worker call per item cost three thread hand-offs per token and
    stream, each one a wake-up that took a core from the decode threads: ~3 ms per token of one stream went to
    the HTTP side, 2026-12-01.) Cancelling abandons the wait instead of the thread (during a long prompt no item
    may come for seconds): the caller then cancels the run, which ends the iterator's generations at the
    scheduler's next step, and with them the thread."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    end = object()

    def hand(item, error=None) -> bool:
        try:
            loop.call_soon_threadsafe(items.put_nowait, (item, error))
            return True
        except RuntimeError:   # the loop is closed: the server is gone, nobody reads
            return False

    def pump() -> None:
        try:
            for item in iterator:
                if not hand(item):
                    return
        except BaseException as e:   # delivered to the awaiting route
            hand(end, e)
        else:
            hand(end)

    context = contextvars.copy_context()   # the request's Run, as a worker call would see it
    threading.Thread(target=context.run, args=(pump,), name="llmrun-stream", daemon=True).start()
    while True:
        item, error = await items.get()
        if item is end:
            if error is not None:
                raise error
            return
        yield item


class ClientGone(Exception):
    """The client closed the connection before the answer was ready (nothing to send)."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
