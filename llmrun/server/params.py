"""Reading request bodies: size-limited JSON, nesting depth, and typed fields with one-line 400s.

Every check names the field (OpenAI's ``param``); nothing here lets a bad value through to the engine.
"""
from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request

from .errors import RequestError

MAX_DEPTH = 64          # JSON nesting levels a request may use (JSON schemas and tools included)
MAX_STOP = 16           # stop strings per request
MAX_STOP_CHARS = 1000   # characters per stop string


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


async def read_json(request: Request, max_bytes: int, *, array: bool = False) -> dict:
    """The body as a JSON object (with `array`: an array instead): at most `max_bytes` (413 beyond), valid UTF-8
    JSON, at most MAX_DEPTH deep."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > max_bytes:
                raise _too_large(max_bytes)
        except ValueError:
            raise RequestError("the Content-Length header is not a number") from None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return parse_json(bytes(body), array=array)


def _too_large(max_bytes: int) -> RequestError:
    return RequestError(f"the request body is larger than the server's limit of {max_bytes} bytes",
                        413, code="request_too_large")


def parse_json(raw: bytes, *, array: bool = False) -> dict:
    if not raw.strip():
        raise RequestError("the request body is empty: send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError(f"the JSON body is nested more than {MAX_DEPTH} levels deep") from None
    except UnicodeDecodeError:
        raise RequestError("the request body is not valid UTF-8") from None
    except ValueError as e:   # json.JSONDecodeError, too many digits, NaN/Infinity
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    check_json_value(data)
    if array and not isinstance(data, list):
        raise RequestError("the request body must be a JSON array")
    if not array and not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object")
    return data


def check_json_value(data: Any) -> None:
    """Depth at most MAX_DEPTH and only strings that are valid Unicode (JSON escapes can write lone
    surrogates, which no UTF-8 encoder accepts). Iterative: a deep value cannot exhaust the stack."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
            continue
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise RequestError(f"the JSON body is nested more than {MAX_DEPTH} levels deep")
            if isinstance(value, dict):
                for k, v in value.items():
                    _check_text(k)
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in value)


def _check_text(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("the request contains a string that is not valid Unicode (a lone surrogate escape)") \
            from None


class Fields:
    """Typed access to one JSON object's fields; `prefix` names nested objects in messages ("options.")."""

    def __init__(self, obj: Any, prefix: str = ""):
        if not isinstance(obj, dict):
            raise RequestError(f"'{prefix.rstrip('.') or 'body'}' must be a JSON object", param=prefix.rstrip(".") or None)
        self.obj = obj
        self.prefix = prefix

    def __contains__(self, name: str) -> bool:
        return self.obj.get(name) is not None

    def _err(self, name: str, what: str) -> RequestError:
        return RequestError(f"'{self.prefix}{name}' must be {what}", param=self.prefix + name)

    def raw(self, name: str, default: Any = None) -> Any:
        value = self.obj.get(name)
        return default if value is None else value

    def string(self, name: str, default: str | None = None, *, required: bool = False,
               max_chars: int | None = None) -> str | None:
        value = self.obj.get(name)
        if value is None:
            if required:
                raise RequestError(f"'{self.prefix}{name}' is required", param=self.prefix + name)
            return default
        if not isinstance(value, str):
            raise self._err(name, "a string")
        if max_chars is not None and len(value) > max_chars:
            raise self._err(name, f"at most {max_chars} characters")
        return value

    def boolean(self, name: str, default: bool | None = None) -> bool | None:
        value = self.obj.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._err(name, "true or false")
        return value

    def integer(self, name: str, default: int | None = None, *, lo: int | None = None,
                hi: int | None = None) -> int | None:
        value = self.obj.get(name)
        if value is None:
            return default
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)   # 100.0 from clients that only have floats
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._err(name, "an integer")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._err(name, _range(lo, hi))
        return value

    def number(self, name: str, default: float | None = None, *, lo: float | None = None,
               hi: float | None = None) -> float | None:
        value = self.obj.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._err(name, "a number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._err(name, _range(lo, hi))
        return float(value)

    def stop(self, name: str = "stop") -> list[str] | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise self._err(name, "a string or a list of strings")
        if len(value) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in value):
            raise self._err(name, f"at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters")
        return [s for s in value if s] or None

    def object(self, name: str) -> dict | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._err(name, "a JSON object")
        return value

    def array(self, name: str, *, required: bool = False) -> list | None:
        value = self.obj.get(name)
        if value is None:
            if required:
                raise RequestError(f"'{self.prefix}{name}' is required", param=self.prefix + name)
            return None
        if not isinstance(value, list):
            raise self._err(name, "an array")
        return value


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f"at least {lo}" if lo is not None else f"at most {hi}"
