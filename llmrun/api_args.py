"""Checks of the Python API's arguments: wrong types raise ArgumentTypeError (a TypeError), impossible values
InvalidArgumentError (a ValueError); both are LlmrunErrors naming the argument. Without them a bad argument
surfaces as a bare numpy OverflowError or a TypeError from deep inside the engine."""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from .errors import ArgumentTypeError, InvalidArgumentError
from .gguf.metadata import describe_value, is_integer, is_number, parse_bool

__all__ = ["describe_value", "integer", "optional_integer", "number", "flag", "seed", "text", "path", "token_ids",
           "stop_strings", "max_tokens", "RANDOM_SEEDS"]


def integer(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if not is_integer(value):
        raise ArgumentTypeError(f"{name} must be an integer, got {describe_value(value)}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in {lo}..{hi}"
        raise InvalidArgumentError(f"{name} must be {bounds}, got {value}")
    return value


def optional_integer(value: Any, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
    return None if value is None else integer(value, name, lo, hi)


def number(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    if not is_number(value):
        raise ArgumentTypeError(f"{name} must be a number, got {describe_value(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be a finite number, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in {lo}..{hi}"
        raise InvalidArgumentError(f"{name} must be {bounds}, got {value}")
    return value


def flag(value: Any, name: str) -> bool:
    """A bool; 0/1 and the strings "true"/"false" (as JSON bodies send them) are accepted."""
    parsed = parse_bool(value)
    if parsed is None:
        raise ArgumentTypeError(f"{name} must be true or false, got {describe_value(value)}")
    return parsed


RANDOM_SEEDS = (-1, 0xFFFFFFFF)   # llama-cpp-python's "random seed" values


def seed(value: Any, name: str = "seed") -> int | None:
    """None, -1 or 0xFFFFFFFF (llama-cpp-python's "random") -> None (fresh entropy); else an integer >= 0."""
    if value is None:
        return None
    value = integer(value, name, lo=-1)
    return None if value in RANDOM_SEEDS else value


def text(value: Any, name: str) -> str | bytes:
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, (str, bytes)):
        raise ArgumentTypeError(f"{name} must be str or bytes, got {describe_value(value)}")
    return value


def path(value: Any, name: str) -> str:
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise ArgumentTypeError(f"{name} must be a path, got {describe_value(value)}")
    return os.fsdecode(value)


def token_ids(value: Any, n_vocab: int, name: str = "tokens") -> list[int]:
    """A sequence of token ids, each an integer in 0..n_vocab-1."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or (value.size and value.dtype.kind not in "iu"):
            raise ArgumentTypeError(f"{name} must be a 1-D array of integers, got {describe_value(value)}")
        ids = value.tolist()
    elif isinstance(value, (str, bytes, bytearray, dict)) or not isinstance(value, Sequence):
        raise ArgumentTypeError(f"{name} must be a list of token ids, got {describe_value(value)}")
    else:
        ids = list(value)
    for i, t in enumerate(ids):
        if not is_integer(t):
            raise ArgumentTypeError(f"{name}[{i}] must be an integer token id, got {describe_value(t)} {t!r:.40}")
        if not 0 <= t < n_vocab:
            raise InvalidArgumentError(f"{name}[{i}] = {t} is outside the vocabulary (0..{n_vocab - 1})")
    return [int(t) for t in ids]


def stop_strings(value: Any) -> list[str] | None:
    """None, one string, or a sequence of strings."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, dict)) or not isinstance(value, Sequence) or \
            not all(isinstance(s, str) for s in value):
        raise ArgumentTypeError(f"stop must be a string or a list of strings, got {describe_value(value)}")
    return list(value)


def max_tokens(value: Any) -> int | None:
    """None or <= 0 means "no limit"."""
    value = optional_integer(value, "max_tokens")
    return value if value is not None and value > 0 else None
