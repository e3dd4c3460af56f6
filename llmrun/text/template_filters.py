"""The budget checks a sandboxed chat template's filters pass before they run (widths, counts, the size of what
they stringify), and jinja_hf's helpers with their sizes bounded: the filter side of template_sandbox.py."""
from __future__ import annotations

from . import jinja_hf
from .template_budget import BudgetExceeded, call_arg, is_int


def _check_width(env, value, args, kwargs, index=0, name="width", default=80, per_line=False):
    width = call_arg(args, kwargs, index, name, default)
    lim = env.limits
    w = len(width) if isinstance(width, str) else width if is_int(width) else 0
    lines = (value.count("\n") + 1) if per_line and isinstance(value, str) else 1
    if w > lim.max_width or w * lines + (len(value) if isinstance(value, str) else 0) > lim.max_chars:
        raise BudgetExceeded(f"width {w if w <= 10**12 else 'huge'} is too large")


def _check_count(env, value, args, kwargs, index=0, name="linecount"):
    n = call_arg(args, kwargs, index, name, 0)
    if is_int(n) and n > env.limits.max_width:
        raise BudgetExceeded(f"count {n} is larger than {env.limits.max_width}")


def _check_wordwrap(env, value, args, kwargs):
    wrap = call_arg(args, kwargs, 2, "wrapstring", None)
    if isinstance(wrap, str) and isinstance(value, str) and len(wrap) * (len(value) + 1) > env.limits.max_chars:
        raise BudgetExceeded("wordwrap() would make too long a string")


def _check_stringify(env, value, args, kwargs):
    env.text_check(value, "converting a value to text", factor=2)


FILTER_CHECKS = {
    "center": lambda env, v, a, k: _check_width(env, v, a, k),
    "indent": lambda env, v, a, k: _check_width(env, v, a, k, default=4, per_line=True),
    "wordwrap": _check_wordwrap,
    "truncate": lambda env, v, a, k: _check_width(env, v, a, k, 2, "end", ""),
    "batch": lambda env, v, a, k: _check_count(env, v, a, k),
    "slice": lambda env, v, a, k: _check_count(env, v, a, k, 0, "slices"),
    "replace": lambda env, v, a, k: env.check_replace(v, call_arg(a, k, 0, "old"), call_arg(a, k, 1, "new"),
                                                      call_arg(a, k, 2, "count", None)),
    "join": lambda env, v, a, k: env.check_join(v, call_arg(a, k, 0, "d", "")),
    "format": lambda env, v, a, k: env.check_percent_format(v, tuple(a) or k) if isinstance(v, str) else None,
    "string": _check_stringify, "pprint": _check_stringify, "tojson": _check_stringify,
    "e": _check_stringify, "escape": _check_stringify, "forceescape": _check_stringify,
    "urlencode": _check_stringify, "urlize": _check_stringify, "xmlattr": _check_stringify,
    "list": _check_stringify, "title": _check_stringify, "upper": _check_stringify,
}


# -- jinja_hf's helpers with their sizes bounded ------------------------------------------------------------------
def raise_exception(message):
    jinja_hf.raise_exception(str(message)[:500])


def strftime_now(fmt):
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise BudgetExceeded("strftime_now() needs a format string of at most 256 characters")
    return jinja_hf.strftime_now(fmt)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if indent is not None and not (isinstance(indent, str) and len(indent) <= 16
                                   or is_int(indent) and 0 <= indent <= 16):
        raise BudgetExceeded("tojson indent must be at most 16")
    return jinja_hf.tojson(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                           sort_keys=sort_keys)
