"""Tool calls through create_chat_completion: a scripted tiny model whose chat template (Qwen2.5's, from
tests/data/chat_templates) formats the tools, for "auto" parsing, streaming and tool results in the
conversation; and the default model under tool_choice "required" / a named function, whose arguments must
validate against the tool's JSON schema."""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from helpers.fake_llm import IM_END, ByteTokenizer, ScriptedModel
from llmrun import Llama
from llmrun.errors import LlmrunError

QWEN = (Path(__file__).parent / "data" / "chat_templates" / "qwen2.5.jinja").read_text()
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 1000}, "b": {"type": "integer", "minimum": 0,
                                                                        "maximum": 1000}},
        "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'


class QwenBytes(ByteTokenizer):
    chat_template = QWEN


def qwen_llm(script: str):
    model = ScriptedModel(list(script.encode()) + [IM_END], n_ctx=4096)
    return Llama.from_parts(QwenBytes(), model, name="tiny-qwen"), model


def seen_prompt(model) -> str:
    return bytes(t for t in model.seq if t < 256).decode()


def test_template_formats_tools_and_call_is_parsed():
    llm, model = qwen_llm(CALL)
    out = llm.create_chat_completion(ASK, tools=[WEATHER], temperature=0)
    prompt = seen_prompt(model)
    assert "# Tools" in prompt and json.dumps(WEATHER) in prompt     # the template's own tojson of the tool
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}


def test_stream_gives_tool_call_delta_and_no_call_text():
    llm, _ = qwen_llm("Let me check.\n" + CALL)
    chunks = list(llm.create_chat_completion(ASK, tools=[WEATHER], temperature=0, stream=True))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant"}
    content = "".join(d.get("content", "") for d in deltas)
    assert content.strip() == "Let me check." and "<tool_call>" not in content
    (calls,) = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert calls[0]["index"] == 0 and calls[0]["function"]["name"] == "get_weather"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls" and deltas[-1] == {}


def test_plain_answer_with_tools_stays_content():
    llm, _ = qwen_llm("It is sunny in Paris.")
    out = llm.create_chat_completion(ASK, tools=[WEATHER], temperature=0)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "It is sunny in Paris."}
    assert out["choices"][0]["finish_reason"] == "stop"
    streamed = list(llm.create_chat_completion(ASK, tools=[WEATHER], temperature=0, stream=True))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed) == "It is sunny in Paris."


def test_tool_results_in_the_conversation():
    llm, model = qwen_llm("It is 22 degrees.")
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees, sunny"},
    ]
    out = llm.create_chat_completion(messages, tools=[WEATHER], temperature=0)
    prompt = seen_prompt(model)
    # the call as Qwen's template writes it (arguments as an object) and the result as a tool response
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' \
        in prompt
    assert "<tool_response>\n22 degrees, sunny\n</tool_response>" in prompt
    assert out["choices"][0]["message"]["content"] == "It is 22 degrees."


def test_tool_choice_none_offers_nothing_and_parses_nothing():
    llm, model = qwen_llm(CALL)
    out = llm.create_chat_completion(ASK, tools=[WEATHER], tool_choice="none", temperature=0)
    assert "# Tools" not in seen_prompt(model)
    assert out["choices"][0]["message"] == {"role": "assistant", "content": CALL}


def test_legacy_functions_are_tools():
    llm, _ = qwen_llm(CALL)
    out = llm.create_chat_completion(ASK, functions=[WEATHER["function"]], temperature=0)
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("kwargs", [
    dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
    dict(tools="get_weather"), dict(tool_choice="required"), dict(tools=[WEATHER], tool_choice=7),
])
def test_bad_tool_arguments_are_one_line_errors(kwargs):
    llm, _ = qwen_llm(CALL)
    with pytest.raises(LlmrunError) as e:
        llm.create_chat_completion(ASK, **kwargs)
    assert "\n" not in str(e.value)


# ---- forced calls with the default model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm(default_model):
    return Llama(default_model, n_ctx=1024, seed=0)


@pytest.mark.parametrize("choice,expected", [
    ({"type": "function", "function": {"name": "get_weather"}}, "get_weather"),
    ({"type": "function", "function": {"name": "add"}}, "add"),
    ("required", None),
])
def test_forced_choice_gives_a_valid_call(smollm, choice, expected):
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for seed in (1, 2):
        out = smollm.create_chat_completion(
            [{"role": "user", "content": "What is 12 plus 30? And the weather in Oslo?"}], tools=[WEATHER, ADD],
            tool_choice=choice, temperature=0.8, seed=seed, max_tokens=120)
        c = out["choices"][0]
        assert c["finish_reason"] == "tool_calls", c
        (call,) = c["message"]["tool_calls"]
        name = call["function"]["name"]
        assert expected in (None, name)
        jsonschema.validate(json.loads(call["function"]["arguments"]), params[name])


def test_template_without_tools_gets_them_described(smollm):
    """SmolLM2's template ignores `tools`: they are described in the system message instead."""
    assert "tools" not in smollm.chat_template
    text = smollm.detokenize(smollm.chat_tokens(ASK, tools=[WEATHER]), special=True).decode()
    assert json.dumps(WEATHER["function"]) in text and '{"name": <function name>' in text
    assert text.count("<|im_start|>system") == 1
    plain = smollm.detokenize(smollm.chat_tokens(ASK), special=True).decode()
    assert "get_weather" not in plain


def test_template_with_tools_is_not_given_a_second_description():
    llm, model = qwen_llm(CALL)
    llm.create_chat_completion(ASK, tools=[WEATHER], temperature=0)
    assert "You can call these functions" not in seen_prompt(model)
