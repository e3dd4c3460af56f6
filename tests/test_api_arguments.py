"""Bad Python API arguments (issue 10, defect 9): LlmrunError subclasses that are also the natural Python
error (TypeError for a wrong type, ValueError for an impossible value), naming the argument."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.tiny_files import write_model
from llmrun.api import Llama
from llmrun.errors import ArgumentTypeError, InvalidArgumentError, LlmrunError


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("m") / "tiny.gguf")


@pytest.fixture(scope="module")
def llm(model_file):
    return Llama(str(model_file), n_ctx=64)


def _raises(kind, natural, fn, *a, match=None, **kw):
    with pytest.raises(kind, match=match) as e:
        fn(*a, **kw)
    assert isinstance(e.value, LlmrunError) and isinstance(e.value, natural)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("tokens,kind,natural", [
    ([2 ** 63], InvalidArgumentError, ValueError),
    ([-1], InvalidArgumentError, ValueError),
    ([10 ** 6], InvalidArgumentError, ValueError),
    ([float("nan")], ArgumentTypeError, TypeError),
    ([1.5], ArgumentTypeError, TypeError),
    (["1"], ArgumentTypeError, TypeError),
    ("hello", ArgumentTypeError, TypeError),
    (None, ArgumentTypeError, TypeError),
    ([True], ArgumentTypeError, TypeError),
    (np.array([[1, 2]]), ArgumentTypeError, TypeError),
    (np.array([1.0]), ArgumentTypeError, TypeError),
])
def test_eval_logits_and_prompt_token_ids(llm, tokens, kind, natural):
    _raises(kind, natural, llm.eval_logits, tokens)
    if not isinstance(tokens, str):
        _raises(kind, natural, llm.create_completion, tokens, max_tokens=1)
    if tokens is not None and not isinstance(tokens, str):
        _raises(kind, natural, llm.detokenize, tokens)


def test_numpy_token_ids_are_fine(llm):
    assert llm.eval_logits(np.array([5, 6], dtype=np.int32)).shape == (2, llm.n_vocab())


@pytest.mark.parametrize("kwargs,kind,natural,match", [
    ({"n_ctx": "64"}, ArgumentTypeError, TypeError, "n_ctx"),
    ({"n_ctx": 2 ** 40}, InvalidArgumentError, ValueError, "n_ctx"),
    ({"n_ctx": -5}, InvalidArgumentError, ValueError, "n_ctx"),
    ({"n_ctx": 64.0}, ArgumentTypeError, TypeError, "n_ctx"),
    ({"n_threads": "2"}, ArgumentTypeError, TypeError, "n_threads"),
    ({"n_threads": 0}, InvalidArgumentError, ValueError, "n_threads"),
    ({"seed": "1"}, ArgumentTypeError, TypeError, "seed"),
    ({"seed": -7}, InvalidArgumentError, ValueError, "seed"),
    ({"vocab_only": "maybe"}, ArgumentTypeError, TypeError, "vocab_only"),
])
def test_constructor_arguments(model_file, kwargs, kind, natural, match):
    _raises(kind, natural, Llama, str(model_file), match=match, **kwargs)


def test_model_path_of_the_wrong_type():
    _raises(ArgumentTypeError, TypeError, Llama, 42, match="model_path")


@pytest.mark.parametrize("kwargs,kind,natural,match", [
    ({"stop": 5}, ArgumentTypeError, TypeError, "stop"),
    ({"stop": [b"x"]}, ArgumentTypeError, TypeError, "stop"),
    ({"max_tokens": "many"}, ArgumentTypeError, TypeError, "max_tokens"),
    ({"temperature": "hot"}, ArgumentTypeError, TypeError, "temperature"),
    ({"temperature": float("nan")}, InvalidArgumentError, ValueError, "temperature"),
    ({"top_k": "many"}, ArgumentTypeError, TypeError, "top_k"),
    ({"top_p": 2.0}, InvalidArgumentError, ValueError, "top_p"),
    ({"seed": "x"}, ArgumentTypeError, TypeError, "seed"),
    ({"seed": -2}, InvalidArgumentError, ValueError, "seed"),
    ({"stream": "perhaps"}, ArgumentTypeError, TypeError, "stream"),
])
def test_completion_arguments(llm, kwargs, kind, natural, match):
    _raises(kind, natural, llm.create_completion, "hello", match=match, **kwargs)
    _raises(kind, natural, llm.create_chat_completion, [{"role": "user", "content": "hi"}], match=match, **kwargs)


@pytest.mark.parametrize("text", [None, 5, ["a"], {"a": 1}])
def test_tokenize_needs_text(llm, text):
    _raises(ArgumentTypeError, TypeError, llm.tokenize, text)


@pytest.mark.parametrize("messages", [None, "hello", 5, [5], [{"content": "no role"}], {"role": "user"}])
def test_chat_messages_of_the_wrong_shape(llm, messages):
    with pytest.raises(LlmrunError):
        llm.create_chat_completion(messages, max_tokens=1)


def test_seed_minus_one_is_random(model_file):
    """llama-cpp-python's convention: seed=-1 draws a fresh random seed (here: fresh entropy)."""
    a = Llama(str(model_file), n_ctx=64, seed=-1)
    texts = {a.create_completion("hello", max_tokens=12, temperature=5.0, top_k=0, top_p=1.0, min_p=0.0,
                                 seed=-1)["choices"][0]["text"] for _ in range(4)}
    assert len(texts) > 1
    same = {Llama(str(model_file), n_ctx=64).create_completion("hello", max_tokens=12, temperature=5.0, top_k=0,
                                                                top_p=1.0, min_p=0.0, seed=3)["choices"][0]["text"]
            for _ in range(2)}
    assert len(same) == 1


def test_false_strings_are_false(llm):
    """JSON bodies send "false"; Python's bool("false") would be True."""
    assert isinstance(llm.create_completion("hello", max_tokens=2, stream="false"), dict)
    chunks = llm.create_completion("hello", max_tokens=2, stream="true")
    assert not isinstance(chunks, dict) and list(chunks)
