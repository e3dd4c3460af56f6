"""Chat templates: render a model's Jinja2 `tokenizer.chat_template` the way Hugging Face does.

Same environment as transformers' `apply_chat_template` (sandboxed, `trim_blocks`, `lstrip_blocks`, loop
controls) and the same helpers templates rely on (jinja_hf.py: `tojson` with HF's keyword arguments, the
`generation` tag, `raise_exception`, `strftime_now`, `namespace`, `dict`). Files without a template get ChatML,
like llama.cpp. Messages are OpenAI-shaped; `openai_to_hf_messages` turns them into what HF templates expect
(multi-part text content, tool-call arguments as objects).
"""
from __future__ import annotations

import functools
import json
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


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from . import jinja_hf

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    jinja_hf.install(env)
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
    the template as variables (e.g. `tools`, `documents`, `date_string`). `tools` and `documents` are always
    defined (None when not given), as in transformers.
    """
    from jinja2 import TemplateError

    tmpl = _compile(template if template else CHATML_TEMPLATE)
    msgs = openai_to_hf_messages(messages, typed_content=_takes_typed_content(template or CHATML_TEMPLATE))
    extra.setdefault("tools", None)
    extra.setdefault("documents", None)
    try:
        return tmpl.render(messages=msgs, add_generation_prompt=add_generation_prompt,
                           bos_token=bos_token, eos_token=eos_token, **extra)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template error: {_one_line(e)}") from None
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {_one_line(e)}") from None


# Names a message's reasoning comes under; templates read the first (HF fills it, and `thinking`, from any).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def openai_to_hf_messages(messages: Sequence[Mapping[str, Any]], typed_content: bool = False) -> list[dict]:
    """OpenAI chat messages as HF chat templates expect them (new dicts; the caller's are untouched).

    * None values are dropped (HF does the same), except a None `content`, which becomes "";
    * multi-part content (`[{"type": "text", "text": ...}, ...]`) is kept for templates that read parts
      (`typed_content`), and joined into one string with newlines (as llama.cpp does) for the others;
    * tool-call `arguments` given as JSON text (OpenAI's form) become objects (HF's form);
    * reasoning given as `reasoning` / `thinking` is also offered as `reasoning_content` (and back).
    """
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise ChatTemplateError(f"message {i} must be a dict with a 'role' (got {m!r:.60})")
        m = {k: v for k, v in m.items() if v is not None}
        content = m.get("content", "")
        if isinstance(content, (list, tuple)) and not typed_content:
            content = _join_text_parts(content, i)
        m["content"] = content
        if isinstance(m.get("tool_calls"), (list, tuple)):
            m["tool_calls"] = [_hf_tool_call(c) for c in m["tool_calls"]]
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def _join_text_parts(parts, index: int) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(f"message {index}: content part of type {kind!r} is not supported "
                                    f"(text parts only)")
    return "\n".join(texts)


def _hf_tool_call(call):
    if not isinstance(call, Mapping):
        return call
    fn = call.get("function")
    if isinstance(fn, Mapping) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            return call          # not JSON: leave the text for the template
        return {**call, "function": {**fn, "arguments": args}}
    return call


_PROBE = "\u2063probe\u2063"


@functools.lru_cache(maxsize=16)
def _takes_typed_content(template: str) -> bool:
    """Does this template render OpenAI content parts itself? Asked by rendering one probe message (the way
    llama.cpp's template capability detection works): the probe text must appear, and not as a Python repr."""
    if "content" not in template:
        return False
    try:
        text = _compile(template).render(messages=[{"role": "user", "content": [{"type": "text", "text": _PROBE}]}],
                                         add_generation_prompt=False, bos_token="", eos_token="",
                                         tools=None, documents=None)
    except Exception:  # any failure means the template wants strings
        return False
    return _PROBE in text and "'type'" not in text and '"type"' not in text
