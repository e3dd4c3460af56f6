"""What every route needs: the configuration, the model host, the scheduler; and waiting on a run while
watching for the client to go away."""
from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, Awaitable

from starlette.requests import Request

from .. import __version__
from ..errors import LlmrunError
from .errors import RequestError
from .host import ModelHost
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
        self.scheduler = Scheduler(host.batch, max_queue=config.max_queue)
        self.fingerprint = f"llmrun-{__version__}"

    @staticmethod
    def of(request: Request) -> "ServerState":
        return request.app.state.server

    async def embed(self, inputs: Any) -> dict:
        """The Python API's create_embedding, run on the scheduler's thread between two steps (the model is
        never used from two threads at once)."""
        create = getattr(self.host.llm, "create_embedding", None)
        if create is None:
            raise RequestError("embeddings are not supported by this build", 501, code="unsupported")
        try:
            return await self.scheduler.run_exclusive(lambda: create(inputs))
        except LlmrunError as e:
            if isinstance(e, RequestError):
                raise
            raise RequestError(str(e), param="input") from None


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


class ClientGone(Exception):
    """The client closed the connection before the answer was ready (nothing to send)."""


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
