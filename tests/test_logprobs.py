"""logprobs (completion: llama-cpp-python's shape; chat: OpenAI's), plus logit_bias, n choices and
llama-cpp-python's logits_processor / stopping_criteria hooks.

The values are the log-softmax of the raw logits the sampler saw. They are checked against `eval_logits` (an
independent full-sequence evaluation) within 1e-4, on a tiny float16 model and on the quantized default model
(prefill and decode give the same logits: tests/test_batch_invariance.py), and exactly against the rows the
loop hands a logits processor.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from helpers.fake_llm import ByteTokenizer
from helpers.tiny_gguf import TinySpec, hf_model, write_gguf
from llmrun import Llama
from llmrun.engine.model import LlamaModel
from llmrun.errors import LlmrunError
from llmrun.gguf import GGUFReader

PROMPT = "The three primary colors are"
PATH_TOLERANCE = 1e-4      # quantized model: eval_logits vs the incremental pass (see the module docstring)


@pytest.fixture(scope="module")
def llm(default_model):
    return Llama(default_model, n_ctx=512, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random float16 LLaMA over ByteTokenizer's 261 ids."""
    spec = TinySpec(vocab=ByteTokenizer.n_vocab, qtype="f16", seed=3)
    path = write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", hf_model(spec), spec)
    return Llama.from_parts(ByteTokenizer(), LlamaModel.load(GGUFReader(path), n_ctx=256), name="tiny", seed=0)


def reference_logprobs(llm, tokens) -> np.ndarray:
    """log-softmax (float64) of eval_logits: row i = the distribution of the token after tokens[:i+1]."""
    z = llm.eval_logits(tokens).astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def check_against_eval_logits(llm, prompt_ids, generated, lp, top_n, tolerance, prompt_chars):
    ref = reference_logprobs(llm, prompt_ids + generated)
    n = len(lp["tokens"])
    assert n == len(generated) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    # character offsets from the start of the prompt (OpenAI's legacy completions)
    assert lp["text_offset"] == [prompt_chars + sum(map(len, lp["tokens"][:i])) for i in range(n)]
    for i, tok in enumerate(generated):
        row = ref[len(prompt_ids) - 1 + i]
        assert abs(lp["token_logprobs"][i] - row[tok]) < tolerance
        # top_logprobs is keyed by token text (llama-cpp-python's shape), so tokens with the same text share
        # a key: each entry must be one of the top N (or the sampled token) with that text and value
        candidates = [int(b) for b in np.argsort(-row)[:top_n]] + [tok]
        for text, value in lp["top_logprobs"][i].items():
            assert any(llm.detokenize([b]).decode("utf-8", "ignore") == text and abs(row[b] - value) < tolerance
                       for b in candidates), (text, value)
        assert max(lp["top_logprobs"][i].values()) == pytest.approx(row.max(), abs=tolerance)


class Recorder:
    """llama-cpp-python hooks that change nothing: the logits rows the loop saw (as a logits processor) and
    the sequence after each token (as a stopping criterion)."""

    def __init__(self):
        self.rows, self.ids = [], []

    def process(self, ids, scores):
        self.rows.append(scores.copy())
        return scores

    def stop(self, ids, logits):
        self.ids = [int(t) for t in ids]
        return False


def recorded(llm, prompt, **kwargs):
    """(completion, logits rows per sampled token, generated token ids)."""
    rec = Recorder()
    out = llm.create_completion(prompt, logits_processor=rec.process, stopping_criteria=rec.stop, **kwargs)
    prompt_ids = llm._prompt_tokens(prompt)
    return out, rec.rows, rec.ids[len(prompt_ids):]


def test_tiny_float_model_logprobs_equal_eval_logits(tiny):
    prompt = list(b"Hello there")
    out, _, generated = recorded(tiny, prompt, max_tokens=10, temperature=1.0, seed=2, logprobs=4)
    lp = out["choices"][0]["logprobs"]
    assert len(generated) == 10
    check_against_eval_logits(tiny, prompt, generated, lp, 4, 1e-4, len(tiny.detokenize(prompt).decode()))


def test_completion_logprobs_are_the_sampled_rows(llm):
    out, rows, generated = recorded(llm, PROMPT, max_tokens=12, temperature=0.9, seed=1, logprobs=5)
    lp = out["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == out["choices"][0]["text"] and len(generated) >= 8
    for i, tok in enumerate(generated):
        z = rows[i].astype(np.float64) - rows[i].max()
        logp = z - np.log(np.exp(z).sum())
        assert abs(lp["token_logprobs"][i] - logp[tok]) < 1e-5
        assert sorted(lp["top_logprobs"][i].values(), reverse=True)[:5] == pytest.approx(
            np.sort(logp)[::-1][:5], abs=1e-5)
    check_against_eval_logits(llm, llm.tokenize(PROMPT.encode()), generated, lp, 5, PATH_TOLERANCE, len(PROMPT))


def test_chat_logprobs_openai_shape_match_eval_logits(tiny):
    messages = [{"role": "user", "content": "Name a fruit."}]
    rec = Recorder()
    out = tiny.create_chat_completion(messages, max_tokens=6, temperature=0.8, seed=4, logprobs=True,
                                      top_logprobs=3, stopping_criteria=rec.stop)
    content = out["choices"][0]["logprobs"]["content"]
    ids = tiny.chat_tokens(messages)
    generated = rec.ids[len(ids):]
    ref = reference_logprobs(tiny, ids + generated)
    assert len(content) == len(generated) == 6
    for i, item in enumerate(content):
        row = ref[len(ids) - 1 + i]
        assert bytes(item["bytes"]) == tiny.detokenize([generated[i]])
        assert abs(item["logprob"] - row[generated[i]]) < 1e-4
        assert [t["logprob"] for t in item["top_logprobs"]] == pytest.approx(np.sort(row)[::-1][:3], abs=1e-4)
        assert [bytes(t["bytes"]) for t in item["top_logprobs"]] == [
            tiny.detokenize([int(b)]) for b in np.argsort(-row, kind="stable")[:3]]
    no = tiny.create_chat_completion(messages, max_tokens=2, temperature=0)
    assert no["choices"][0]["logprobs"] is None


def test_echo_logprobs_cover_the_prompt(llm):
    out = llm.create_completion(PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True)
    choice = out["choices"][0]
    assert choice["text"].startswith(PROMPT)
    lp = choice["logprobs"]
    ids = llm.tokenize(PROMPT.encode())
    body = ids[1:] if ids[0] == llm.token_bos() else ids
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = reference_logprobs(llm, ids)
    offset = len(ids) - len(body)
    for i in range(1, len(body)):
        assert abs(lp["token_logprobs"][i] - ref[offset + i - 1][body[i]]) < 1e-4
    assert "".join(lp["tokens"]) == choice["text"]


def test_logprobs_stream_chunks_carry_their_tokens(llm):
    chunks = list(llm.create_completion(PROMPT, max_tokens=5, temperature=0, logprobs=1, stream=True))
    whole = llm.create_completion(PROMPT, max_tokens=5, temperature=0, logprobs=1)["choices"][0]["logprobs"]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [v for p in parts for v in p["token_logprobs"]] == pytest.approx(whole["token_logprobs"], abs=1e-6)
    assert [v for p in parts for v in p["text_offset"]] == whole["text_offset"]


def test_logit_bias_bans_and_forces(llm):
    base = llm.create_completion(PROMPT, max_tokens=1, temperature=0, logprobs=2)["choices"][0]["logprobs"]
    first = llm.tokenize(base["tokens"][0].encode(), add_bos=False)[0]
    banned = llm.create_completion(PROMPT, max_tokens=1, temperature=0, logit_bias={first: -100})
    assert banned["choices"][0]["text"] != base["tokens"][0]
    second = [t for t in base["top_logprobs"][0] if t != base["tokens"][0]][0]
    assert banned["choices"][0]["text"] == second
    forced_id = llm.tokenize(b" zebra", add_bos=False)[0]
    forced = llm.create_completion(PROMPT, max_tokens=1, temperature=0, logit_bias={str(forced_id): 100.0})
    assert forced["choices"][0]["text"] == llm.detokenize([forced_id]).decode()
    # logprobs stay those of the raw logits, whatever the bias
    lp = llm.create_completion(PROMPT, max_tokens=1, temperature=0, logprobs=0,
                               logit_bias={forced_id: 100.0})["choices"][0]["logprobs"]
    ref = reference_logprobs(llm, llm.tokenize(PROMPT.encode()))[-1]
    assert abs(lp["token_logprobs"][0] - ref[forced_id]) < PATH_TOLERANCE and ref[forced_id] < -5


def test_n_choices_and_usage(llm):
    out = llm.create_completion(PROMPT, max_tokens=6, temperature=1.0, seed=7, n=3)
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2] and len(set(texts)) > 1
    n_gen = sum(len(llm.tokenize(t.encode(), add_bos=False)) for t in texts)
    assert out["usage"]["completion_tokens"] == pytest.approx(n_gen, abs=3)
    assert out["usage"]["prompt_tokens"] == len(llm.tokenize(PROMPT.encode()))
    again = llm.create_completion(PROMPT, max_tokens=6, temperature=1.0, seed=7, n=3)
    assert [c["text"] for c in again["choices"]] == texts            # same seed, same choices
    streamed = list(llm.create_chat_completion([{"role": "user", "content": "Hi"}], max_tokens=3, n=2,
                                               stream=True))
    assert {c["choices"][0]["index"] for c in streamed} == {0, 1}


def test_llama_cpp_python_hooks(llm):
    seen = []

    def only_x(ids, scores):
        seen.append(len(ids))
        x = llm.tokenize(b"x", add_bos=False)[0]
        out = np.full_like(scores, -np.inf)
        out[x] = 0.0
        return out

    out = llm.create_completion(PROMPT, max_tokens=4, logits_processor=[only_x])
    assert out["choices"][0]["text"] == "xxxx" and seen == sorted(seen) and len(seen) == 4
    stop_after_two = lambda ids, logits: len(ids) >= len(llm.tokenize(PROMPT.encode())) + 2  # noqa: E731
    out = llm.create_completion(PROMPT, max_tokens=10, temperature=0, stopping_criteria=[stop_after_two])
    assert out["usage"]["completion_tokens"] == 2 and out["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("kwargs", [dict(logprobs=-1), dict(logprobs=1.5), dict(n=0), dict(n=True),
                                    dict(logit_bias={"x": 1}), dict(logit_bias={5: math.inf}),
                                    dict(logit_bias=[1, 2]), dict(logits_processor=3)])
def test_bad_arguments_are_one_line_errors(llm, kwargs):
    with pytest.raises(LlmrunError) as e:
        llm.create_completion(PROMPT, max_tokens=2, **kwargs)
    assert "\n" not in str(e.value)
