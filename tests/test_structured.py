"""Structured output through the API with the default model and sampling on: outputs under JSON schemas are
validated by `jsonschema`, outputs under GBNF grammars matched by regexes, JSON mode parsed by `json`."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from llmrun import Llama, LlamaGrammar
from llmrun.errors import LlmrunError

from helpers.constraints import GBNF, SCHEMAS

ASK = [{"role": "user", "content": "Answer with a JSON document describing something of your choice."}]


@pytest.fixture(scope="module")
def llm(default_model):
    return Llama(default_model, n_ctx=1024, seed=0)


@pytest.mark.parametrize("schema", SCHEMAS, ids=[f"s{i}" for i in range(len(SCHEMAS))])
def test_chat_json_schema_outputs_validate(llm, schema):
    for seed in (1, 2):
        out = llm.create_chat_completion(
            ASK, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "doc", "schema": schema, "strict": True}})
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


@pytest.mark.parametrize("grammar,regex", GBNF, ids=[f"g{i}" for i in range(len(GBNF))])
def test_completion_gbnf_outputs_match(llm, grammar, regex):
    for seed in (1, 2):
        out = llm.create_completion("Here is an example:", grammar=grammar, temperature=1.0, seed=seed,
                                    max_tokens=120)
        choice = out["choices"][0]
        assert choice["finish_reason"] == "stop" and re.fullmatch(regex, choice["text"]), choice


def test_json_object_mode_and_llama_cpp_python_schema_shape(llm):
    # free JSON has unbounded strings, which a 135M model sampling may never close: greedy here
    out = llm.create_chat_completion(ASK, response_format={"type": "json_object"}, temperature=0, max_tokens=200)
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)
    schema = SCHEMAS[0]
    out = llm.create_chat_completion(ASK, response_format={"type": "json_object", "schema": schema}, seed=4,
                                     max_tokens=120)
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), schema)


def test_streamed_constrained_output_is_the_same_text(llm):
    kwargs = dict(grammar=LlamaGrammar.from_string(GBNF[3][0]), temperature=0.8, seed=5, max_tokens=60)
    whole = llm.create_completion("Greeting:", **kwargs)["choices"][0]["text"]
    streamed = "".join(c["choices"][0]["text"] for c in llm.create_completion("Greeting:", stream=True, **kwargs))
    assert streamed == whole and re.fullmatch(GBNF[3][1], whole)


def test_n_choices_each_follow_the_schema(llm):
    out = llm.create_chat_completion(ASK, n=3, temperature=1.0, seed=6, max_tokens=120,
                                     response_format={"type": "json_schema",
                                                      "json_schema": {"name": "p", "schema": SCHEMAS[1]}})
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for c in out["choices"]:
        jsonschema.validate(json.loads(c["message"]["content"]), SCHEMAS[1])


@pytest.mark.parametrize("kwargs", [
    dict(grammar="root ::= nothing"), dict(response_format={"type": "json_schema", "json_schema": {"schema": 5}}),
    dict(response_format={"type": "yaml"}), dict(grammar='root ::= "a"', response_format={"type": "json_object"}),
    dict(grammar=42),
])
def test_bad_constraints_fail_at_the_call_in_one_line(llm, kwargs):
    for stream in (False, True):
        with pytest.raises(LlmrunError) as e:
            llm.create_chat_completion(ASK, stream=stream, max_tokens=4, **kwargs)
        assert "\n" not in str(e.value)
