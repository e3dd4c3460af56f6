"""The budget of one chat-template render (template_sandbox.py) and how the sandbox measures what a template
makes: ``RenderBudget`` (time, characters, items, widths, depth), ``BudgetExceeded``, and the size of a value as
str() would print it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2.utils import Namespace


@dataclass(frozen=True)
class RenderBudget:
    seconds: float = 1.0            # wall time of one render (compile included)
    # any string made while rendering, and the output: real templates add a few KB to the conversation; the
    # prompt is tokenized next, which costs ~250 bytes per character
    max_chars: int = 1 << 18
    max_items: int = 1 << 18        # any list/tuple/dict made while rendering
    max_width: int = 100_000        # format widths/precisions, center/indent widths, repeat counts of filters
    max_range: int = 100_000        # items of one range()
    max_depth: int = 64             # nested macro / recursive-loop calls
    max_template_chars: int = 1 << 20

    def for_inputs(self, input_chars: int) -> "RenderBudget":
        """The same budget with room for the conversation itself (a long prompt renders long)."""
        return RenderBudget(self.seconds, self.max_chars + 2 * input_chars, self.max_items + input_chars,
                            self.max_width, self.max_range, self.max_depth, self.max_template_chars)


class BudgetExceeded(Exception):
    """A template asked for more than its RenderBudget allows."""


def text_size(obj: Any, limit: int) -> int:
    """About how many characters str(obj) has, counting shared references each time (as str() does);
    stops counting once past `limit`."""
    total, steps, stack = 0, 0, [obj]
    while stack and total <= limit:
        o = stack.pop()
        steps += 1
        if steps > 4 * limit:     # a self-referencing structure: infinitely large when printed
            return limit + 1
        if isinstance(o, str):
            total += len(o)
        elif isinstance(o, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(o)
            stack.extend(o)
        elif isinstance(o, dict):
            total += 2 + 4 * len(o)
            stack.extend(o.keys())
            stack.extend(o.values())
        elif isinstance(o, int) and not isinstance(o, bool):
            total += o.bit_length() // 3 + 1
        else:
            attrs = _namespace_attrs(o)
            if attrs is not None:
                total += 12
                stack.append(attrs)
            else:
                total += 8
    return total


def _namespace_attrs(o):
    if isinstance(o, Namespace):
        return object.__getattribute__(o, "_Namespace__attrs")
    return None


def length_of(obj: Any) -> tuple[int, bool] | None:
    """(len, is_text) of a string or container, None for other values."""
    if isinstance(obj, str):
        return len(obj), True
    if isinstance(obj, (list, tuple, dict, set, frozenset)):
        return len(obj), False
    return None


def call_arg(args, kwargs, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
