"""Tool-call parsing and forcing (llmrun.text.tool_calls). The call texts are the ones the families' own
templates write (rendered by transformers from tests/data/chat_templates), so parsing is checked against what
the models are taught; forced-call schemas are checked with jsonschema and by generating under them."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from llmrun.gguf import GGUFReader
from llmrun.text.grammar import Grammar
from llmrun.text.tokenizer import Tokenizer
from llmrun.text.tool_calls import (ToolCallError, check_tools, forced_call_schema, parse_tool_calls,
                                    resolve_tool_choice)

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
TOOLS = check_tools([
    {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                      "parameters": {"type": "object",
                                                     "properties": {"city": {"type": "string", "maxLength": 10},
                                                                    "days": {"type": "integer", "minimum": 1,
                                                                             "maximum": 7}},
                                                     "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}},
])
ARGS = {"city": "Zürich", "days": 3}


def calls_of(text):
    content, calls = parse_tool_calls(text, TOOLS)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls], calls


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer as HFTok, models
    from transformers import PreTrainedTokenizerFast
    core = HFTok(models.WordLevel({"<s>": 0, "</s>": 1, "[UNK]": 2}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def assistant_call_text(hf_tokenizer, template_name, start, end):
    """The assistant turn of a tool call, as the family's template writes it (rendered by transformers)."""
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "abc123xyz", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]}]
    text = hf_tokenizer.apply_chat_template(messages, chat_template=(TEMPLATES / template_name).read_text(),
                                            tokenize=False, tools=[dict(t) for t in TOOLS])
    return re.search(re.escape(start) + r"(.*?)" + re.escape(end), text, re.S).group(1)


@pytest.mark.parametrize("template,start,end", [
    ("qwen2.5.jinja", "<|im_start|>assistant", "<|im_end|>"),
    ("llama-3.1.jinja", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    ("mistral-v0.3.jinja", "[/INST]", "</s>"),
])
def test_parses_what_family_templates_write(hf_tokenizer, template, start, end):
    text = assistant_call_text(hf_tokenizer, template, start, end)
    content, calls, raw = calls_of(text)
    assert calls == [("get_weather", ARGS)] and not content
    assert raw[0]["type"] == "function" and raw[0]["id"]


def test_hermes_with_content_and_several_calls():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    content, calls, _ = calls_of(text)
    assert content == "Let me check."
    assert calls == [("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize("text,expected", [
    ('<|python_tag|>{"name": "add", "parameters": {"a": 4, "b": 5}}', [("add", {"a": 4, "b": 5})]),
    ('{"name": "add", "parameters": {"a": 4, "b": 5}}; {"name": "get_weather", "parameters": {"city": "Rome"}}',
     [("add", {"a": 4, "b": 5}), ("get_weather", {"city": "Rome"})]),
    ('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 1}, "id": "a1b2c3d4e"}]', [("add", {"a": 1, "b": 1})]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Lima"}', [("get_weather", {"city": "Lima"})]),
    ('```json\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n```', [("add", {"a": 2, "b": 3})]),
    ('[{"name": "add", "arguments": "{\\"a\\": 7, \\"b\\": 8}"}]', [("add", {"a": 7, "b": 8})]),
    ('{"tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 0, "b": 9}}}]}',
     [("add", {"a": 0, "b": 9})]),
])
def test_formats(text, expected):
    content, calls, _ = calls_of(text)
    assert calls == expected and content is None


@pytest.mark.parametrize("text", [
    "The weather is nice.", '{"name": "unknown_fn", "arguments": {}}', '{"answer": 42}',
    '<tool_call>\n{"name": "add", "arguments": {"a": 1\n</tool_call>', "[TOOL_CALLS] not json", "",
    '{"name": "add", "arguments": {"a": 1}} and then some text',
])
def test_not_calls_stay_content(text):
    content, calls, _ = calls_of(text)
    assert calls == [] and content == text


def test_mistral_call_id_is_kept():
    _, _, raw = calls_of('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 1}, "id": "a1b2c3d4e"}]')
    assert raw[0]["id"] == "a1b2c3d4e"


def test_tool_choice_forms():
    assert resolve_tool_choice(None, TOOLS) == ("auto", None)
    assert resolve_tool_choice(None, []) == ("none", None)
    assert resolve_tool_choice("required", TOOLS) == ("required", None)
    assert resolve_tool_choice({"type": "function", "function": {"name": "add"}}, TOOLS) == ("required", "add")
    for bad in ("get_time", {"type": "function"}, 3, {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(ToolCallError):
            resolve_tool_choice(bad, TOOLS)
    with pytest.raises(ToolCallError):
        resolve_tool_choice("required", [])


@pytest.mark.parametrize("bad", ["x", [3], [{"type": "function", "function": {}}],
                                 [{"type": "retrieval"}], [TOOLS[0], TOOLS[0]],
                                 [{"type": "function", "function": {"name": "f", "parameters": []}}]])
def test_bad_tools_are_one_line_errors(bad):
    with pytest.raises(ToolCallError) as e:
        check_tools(bad)
    assert "\n" not in str(e.value)


def test_forced_schema_accepts_only_valid_calls():
    schema = forced_call_schema(TOOLS)
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, schema)
    for bad in ({"name": "add", "arguments": {"a": 1}}, {"name": "get_weather", "arguments": {"a": 1, "b": 2}},
                {"name": "other", "arguments": {}}, {"name": "add"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    named = forced_call_schema(TOOLS, "get_weather")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, named)


@pytest.mark.parametrize("name", [None, "add", "get_weather"])
def test_generation_under_forced_schema_parses_to_a_valid_call(default_model, name):
    with GGUFReader(default_model) as r:
        tok = Tokenizer.from_metadata(r.metadata)
    grammar = Grammar.from_json_schema(forced_call_schema(TOOLS, name))
    for seed in range(3):
        rng, m, ids = np.random.default_rng(seed), grammar.matcher(tok), []
        while True:
            logits = rng.standard_normal(tok.n_vocab).astype(np.float32)
            logits[sorted(tok.eog_ids)] += 2.0
            t = int(np.argmax(m.mask_logits(logits)))
            if t in tok.eog_ids:
                break
            m.accept(t)
            ids.append(t)
            assert len(ids) < 300
        _, calls, _ = calls_of(tok.decode(ids).decode())
        assert len(calls) == 1 and (name is None or calls[0][0] == name)
        params = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == calls[0][0])
        jsonschema.validate(calls[0][1], params)
