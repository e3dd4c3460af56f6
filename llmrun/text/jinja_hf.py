"""What Hugging Face's chat-template Jinja environment adds to plain Jinja, so templates render as
transformers' ``apply_chat_template`` renders them:

* ``tojson`` with HF's keyword arguments (``ensure_ascii=False`` by default, ``indent``, ``separators``,
  ``sort_keys``) and no HTML escaping;
* the ``{% generation %}...{% endgeneration %}`` tag (HF uses it to mark assistant tokens; it renders its body);
* ``raise_exception(msg)``, ``strftime_now(fmt)``;
* ``dict(...)`` and a ``namespace(...)`` that refuses underscore-prefixed names (no sandbox escapes through it).

``install(env)`` puts all of these into a (sandboxed) environment; loop controls are the environment's job.
"""
from __future__ import annotations

import json
from datetime import datetime

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension
from jinja2.utils import Namespace


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message):
    raise TemplateError(message)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


class GenerationTag(Extension):
    """``{% generation %}body{% endgeneration %}`` renders ``body`` (HF tracks its span; we need only the text)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller):
        return caller()


class TemplateDict:
    """``dict(...)`` inside a template: builds plain dicts and offers nothing else."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _check_name(name):
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"chat templates cannot store underscore-prefixed attributes on a namespace "
                            f"(got {name!r})")


class TemplateNamespace(Namespace):
    """``namespace(...)`` that rejects dunder/underscore attributes (as HF's does)."""

    def __init__(*args, **kwargs):       # Namespace's own signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _check_name(name)
        Namespace.__setitem__(self, name, value)


def install(env) -> None:
    """Give ``env`` HF's chat-template filters, globals and the generation tag."""
    env.add_extension(GenerationTag)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
