"""`llmrun serve` through the official `openai` client: models, chat, streaming, completions, stop strings,
token limits, usage, seeds, several choices. The server must answer exactly as the Python API does for the
same request (same engine, same defaults), which tests/test_api.py checks against its own references."""
from __future__ import annotations

import openai  # dev dependency; a missing one must fail, not skip
import pytest

from helpers.server import ServerProcess
from llmrun.api import Llama

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def server(default_model):
    with ServerProcess(default_model, "--alias", "smol", "--parallel", "2") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def llm(default_model):
    return Llama(default_model, n_ctx=4096, n_threads=2)


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smol"]
    assert client.models.retrieve("smol").id == "smol"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_chat_equals_python_api_and_stream_equals_non_stream(client, llm):
    ref = llm.create_chat_completion(QUESTION, temperature=0, max_tokens=24)
    out = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=24)
    assert out.object == "chat.completion" and out.model == "smol"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref["choices"][0]["message"]["content"]
    assert out.choices[0].finish_reason == ref["choices"][0]["finish_reason"]
    assert out.usage.prompt_tokens == len(llm.chat_tokens(QUESTION)) == ref["usage"]["prompt_tokens"]
    assert out.usage.completion_tokens == ref["usage"]["completion_tokens"]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [out.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions(client, llm):
    ref = llm.create_completion("Once upon a time", temperature=0, max_tokens=16)
    out = client.completions.create(model="smol", prompt="Once upon a time", temperature=0, max_tokens=16)
    assert out.object == "text_completion"
    assert out.choices[0].text == ref["choices"][0]["text"]
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 16
    streamed = client.completions.create(model="smol", prompt="Once upon a time", temperature=0, max_tokens=16,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text
    # token ids and echo
    ids = llm.tokenize(b"Once upon a time", add_bos=True, special=True)
    by_ids = client.completions.create(model="smol", prompt=ids, temperature=0, max_tokens=16, echo=True)
    assert by_ids.choices[0].text == llm.detokenize(ids).decode() + out.choices[0].text


def test_stop_and_max_tokens(client, llm):
    full = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    assert "Paris" in text
    cut = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=24,
                                         stop=["Paris", "never-appears"])
    assert cut.choices[0].message.content == text[:text.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert text.startswith(short.choices[0].message.content)
    newer = client.chat.completions.create(model="smol", messages=QUESTION, temperature=0,
                                           max_completion_tokens=3)
    assert newer.choices[0].message.content == short.choices[0].message.content


def test_seeds_and_choices(client):
    kw = dict(model="smol", messages=[{"role": "user", "content": "Write a short poem about the sea."}],
              temperature=1.0, max_tokens=24)
    first = client.chat.completions.create(seed=1234, **kw)
    a = first.choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=99, **kw).choices[0].message.content
    assert a == b and a != c
    two = client.chat.completions.create(seed=1234, n=2, **kw)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].message.content == a        # choice i samples with seed + i
    assert two.choices[1].message.content != a
    assert two.usage.prompt_tokens == first.usage.prompt_tokens         # the prompt counts once
    assert first.usage.completion_tokens < two.usage.completion_tokens <= 2 * 24


def test_api_errors_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=[], max_tokens=4)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=QUESTION, temperature=-1)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "hi " * 5000}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_lora_is_served(default_model, tmp_path):
    """`serve --lora` answers as `Llama(lora_path=...)` does, and differently from the base."""
    import torch
    from peft import LoraConfig, get_peft_model

    from helpers.tiny_gguf import reference_model_from_gguf

    pm = get_peft_model(reference_model_from_gguf(default_model),
                        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(tmp_path / "adapter")
    kw = dict(temperature=0, max_tokens=16)
    want = Llama(default_model, n_ctx=512, n_threads=2, lora_path=tmp_path / "adapter").create_chat_completion(
        QUESTION, **kw)["choices"][0]["message"]["content"]
    base = Llama(default_model, n_ctx=512, n_threads=2).create_chat_completion(QUESTION, **kw)
    assert want != base["choices"][0]["message"]["content"]
    with ServerProcess(default_model, "--ctx", "512", "--lora", str(tmp_path / "adapter")) as srv, \
            openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0) as c:
        assert any("LoRA" in line for line in srv.log)
        got = c.chat.completions.create(model="m", messages=QUESTION, **kw).choices[0].message.content
    assert got == want


CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                        "country": {"type": "string", "maxLength": 20}},
        "required": ["city", "country"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_json_schema(client, llm):
    import json

    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    msgs = [{"role": "user", "content": "Give the capital of France and its country as JSON."}]
    out = client.chat.completions.create(model="smol", messages=msgs, temperature=0, max_tokens=64,
                                         response_format=fmt)
    text = out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), CITY)
    ref = llm.create_chat_completion(msgs, temperature=0, max_tokens=64, response_format=fmt)
    assert text == ref["choices"][0]["message"]["content"]
    streamed = client.chat.completions.create(model="smol", messages=msgs, temperature=0, max_tokens=64,
                                              response_format=fmt, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
    plain = client.chat.completions.create(model="smol", messages=msgs, temperature=0, max_tokens=64,
                                           response_format={"type": "json_object"})
    ref = llm.create_chat_completion(msgs, temperature=0, max_tokens=64, response_format={"type": "json_object"})
    assert plain.choices[0].message.content == ref["choices"][0]["message"]["content"]


def test_tools(client, llm):
    import json

    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(model="smol", messages=msgs, temperature=0, max_tokens=64,
                                         tools=[WEATHER_TOOL], tool_choice=forced)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    ref = llm.create_chat_completion(msgs, temperature=0, max_tokens=64, tools=[WEATHER_TOOL], tool_choice=forced)
    assert json.loads(call.function.arguments) == json.loads(
        ref["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    streamed = list(client.chat.completions.create(model="smol", messages=msgs, temperature=0, max_tokens=64,
                                                   tools=[WEATHER_TOOL], tool_choice=forced, stream=True))
    calls = [tc for c in streamed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather"
    assert json.loads("".join(tc.function.arguments or "" for tc in calls)) == json.loads(call.function.arguments)
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_logprobs_logit_bias_and_embeddings(client, llm):
    msgs = QUESTION
    out = client.chat.completions.create(model="smol", messages=msgs, temperature=0, max_tokens=6, logprobs=True,
                                         top_logprobs=3)
    ref = llm.create_chat_completion(msgs, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    got = [(t.token, round(t.logprob, 4), [a.token for a in t.top_logprobs]) for t in out.choices[0].logprobs.content]
    want = [(t["token"], round(t["logprob"], 4), [a["token"] for a in t["top_logprobs"]])
            for t in ref["choices"][0]["logprobs"]["content"]]
    assert got == want and len(got) == out.usage.completion_tokens
    first = llm.tokenize(out.choices[0].message.content.encode(), add_bos=False)[0]
    banned = client.chat.completions.create(model="smol", messages=msgs, temperature=0, max_tokens=6,
                                            logit_bias={str(first): -100})
    assert llm.tokenize(banned.choices[0].message.content.encode(), add_bos=False)[0] != first
    emb = client.embeddings.create(model="smol", input=["Paris is in France.", "Bonjour"])
    want = llm.create_embedding(["Paris is in France.", "Bonjour"])
    assert [d.embedding for d in emb.data] == [d["embedding"] for d in want["data"]]
    assert emb.usage.prompt_tokens == want["usage"]["prompt_tokens"]
