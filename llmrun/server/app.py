"""The ASGI application: routes, the guard in front of them (host, origin, API key), CORS when asked for,
the chat page, and errors in the shape each API family's clients expect.

Starlette (with uvicorn) because it is the small, well-kept core FastAPI itself is built on: routing,
streaming responses, static files and middleware, nothing we would not use; request checking is ours
(params.py), so no validation framework comes along.
"""
from __future__ import annotations

import contextlib
import hmac
import logging
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import LlmrunError
from . import ollama_api, openai_api
from .errors import RequestError, error_response
from .host import ModelHost
from .state import LOOPBACK_HOSTS, ClientGone, ServerConfig, ServerState

log = logging.getLogger("llmrun.server")
STATIC = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/", "/index.html", "/favicon.ico")   # the chat page needs no key (it holds no data)
# The page runs only its own script and talks only to this server; nothing may frame it.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                           "connect-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                           "form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class Guard:
    """Before any route: the Host header (loopback names only when bound to loopback: no DNS rebinding), the
    Origin of browser requests (this server's own page or a --cors origin: no other web page can drive the
    model), and the API key when one is set (401)."""

    def __init__(self, app, config: ServerConfig):
        self.app = app
        self.config = config
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        host = headers.get("host", "")
        err = None
        if self.config.loopback and _hostname(host) not in LOOPBACK_HOSTS:
            err = RequestError(f"the Host header {host!r} is not this server's (it serves loopback only)", 421,
                               code="misdirected_request")
        elif "origin" in headers and not self._origin_ok(headers["origin"], host):
            err = RequestError(f"requests from the web origin {headers['origin']!r} are not allowed "
                               f"(start the server with --cors ORIGIN to allow one)", 403, code="origin_not_allowed")
        elif self.key is not None and not _is_public(path) and not self._key_ok(headers.get("authorization", "")):
            err = RequestError("a valid API key is required: send 'Authorization: Bearer KEY'", 401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if err is not None:
            return await error_response(path, err)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host: str) -> bool:
        if origin in self.config.cors_origins or "*" in self.config.cors_origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host

    def _key_ok(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)


def _hostname(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header[:host_header.find("]") + 1]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith("/static/")


# ---- plain routes ------------------------------------------------------------------------------------------
async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)


async def health(request: Request) -> Response:
    state = ServerState.of(request)
    return JSONResponse({"status": "ok", "model": state.host.name, **state.scheduler.stats()})


# ---- errors -------------------------------------------------------------------------------------------------
async def _request_error(request: Request, exc: RequestError) -> Response:
    return error_response(request.url.path, exc)


async def _llmrun_error(request: Request, exc: LlmrunError) -> Response:
    return error_response(request.url.path, RequestError(str(exc)))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error_response(request.url.path, RequestError(message, exc.status_code, headers=exc.headers))


async def _client_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)


async def _server_fault(request: Request, exc: Exception) -> Response:
    # Logged without the request (prompts are not logged); the client learns only that it was us.
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(request.url.path, RequestError("internal server error", 500))


def create_app(host: ModelHost, config: ServerConfig = ServerConfig()) -> Starlette:
    state = ServerState(host, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.scheduler.start()
        try:
            yield
        finally:
            state.scheduler.close(timeout=config.drain_seconds)

    routes = [
        Route("/", page), Route("/index.html", page),
        Mount("/static", StaticFiles(directory=STATIC)),
        Route("/health", health),
        Route("/v1/models", openai_api.list_models),
        Route("/v1/models/{model:path}", openai_api.get_model),
        Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
        Route("/v1/completions", openai_api.completions, methods=["POST"]),
        Route("/v1/embeddings", openai_api.embeddings, methods=["POST"]),
        Route("/lora-adapters", openai_api.list_lora_adapters, methods=["GET"]),
        Route("/lora-adapters", openai_api.set_lora_adapters, methods=["POST"]),
        Route("/api/tags", ollama_api.tags),
        Route("/api/ps", ollama_api.ps),
        Route("/api/version", ollama_api.version),
        Route("/api/show", ollama_api.show, methods=["POST"]),
        Route("/api/chat", ollama_api.chat, methods=["POST"]),
        Route("/api/generate", ollama_api.generate, methods=["POST"]),
        Route("/api/embed", ollama_api.embed, methods=["POST"]),
        Route("/api/embeddings", ollama_api.embeddings_legacy, methods=["POST"]),
    ]
    middleware = []
    if config.cors_origins:   # outermost: preflights are answered before the guard asks for a key
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"]))
    middleware.append(Middleware(Guard, config=config))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers={
        RequestError: _request_error, LlmrunError: _llmrun_error, HTTPException: _http_error,
        ClientGone: _client_gone, Exception: _server_fault})
    app.state.server = state
    return app
