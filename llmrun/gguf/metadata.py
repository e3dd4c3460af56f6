"""Typed access to GGUF metadata: each value is checked for its kind (and range) before anyone converts it.

A file may store any key with any value type: `embedding_length` as an array, `bos_token_id` as a string,
`tokenizer.ggml.tokens` as int32. ``TypedMetadata`` turns each such surprise into one error naming the key,
instead of a TypeError deep inside whoever called ``int()`` on it. It works on the reader's metadata dict
(ints, floats, bools and strings as Python values, numeric arrays as numpy arrays, string arrays as lists) and
on plain dicts built by hand.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from ..errors import GGUFError, LlmrunError

_REQUIRED = object()
REQUIRED = _REQUIRED   # the "no default" sentinel of the getters, for wrappers
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def describe_value(value: Any) -> str:
    """A few words naming what a value is ("a string", "an array of 3 int32"), for error messages."""
    if isinstance(value, (bool, np.bool_)):
        return "a bool"
    if isinstance(value, (int, np.integer)):
        return "an integer"
    if isinstance(value, (float, np.floating)):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, np.ndarray):
        return f"an array of {value.size} {value.dtype.name}"
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value[:64]})
        return f"an array of {len(value)} {'/'.join(kinds) or 'values'}"
    if isinstance(value, Mapping):
        return "an object"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def parse_bool(value: Any) -> bool | None:
    """True/False for a bool, 0/1, or the strings "true"/"false" ("1"/"0", "yes"/"no"); None for anything else.
    (A string "false" is false: Python's bool("false") would say True.)"""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if is_integer(value) and int(value) in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    return None


class TypedMetadata:
    """Checked getters over a metadata mapping; every error is `error(f"{where}: {label}{key} ...")`.

    Also used for JSON files (convert/hf_config.py), whose values have the same Python types."""

    def __init__(self, metadata: Mapping[str, Any], where: str, error: type[LlmrunError] = GGUFError,
                 label: str = "metadata "):
        self.metadata = metadata
        self.where = where
        self.error = error
        self.label = label

    def fail(self, key: str, what: str):
        raise self.error(f"{self.where}: {self.label}{key} {what}")

    def __contains__(self, key: str) -> bool:
        return self.metadata.get(key) is not None

    def _value(self, key: str, default):
        value = self.metadata.get(key)
        if value is None:
            if default is _REQUIRED:
                raise self.error(f"{self.where}: missing {self.label}key {key}")
            return _REQUIRED, default
        return value, None

    def get_int(self, key: str, default=_REQUIRED, *, lo: int | None = None, hi: int | None = None):
        value, fallback = self._value(key, default)
        if value is _REQUIRED:
            return fallback
        if not is_integer(value):
            self.fail(key, f"must be an integer, found {describe_value(value)}")
        value = int(value)
        self._check_range(key, value, lo, hi)
        return value

    def get_float(self, key: str, default=_REQUIRED, *, lo: float | None = None, hi: float | None = None,
                  lo_open: bool = False):
        """A finite number (an integer is accepted); `lo_open` makes the lower bound exclusive."""
        value, fallback = self._value(key, default)
        if value is _REQUIRED:
            return fallback
        if not is_number(value):
            self.fail(key, f"must be a number, found {describe_value(value)}")
        value = float(value)
        if not math.isfinite(value):
            self.fail(key, f"must be a finite number, found {value}")
        if lo is not None and (value <= lo if lo_open else value < lo):
            self.fail(key, f"must be {'>' if lo_open else '>='} {lo}, found {value}")
        if hi is not None and value > hi:
            self.fail(key, f"must be <= {hi}, found {value}")
        return value

    def get_str(self, key: str, default=_REQUIRED):
        value, fallback = self._value(key, default)
        if value is _REQUIRED:
            return fallback
        if not isinstance(value, str):
            self.fail(key, f"must be a string, found {describe_value(value)}")
        return value

    def get_dict(self, key: str, default=_REQUIRED) -> dict:
        """A JSON object (string keys)."""
        value, fallback = self._value(key, default)
        if value is _REQUIRED:
            return fallback
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            self.fail(key, f"must be an object, found {describe_value(value)}")
        return dict(value)

    def get_bool(self, key: str, default=_REQUIRED):
        value, fallback = self._value(key, default)
        if value is _REQUIRED:
            return fallback
        parsed = parse_bool(value)
        if parsed is None:
            self.fail(key, f"must be a bool, found {describe_value(value)}")
        return parsed

    def get_int_or_array(self, key: str, n: int, default=_REQUIRED, *, lo: int | None = None,
                         hi: int | None = None) -> list[int] | Any:
        """llama.cpp's key-or-array hyper-parameters: one integer for every layer, or an array of n."""
        value, fallback = self._value(key, default)
        if value is _REQUIRED:
            return [int(fallback)] * n if is_integer(fallback) else fallback
        if is_integer(value):
            self._check_range(key, int(value), lo, hi)
            return [int(value)] * n
        arr = self._numeric_array(key, value, "i")
        if len(arr) != n:
            self.fail(key, f"has {len(arr)} entries for {n} layers")
        out = [int(v) for v in arr]
        for v in out:
            self._check_range(key, v, lo, hi)
        return out

    def get_array(self, key: str, elem: str, default=_REQUIRED, *, finite: bool = True):
        """An array of `elem` ("str", "int", "float", "bool"): a list of str, or a 1-D numpy array
        (floats finite unless `finite=False`)."""
        value, fallback = self._value(key, default)
        if value is _REQUIRED:
            return fallback
        if elem == "str":
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                self.fail(key, f"must be an array of strings, found {describe_value(value)}")
            return list(value)
        if elem == "dict":
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
                self.fail(key, f"must be an array of objects, found {describe_value(value)}")
            return list(value)
        kinds = {"int": "iu", "float": "iuf", "bool": "b"}[elem]
        arr = self._numeric_array(key, value, kinds)
        if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            self.fail(key, "holds values that are not finite numbers")
        return arr

    def _numeric_array(self, key: str, value, kinds: str) -> np.ndarray:
        wanted = {"i": "integers", "iu": "integers", "iuf": "numbers", "b": "bools"}[kinds]
        if isinstance(value, (list, tuple)):
            if not all(is_integer(v) if kinds in ("i", "iu") else isinstance(v, (bool, np.bool_))
                       if kinds == "b" else is_number(v) for v in value):
                self.fail(key, f"must be an array of {wanted}, found {describe_value(value)}")
            try:
                return np.asarray(value, dtype=np.bool_ if kinds == "b" else None).reshape(-1)
            except (OverflowError, ValueError):
                self.fail(key, f"holds values that do not fit in 64 bits")
        if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.kind not in (
                "iu" if kinds == "i" else kinds):
            self.fail(key, f"must be an array of {wanted}, found {describe_value(value)}")
        return value

    def _check_range(self, key: str, value: int, lo: int | None, hi: int | None) -> None:
        if lo is not None and value < lo:
            self.fail(key, f"must be >= {lo}, found {value}")
        if hi is not None and value > hi:
            self.fail(key, f"must be <= {hi}, found {value}")
