"""Errors the server answers with instead of a traceback: what went wrong, in OpenAI's or Ollama's shape.

OpenAI: ``{"error": {"message", "type", "param", "code"}}``; Ollama: ``{"error": "message"}``. Anything the
client got wrong is a 4xx; only a fault on our side is a 500 (and its message says nothing about the request).
"""
from __future__ import annotations

from starlette.responses import JSONResponse

from ..errors import LlmrunError


class RequestError(LlmrunError):
    """A request the server refuses: the HTTP status and OpenAI's error fields."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.status = int(status)
        self.param = param
        self.code = code
        self.kind = kind or _default_kind(self.status)
        self.headers = headers or {}


def _default_kind(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 503:
        return "server_busy"
    return "invalid_request_error" if status < 500 else "server_error"


def openai_error(err: RequestError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def ollama_error(err: RequestError) -> JSONResponse:
    return JSONResponse({"error": err.message}, status_code=err.status, headers=err.headers)


def is_ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_response(path: str, err: RequestError) -> JSONResponse:
    """The error in the shape the clients of that endpoint expect."""
    return ollama_error(err) if is_ollama_path(path) else openai_error(err)
