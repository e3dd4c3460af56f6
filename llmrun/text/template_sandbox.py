"""A Jinja2 sandbox with budgets, for chat templates that come from strangers' model files.

Jinja's ImmutableSandboxedEnvironment stops attribute escapes, but not a template that asks for a billion
characters or loops forever: `'a' * 2000000000`, `'{:>1000000000}'.format('a')`, `range(100000)` nested
twice, a namespace string doubled in a loop, `lipsum(10**6)`, `tojson(indent=10**9)`. Here every render runs
under a ``RenderBudget``:

* time: a watchdog thread interrupts the render (an asynchronous exception in the rendering thread, so even
  a loop that calls nothing is stopped) after ``seconds``;
* size: every operation that can make a string or a list larger than its inputs -- ``*``, ``+``, ``%``,
  ``**``, ``~``, ``str.format`` and its widths, the amplifying str methods and filters (center, indent,
  replace, join, ...), macro and block output, the final output -- is checked against ``max_chars`` /
  ``max_items`` *before* it allocates;
* depth: macro and recursive-loop calls nest at most ``max_depth`` deep.

Any violation raises ``BudgetExceeded``; ``render`` turns it, and every other failure a template can cause
(RecursionError, OverflowError, ZeroDivisionError, MemoryError, ...), into one ChatTemplateError line.

This module is the policy: the environment that checks operators, calls and output. The budget and how sizes are
measured are in template_budget.py, the filters' checks in template_filters.py, the watchdog in
template_deadline.py.
"""
from __future__ import annotations

import functools
import re
import threading
from typing import Any, Mapping

from jinja2.compiler import CodeGenerator
from jinja2.ext import loopcontrols
from jinja2.runtime import LoopContext, Macro, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import _PassArg, generate_lorem_ipsum

from ..errors import ChatTemplateError, one_line
from . import jinja_hf
from . import template_filters as filters
from .template_budget import BudgetExceeded, RenderBudget, call_arg, is_int, length_of, text_size
from .template_deadline import RenderTimeout, call_with_deadline

_FORMAT_NUMBER = re.compile(r"\d+")
# printf-style directives: %[(key)][flags][width][.precision][length]type
_PERCENT_DIRECTIVE = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_MAX_INT_BITS = 1 << 16      # integers a template computes (str() refuses > 4300 digits anyway)


class _State(threading.local):
    budget: RenderBudget | None = None
    depth: int = 0


class _CheckedConcat(CodeGenerator):
    """`a ~ b` compiles to a call of environment.checked_concat (Jinja's own join is not interceptable)."""

    def visit_Concat(self, node, frame):
        if frame.eval_ctx.volatile:
            markup = "context.eval_ctx.volatile"
        else:
            markup = "True" if frame.eval_ctx.autoescape else "False"
        self.write(f"environment.checked_concat({markup}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _CheckedFormatter(SandboxedFormatter):
    """str.format with every field's final spec (after nested substitution) and the total size checked."""

    def __init__(self, env, limits: RenderBudget):
        super().__init__(env)
        self.limits = limits
        self.total = 0

    def format_field(self, value, format_spec):
        for number in _FORMAT_NUMBER.findall(format_spec):
            if len(number) > 9 or int(number) > self.limits.max_width:
                raise BudgetExceeded(f"format width/precision {number[:12]} is larger than "
                                     f"{self.limits.max_width}")
        if text_size(value, self.limits.max_chars) > self.limits.max_chars:
            raise BudgetExceeded("a formatted value is too large")
        out = super().format_field(value, format_spec)
        self.total += len(out)
        if self.total > self.limits.max_chars:
            raise BudgetExceeded(f"str.format result is longer than {self.limits.max_chars} characters")
        return out


class BudgetedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _CheckedConcat
    intercepted_binops = frozenset(["*", "+", "%", "**"])

    def __init__(self):
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        jinja_hf.install(self)           # what transformers' environment adds (generation tag, dict, ...)
        self.filters["tojson"] = filters.tojson
        self.globals["raise_exception"] = filters.raise_exception
        self.globals["strftime_now"] = filters.strftime_now
        self.state = _State()
        self.concat = self.checked_join
        self.finalize = self.checked_output
        self.filters = {name: self._checked_filter(name, f) for name, f in self.filters.items()}
        self.globals["range"] = self.checked_range
        self.globals["lipsum"] = self.checked_lipsum

    # -- the active budget ---------------------------------------------------------------------------
    @property
    def limits(self) -> RenderBudget:
        return self.state.budget or RenderBudget()

    def size_check(self, value, what: str):
        info = length_of(value)
        if info is not None:
            n, is_text = info
            cap = self.limits.max_chars if is_text else self.limits.max_items
            if n > cap:
                raise BudgetExceeded(f"{what} makes a {'string' if is_text else 'container'} of {n} "
                                     f"{'characters' if is_text else 'items'} (limit {cap})")
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > _MAX_INT_BITS:
            raise BudgetExceeded(f"{what} makes an integer of {value.bit_length()} bits")
        return value

    def text_check(self, value, what: str, factor: int = 1):
        cap = self.limits.max_chars
        if text_size(value, cap) * factor > cap:
            raise BudgetExceeded(f"{what} would make more than {cap} characters")

    # -- operators -----------------------------------------------------------------------------------
    def call_binop(self, context, operator, left, right):
        lim = self.limits
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                info = length_of(seq)
                if info is not None and isinstance(n, int) and not isinstance(n, bool):
                    cap = lim.max_chars if info[1] else lim.max_items
                    if n > 0 and info[0] * n > cap:
                        raise BudgetExceeded(f"repeating {info[0]} {'characters' if info[1] else 'items'} "
                                             f"{n} times exceeds the limit of {cap}")
            if is_int(left) and is_int(right) and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise BudgetExceeded("integer product too large")
        elif operator == "+":
            a, b = length_of(left), length_of(right)
            if a is not None and b is not None:
                cap = lim.max_chars if a[1] else lim.max_items
                if a[0] + b[0] > cap:
                    raise BudgetExceeded(f"concatenation exceeds the limit of {cap}")
        elif operator == "%" and isinstance(left, str):
            self.check_percent_format(left, right)
        elif operator == "**" and is_int(left) and is_int(right):
            if right > 0 and abs(left) > 1 and left.bit_length() * right > _MAX_INT_BITS:
                raise BudgetExceeded(f"power {left} ** {right} is too large")
        return self.size_check(super().call_binop(context, operator, left, right), f"operator {operator}")

    def check_percent_format(self, fmt: str, args):
        lim = self.limits
        stars = False
        for m in _PERCENT_DIRECTIVE.finditer(fmt):
            for number in m.groups():
                if number == "*":
                    stars = True
                elif number and (len(number) > 9 or int(number) > lim.max_width):
                    raise BudgetExceeded(f"format width/precision {number[:12]} is larger than {lim.max_width}")
        values = args if isinstance(args, tuple) else (args,)
        if stars and any(is_int(v) and abs(v) > lim.max_width for v in values):
            raise BudgetExceeded(f"a '*' format width is larger than {lim.max_width}")
        n_fields = fmt.count("%") or 1
        if (text_size(values, lim.max_chars) + 2) * n_fields + len(fmt) > 2 * lim.max_chars:
            raise BudgetExceeded("%-formatting would make too long a string")

    def checked_concat(self, markup: bool, items):
        self.text_check(items, "'~' concatenation")
        return markup_join(items) if markup else str_join(items)

    def checked_join(self, parts):
        parts = list(parts)
        self.text_check(parts, "a block's output")
        return "".join(parts)

    def checked_output(self, value):
        self.text_check(value, "an output expression")
        return value

    # -- calls -----------------------------------------------------------------------------------------
    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
        self = __self
        if isinstance(__obj, (Macro, LoopContext)) or getattr(__obj, "__name__", "") == "caller":
            state = self.state
            if state.depth >= self.limits.max_depth:
                raise BudgetExceeded(f"macro/loop calls nested more than {self.limits.max_depth} deep")
            state.depth += 1
            try:
                return self.size_check(super().call(__context, __obj, *args, **kwargs), "a macro call")
            finally:
                state.depth -= 1
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            self.check_str_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        return self.size_check(super().call(__context, __obj, *args, **kwargs), "a call")

    def check_str_method(self, s: str, name: str, args, kwargs):
        lim = self.limits
        if name in ("translate", "maketrans"):
            raise BudgetExceeded(f"str.{name} is not available in chat templates")
        if name in ("center", "ljust", "rjust", "zfill"):
            width = call_arg(args, kwargs, 0, "width", 0)
            if is_int(width) and width > lim.max_chars:
                raise BudgetExceeded(f"str.{name} width {width} exceeds {lim.max_chars}")
        elif name == "expandtabs":
            size = call_arg(args, kwargs, 0, "tabsize", 8)
            if is_int(size) and s.count("\t") * max(size, 0) + len(s) > lim.max_chars:
                raise BudgetExceeded(f"str.expandtabs({size}) would exceed {lim.max_chars} characters")
        elif name == "replace":
            self.check_replace(s, call_arg(args, kwargs, 0, "old"), call_arg(args, kwargs, 1, "new"),
                               call_arg(args, kwargs, 2, "count", -1))
        elif name == "join":
            items = call_arg(args, kwargs, 0, "iterable")
            self.check_join(items, s)

    def check_replace(self, s, old, new, count):
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            n = (len(s) + 1) if old == "" else s.count(old)
            if is_int(count) and count >= 0:
                n = min(n, count)
            if len(s) + n * (len(new) - len(old)) > self.limits.max_chars:
                raise BudgetExceeded(f"replace() would exceed {self.limits.max_chars} characters")

    def check_join(self, items, sep):
        cap = self.limits.max_chars
        try:
            count = len(items)
        except TypeError:
            return
        if text_size(items, cap) + count * len(sep if isinstance(sep, str) else "") > cap:
            raise BudgetExceeded(f"join() would exceed {cap} characters")

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt = value.__self__
        is_map = value.__name__ == "format_map"
        env = self

        def checked_format(*args, **kwargs):
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                args, kwargs = (), args[0]
            return type(fmt)(_CheckedFormatter(env, env.limits).vformat(fmt, args, kwargs))

        return functools.update_wrapper(checked_format, wrapped)

    # -- globals and filters ---------------------------------------------------------------------------
    def checked_range(self, *args):
        if not all(is_int(a) for a in args):
            raise TypeError("range() needs integer arguments")
        r = range(*args)
        if len(r) > self.limits.max_range:
            raise BudgetExceeded(f"range of {len(r)} items (limit {self.limits.max_range})")
        return r

    def checked_lipsum(self, n=5, html=True, min=20, max=100):  # noqa: A002 (Jinja's argument names)
        for value in (n, min, max):
            if not is_int(value) or not 0 <= value <= 1000:
                raise BudgetExceeded("lipsum() arguments must be integers in 0..1000")
        if n * max > 20_000:
            raise BudgetExceeded("lipsum() would make too much text")
        return generate_lorem_ipsum(n=n, html=html, min=min, max=max)

    def _checked_filter(self, name: str, f):
        pre = filters.FILTER_CHECKS.get(name)
        skip = 1 if _PassArg.from_obj(f) is not None else 0

        @functools.wraps(f)
        def checked(*args, **kwargs):
            if pre is not None and len(args) > skip:
                pre(self, args[skip], args[skip + 1:], kwargs)
            return self.size_check(f(*args, **kwargs), f"filter {name}")

        return checked


_ENV = None
_ENV_LOCK = threading.Lock()


def environment():
    """The shared budgeted environment (compiled templates are cached per environment)."""
    global _ENV
    with _ENV_LOCK:
        if _ENV is None:
            _ENV = BudgetedEnvironment()
        return _ENV


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    return environment().from_string(source)


def render(source: Any, variables: Mapping[str, Any], budget: RenderBudget = RenderBudget()) -> str:
    """Render template `source` with `variables` under `budget`; any failure is one ChatTemplateError."""
    from jinja2 import TemplateError, TemplateSyntaxError

    if not isinstance(source, str):
        raise ChatTemplateError(f"chat template must be a string, found {type(source).__name__}")
    if len(source) > budget.max_template_chars:
        raise ChatTemplateError(f"chat template is {len(source)} characters long "
                                f"(limit {budget.max_template_chars})")
    env = environment()
    state = env.state

    def run() -> str:
        try:
            tmpl = _compile(source)
        except TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template does not compile: {one_line(e)}") from None
        out, size = [], 0
        for piece in tmpl.generate(**variables):
            size += len(piece)
            if size > budget.max_chars:
                raise BudgetExceeded(f"the rendered prompt is longer than {budget.max_chars} characters")
            out.append(piece)
        return "".join(out)

    previous = (state.budget, state.depth)
    state.budget, state.depth = budget, 0
    try:
        return call_with_deadline(run, budget.seconds)
    except ChatTemplateError:
        raise
    except RenderTimeout:
        raise ChatTemplateError(f"chat template took longer than {budget.seconds:g} s to render "
                                f"(endless or huge loop?)") from None
    except BudgetExceeded as e:
        raise ChatTemplateError(f"chat template exceeds its budget: {one_line(e)}") from None
    except TemplateError as e:
        raise ChatTemplateError(f"chat template error: {one_line(e)}") from None
    except RecursionError:
        raise ChatTemplateError("chat template recurses too deeply") from None
    except MemoryError:
        raise ChatTemplateError("chat template ran out of memory") from None
    except Exception as e:  # TypeError, ValueError, OverflowError, ZeroDivisionError, KeyError, ...
        raise ChatTemplateError(f"chat template failed on these messages: {type(e).__name__}: "
                                f"{one_line(e)}") from None
    finally:
        state.budget, state.depth = previous
