"""The Llama API: OpenAI shapes, stop strings, UTF-8 streaming, cache reuse, context limits, cancel.

Unit tests run on a scripted fake model + byte tokenizer (exact control over what is generated);
the end-to-end tests at the bottom use the default SmolLM2 model.
"""
from __future__ import annotations

import inspect
import threading
import time

import numpy as np
import pytest

import llmrun
from helpers.fake_llm import BOS, GO, IM_END, ByteTokenizer, ScriptedModel
from llmrun import errors, quants
from llmrun.api import Llama
from llmrun.errors import ContextFullError, LlmrunError
from llmrun.text.chat_template import ChatTemplateError


def make(script, n_ctx=64, **kw):
    model = ScriptedModel(script.encode() if isinstance(script, str) else script, n_ctx=n_ctx, **kw)
    return Llama.from_parts(ByteTokenizer(), model, name="fake"), model


PROMPT = "Q<|go|>"


# ---- shapes ----------------------------------------------------------------------------------------------
def test_completion_shape_and_usage():
    llm, _ = make("Hello")
    out = llm.create_completion(PROMPT, max_tokens=50, temperature=0)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert isinstance(out["created"], int) and out["model"] == "fake"
    assert out["choices"] == [{"text": "Hello", "index": 0, "logprobs": None, "finish_reason": "stop"}]
    # prompt = BOS Q <|go|>; 5 generated tokens (the EOS that ended it is not counted)
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_max_tokens_gives_length():
    llm, _ = make("Hello world")
    out = llm.create_completion(PROMPT, max_tokens=4, temperature=0)
    assert out["choices"][0]["text"] == "Hell" and out["choices"][0]["finish_reason"] == "length"


def test_completion_stream_chunks():
    llm, _ = make("Hi!")
    chunks = list(llm.create_completion(PROMPT, max_tokens=10, temperature=0, stream=True))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hi!"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len({c["id"] for c in chunks}) == 1


def test_chat_completion_shape_and_stream():
    llm, model = make("Paris.")
    msgs = [{"role": "user", "content": "Capital of France?"}]
    out = llm.create_chat_completion(msgs, temperature=0)
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert out["choices"][0]["finish_reason"] == "stop" and out["choices"][0]["logprobs"] is None
    assert set(out["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    # ChatML fallback, rendered and parsed with special tokens, BOS added because the model wants it
    expected = ByteTokenizer().encode("<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n",
                                      add_bos=True, special=True)
    assert llm.chat_tokens(msgs) == expected

    chunks = list(llm.create_chat_completion(msgs, temperature=0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Paris."
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_im_end_is_end_of_generation():
    llm, _ = make(list(b"Yes") + [IM_END] + list(b"junk"))
    out = llm.create_chat_completion([{"role": "user", "content": "ok?"}], temperature=0)
    assert out["choices"][0]["message"]["content"] == "Yes"


def test_signatures_keep_the_promised_keywords_and_defaults():
    # the names, order and defaults the interface promises (llama-cpp-python's), chat differing in two
    order = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty", "stop", "seed", "stream"]
    shared = dict(top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0, stop=None, seed=None, stream=False,
                  frequency_penalty=0.0, presence_penalty=0.0, repeat_last_n=64)
    # interface.md's structured-output keywords, and llama-cpp-python's other call keywords (accepted)
    shared.update(grammar=None, response_format=None, logit_bias=None, n=1, logits_processor=None,
                  stopping_criteria=None, model=None, typical_p=1.0, tfs_z=1.0, mirostat_mode=0, mirostat_tau=5.0,
                  mirostat_eta=0.1)
    completion = dict(max_tokens=16, temperature=0.8, logprobs=None, echo=False, suffix=None)
    chat = dict(max_tokens=None, temperature=0.2, logprobs=False, top_logprobs=None, tools=None, tool_choice=None,
                functions=None, function_call=None)
    for method, first, own in [(Llama.create_completion, "prompt", completion),
                               (Llama.create_chat_completion, "messages", chat)]:
        params = inspect.signature(method).parameters
        assert list(params)[:2 + len(order)] == ["self", first] + order
        assert {n: p.default for n, p in params.items() if p.default is not p.empty} == {**shared, **own}
    llm, _ = make("Hello world")
    out = llm.create_completion(PROMPT, 4, 0)          # max_tokens and temperature by position still work
    assert out["choices"][0]["text"] == "Hell" and out["choices"][0]["finish_reason"] == "length"
    with pytest.raises(TypeError):
        llm.create_completion(PROMPT, max_token=4)


def test_llmrun_error_is_the_top_level_base_class():
    assert llmrun.LlmrunError is LlmrunError
    for cls in (errors.GGUFError, errors.QuantError, errors.TokenizerError, errors.ModelError,
                errors.ConvertError, errors.ContextFullError, ChatTemplateError):
        assert issubclass(cls, llmrun.LlmrunError)
    with pytest.raises(llmrun.LlmrunError, match="bogus"):
        quants.quantize(np.zeros((1, 32), np.float32), "bogus")
    llm, _ = make("x")
    with pytest.raises(llmrun.LlmrunError, match="temperature"):
        llm.create_completion(PROMPT, temperature="warm")


# ---- stop strings & UTF-8 --------------------------------------------------------------------------------
def test_stop_string_split_across_tokens_never_leaks():
    llm, _ = make("Hello ### world")
    chunks = list(llm.create_completion(PROMPT, max_tokens=50, temperature=0, stop=["###"], stream=True))
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == "Hello "
    assert not any("#" in t for t in texts)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    out = llm.create_completion(PROMPT, max_tokens=50, temperature=0, stop="###")
    assert out["choices"][0]["text"] == "Hello " and out["choices"][0]["finish_reason"] == "stop"


def test_partial_stop_prefix_is_released():
    llm, _ = make("a#b##")
    out = llm.create_completion(PROMPT, max_tokens=50, temperature=0, stop=["#c", "##"])
    assert out["choices"][0]["text"] == "a#b"
    llm, _ = make("x User")
    out = llm.create_completion(PROMPT, max_tokens=50, temperature=0, stop=["User:"])
    assert out["choices"][0]["text"] == "x User" and out["choices"][0]["finish_reason"] == "stop"


def test_earliest_stop_string_wins():
    llm, _ = make("one END two STOP")
    out = llm.create_completion(PROMPT, max_tokens=50, temperature=0, stop=["STOP", "END"])
    assert out["choices"][0]["text"] == "one "


@pytest.mark.parametrize("text", ["héllo 😀 東京 ✓", "🎉🎉", "日本語のテキスト"])
def test_streaming_utf8_split_across_tokens(text):
    llm, _ = make(text)   # byte tokens: every multi-byte character spans several tokens
    chunks = list(llm.create_completion(PROMPT, max_tokens=200, temperature=0, stream=True))
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == text
    assert not any("\ufffd" in t for t in texts)
    assert len([t for t in texts if t]) > 1


def test_eval_logits_fresh_sequence():
    llm, model = make("abc")
    toks = [BOS, ord("x"), GO, ord("a")]
    llm.create_completion(PROMPT, max_tokens=2, temperature=0)   # something cached before
    out = llm.eval_logits(toks)
    assert out.shape == (4, ByteTokenizer.n_vocab) and out.dtype == np.float32
    assert model.seq == toks
    # after <|go|> the script starts: 'a' predicted, then 'b'
    assert out[2].argmax() == ord("a") and out[3].argmax() == ord("b")


# ---- cache reuse, context ----------------------------------------------------------------------------------
def test_prompt_prefix_reuse_evaluates_only_new_tokens():
    llm, model = make("ok", n_ctx=200)
    p1 = "A long shared prefix<|go|>"
    llm.create_completion(p1, max_tokens=5, temperature=0)
    n1 = model.n_evaluated
    n_p1 = len(llm.tokenize(p1.encode(), special=True))
    assert n1 == n_p1 + 2   # prompt + 'o' + 'k' (evaluated to learn that EOS follows; EOS itself is not)
    p2 = p1 + "ok then<|go|>"
    llm.create_completion(p2, max_tokens=5, temperature=0)
    t = llm.last_timings
    assert t["n_prompt_reused"] == n_p1 + 2
    assert t["n_prompt_eval"] == len(" then") + 1
    assert model.n_evaluated - n1 == t["n_prompt_eval"] + 2
    # identical prompt: only the last token is re-evaluated (its logits are needed)
    before = model.n_evaluated
    out = llm.create_completion(p2, max_tokens=1, temperature=0)
    assert model.n_evaluated - before == 1 and out["choices"][0]["text"] == "o"


def test_context_full_is_length_not_crash():
    llm, model = make(b"z", n_ctx=20, after="cycle")
    out = llm.create_completion(PROMPT, max_tokens=None, temperature=0)
    # 3 prompt tokens; the cache fills at 20; one more token can still be sampled from the last logits
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 20 - 3 + 1
    assert model.n_past == 20


def test_prompt_larger_than_context_is_clear_error():
    llm, _ = make("x", n_ctx=8)
    with pytest.raises(ContextFullError, match="8"):
        llm.create_completion("a much too long prompt", max_tokens=4)
    with pytest.raises(ContextFullError):
        llm.eval_logits(list(range(9)))


def test_same_seed_same_output():
    script = list(b"abcdefgh")

    class Flat(ScriptedModel):
        def _row(self):   # a flat distribution over letters: output decided by the seed only
            row = np.full(ByteTokenizer.n_vocab, -30.0, dtype=np.float32)
            row[ord("a"):ord("z") + 1] = 0.0
            return row

    def run(seed):
        llm = Llama.from_parts(ByteTokenizer(), Flat(script, n_ctx=64), name="flat")
        return llm.create_completion(PROMPT, max_tokens=20, temperature=1.0, top_k=0, min_p=0.0,
                                     seed=seed)["choices"][0]["text"]
    assert run(7) == run(7)
    assert run(7) != run(8)


# ---- cancel, threads, vocab_only ---------------------------------------------------------------------------
def test_cancel_from_another_thread():
    llm, model = make(b"ab", n_ctx=100000, after="cycle", delay=0.01)
    timer = threading.Timer(0.3, llm.cancel)
    timer.start()
    t0 = time.perf_counter()
    out = llm.create_completion(PROMPT, max_tokens=100000, temperature=0)
    timer.join()
    assert out["choices"][0]["finish_reason"] == "cancelled"
    assert time.perf_counter() - t0 < 5
    assert 0 < out["usage"]["completion_tokens"] < 1000
    # the next call is not affected by the old cancel
    out2 = llm.create_completion(PROMPT, max_tokens=3, temperature=0)
    assert out2["choices"][0]["finish_reason"] == "length"


def test_cancel_stream_ends_with_cancelled_chunk():
    llm, _ = make(b"ab", n_ctx=100000, after="cycle")
    stream = llm.create_chat_completion([{"role": "user", "content": "go"}], temperature=0, stream=True)
    seen = []
    for c in stream:
        seen.append(c)
        if len(seen) == 5:
            llm.cancel()
    assert seen[-1]["choices"][0]["finish_reason"] == "cancelled"
    assert len(seen) <= 7


def test_one_generation_at_a_time_across_threads():
    llm, model = make("hello", n_ctx=4096, delay=0.002)
    results, errors = [], []

    def worker():
        try:
            for _ in range(3):
                results.append(llm.create_completion(PROMPT, max_tokens=10, temperature=0)["choices"][0]["text"])
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == ["hello"] * 9


def test_unfinished_stream_in_same_thread_is_refused_not_deadlocked():
    llm, _ = make("hello world")
    s = llm.create_completion(PROMPT, max_tokens=10, temperature=0, stream=True)
    next(s)
    with pytest.raises(LlmrunError, match="busy"):
        llm.create_completion(PROMPT, max_tokens=2, temperature=0)
    s.close()
    assert llm.create_completion(PROMPT, max_tokens=2, temperature=0)["choices"][0]["text"] == "he"


def test_abandoned_stream_releases_the_model():
    llm, _ = make("hello world")
    for chunk in llm.create_chat_completion([{"role": "user", "content": "x"}], temperature=0, stream=True):
        break   # the iterator is dropped here: CPython closes it and the lock is released
    assert llm.create_completion(PROMPT, max_tokens=2, temperature=0)["choices"][0]["text"] == "he"


def test_vocab_only_refuses_evaluation():
    llm = Llama.from_parts(ByteTokenizer(), None, n_ctx=16, name="v")
    assert llm.tokenize(b"hi") == [BOS, ord("h"), ord("i")]
    with pytest.raises(LlmrunError, match="vocab_only"):
        llm.create_completion("hi")


# ---- end to end on the default model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm(default_model):
    return Llama(str(default_model), n_ctx=512)


def test_e2e_vocab_only(default_model):
    # SmolLM2's HF tokenizer: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>
    llm = Llama(str(default_model), vocab_only=True)
    assert llm.n_vocab() == 49152
    assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    assert llm.detokenize([1, 2], special=True) == b"<|im_start|><|im_end|>"
    assert llm.detokenize([1, 2]) == b""
    ids = llm.tokenize(b"<|im_start|>user", special=True)
    assert len(ids) == 2 and ids[0] == 1 and llm.detokenize(ids[1:]) == b"user"
    assert len(llm.tokenize(b"<|im_start|>user", special=False)) > 2   # text, not the control token
    assert llm.detokenize(llm.tokenize(b"Hello world")) == b"Hello world"
    with pytest.raises(LlmrunError):
        llm.eval_logits([1, 2])


def test_e2e_capital_of_france(smollm):
    out = smollm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                        temperature=0, max_tokens=40)
    assert "Paris" in out["choices"][0]["message"]["content"]
    assert out["choices"][0]["finish_reason"] in ("stop", "length")


def test_e2e_eval_logits_matches_incremental(smollm):
    toks = smollm.tokenize(b"The quick brown fox")
    full = smollm.eval_logits(toks)
    assert full.shape == (len(toks), smollm.n_vocab())
    # the completion path (prefix reuse) gives the same next-token choice as the full evaluation
    out = smollm.create_completion(toks, max_tokens=1, temperature=0)
    assert smollm.tokenize(out["choices"][0]["text"].encode(), add_bos=False)[0] == int(full[-1].argmax())
