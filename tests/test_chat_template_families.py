"""Real chat templates of the popular families (tests/data/chat_templates/*.jinja: Llama 3 / 3.1, Qwen2.5,
Mistral v0.3, Gemma 2 / 3, Phi-3, Phi-4-mini, SmolLM2 / 3, a ChatML with `generation` tags) rendered by
llmrun and by transformers' apply_chat_template from the same template string: with and without tools, tool
calls and tool results, multi-part content, documents, non-ASCII text. Where transformers refuses a
conversation (a template's raise_exception), llmrun must refuse it too, with one line."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from llmrun.errors import LlmrunError
from llmrun.text.chat_template import render_chat

TEMPLATES = {p.stem: p.read_text() for p in sorted((Path(__file__).parent / "data" / "chat_templates").glob("*.jinja"))}
# templates that read OpenAI content parts themselves; the others get the parts' text joined by newlines
TYPED_CONTENT = {"gemma-3"}

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. Zürich"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two integers",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]}}},
]

CONVERSATIONS = {
    "system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "  Paris.  "},
        {"role": "user", "content": "And of Japan? 東京 ✓ café"},
    ],
    "plain": [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me a joke about \"quotes\" and {braces}."},
    ],
    "single": [{"role": "user", "content": "One question only."}],
    "multipart": [
        {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "text", "text": "this café."}]},
    ],
    "tool_call": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Zürich", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "22 degrees, sunny"},
    ],
}

CASES = [(t, c, tools, agp) for t in TEMPLATES for c in CONVERSATIONS for tools in (False, True)
         for agp in (True, False) if tools or c != "tool_call"]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def hf_messages(messages, typed: bool):
    """The same conversation in Hugging Face's own conventions, written out independently of llmrun:
    tool-call arguments as dicts, content parts joined for templates that want strings."""
    out = copy.deepcopy(messages)
    for m in out:
        if isinstance(m.get("content"), list) and not typed:
            m["content"] = "\n".join(p["text"] for p in m["content"])
        for call in m.get("tool_calls") or ():
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
        if m.get("content") is None:
            m["content"] = ""
    return out


def hf_render(tok, template, messages, add_generation_prompt, **kwargs):
    try:
        return tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **kwargs), None
    except Exception as e:  # noqa: BLE001 - the reference's refusal is part of what we compare
        return None, e


def ours_render(template, messages, add_generation_prompt, **kwargs):
    try:
        return render_chat(messages, template, add_generation_prompt=add_generation_prompt,
                           bos_token="<s>", eos_token="</s>", **kwargs), None
    except LlmrunError as e:
        return None, e


@pytest.mark.parametrize("name,conv,with_tools,agp", CASES,
                         ids=[f"{t}-{c}-{'tools' if w else 'notools'}-{'gen' if a else 'nogen'}"
                              for t, c, w, a in CASES])
def test_family_renders_like_transformers(hf_tokenizer, name, conv, with_tools, agp):
    template = TEMPLATES[name]
    kwargs = {"tools": TOOLS} if with_tools else {}
    messages = CONVERSATIONS[conv]
    expected, hf_error = hf_render(hf_tokenizer, template, hf_messages(messages, name in TYPED_CONTENT), agp,
                                   **kwargs)
    got, our_error = ours_render(template, messages, agp, **kwargs)
    if hf_error is not None:
        assert our_error is not None, f"transformers refused ({hf_error}) but llmrun rendered {got!r:.200}"
        assert "\n" not in str(our_error)
    else:
        assert our_error is None, f"llmrun refused: {our_error}"
        assert got == expected


def test_most_family_cases_render(hf_tokenizer):
    """The comparison above must mostly compare texts, not agreeing refusals."""
    rendered = sum(hf_render(hf_tokenizer, TEMPLATES[t], hf_messages(CONVERSATIONS[c], t in TYPED_CONTENT), a,
                             **({"tools": TOOLS} if w else {}))[1] is None for t, c, w, a in CASES)
    assert rendered >= 0.75 * len(CASES)


def test_documents_and_tojson_keywords(hf_tokenizer):
    template = TEMPLATES["chatml-generation"]
    docs = [{"title": "Zürich", "text": "Größte Stadt der Schweiz ✓"}, {"title": "Bern", "text": "Hauptstadt"}]
    messages = CONVERSATIONS["plain"]
    expected, err = hf_render(hf_tokenizer, template, messages, True, documents=docs)
    assert err is None
    got, _ = ours_render(template, messages, True, documents=docs)
    assert got == expected and "\\u00f6" in got          # ensure_ascii=True honoured


def test_generation_tag_renders_its_body(hf_tokenizer):
    template = TEMPLATES["chatml-generation"]
    got, _ = ours_render(template, CONVERSATIONS["plain"], False)
    assert "<|im_start|>assistant\nHi, how can I help?<|im_end|>\n" in got


def test_namespace_refuses_underscore_names():
    template = "{% set ns = namespace(_x=1) %}{{ ns._x }}"
    with pytest.raises(LlmrunError):
        render_chat([{"role": "user", "content": "x"}], template)


def test_image_part_for_text_template_is_one_line_error():
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(LlmrunError) as e:
        render_chat(msgs, TEMPLATES["smollm2"])
    assert "image_url" in str(e.value) and "\n" not in str(e.value)
