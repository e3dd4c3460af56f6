"""Chat templates: render a model's Jinja2 `tokenizer.chat_template` the way Hugging Face does.

Same environment as transformers' `apply_chat_template` (sandboxed, `trim_blocks`, `lstrip_blocks`, loop
controls) and the same helpers templates rely on: `raise_exception(msg)`, `strftime_now(fmt)` and a `tojson`
filter that keeps non-ASCII characters. Files without a template get ChatML, like llama.cpp.
"""
from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Mapping, Sequence

from ..errors import LlmrunError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(LlmrunError):
    """A chat template cannot be compiled or refuses the conversation."""


def _raise_exception(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(value, indent=None, separators=None, sort_keys=False):
    # HF's version: ensure_ascii=False so that accents and CJK stay readable inside prompts.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {_one_line(e)}") from None


def _one_line(e: Exception) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def render_chat(messages: Sequence[Mapping[str, Any]], template: str | None = None, *,
                add_generation_prompt: bool = True, bos_token: str = "", eos_token: str = "",
                **extra: Any) -> str:
    """The prompt text for a conversation. `template=None` uses ChatML.

    `messages` are OpenAI-style dicts ({"role": ..., "content": ...}); extra keyword arguments are passed to
    the template as variables (e.g. `tools`, `date_string`).
    """
    from jinja2 import TemplateError

    msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with a 'role' (got {m!r:.60})")
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        msgs.append(m)
    tmpl = _compile(template if template else CHATML_TEMPLATE)
    try:
        return tmpl.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token, **extra)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template error: {_one_line(e)}") from None
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {_one_line(e)}") from None
