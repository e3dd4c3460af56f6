"""Embeddings (`Llama.embed`, `create_embedding`): pooled final-normed hidden states checked against
transformers' `last_hidden_state` on a tiny float32 model (mean, cls, last, none; the file's pooling_type),
and shape, determinism, normalization and the OpenAI shape on the default model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.fake_llm import ByteTokenizer
from helpers.tiny_gguf import TinySpec, hf_model, write_gguf
from llmrun import Llama
from llmrun.errors import LlmrunError

SPEC = TinySpec(vocab=ByteTokenizer.n_vocab, qtype="f32", seed=5)
IDS = [[72, 101, 108, 108, 111, 33], [1, 2, 3], list(range(40, 90))]


def byte_vocab() -> dict:
    """GGUF metadata of a byte-level BPE vocabulary without merges: one token per byte (GPT-2's byte-to-
    character map) plus ByteTokenizer's five control tokens, so ids match ByteTokenizer's."""
    from llmrun.text.tokenizer_bpe import char_to_byte
    chars = {b: ch for ch, b in char_to_byte().items()}
    tokens = [chars[i] for i in range(256)] + ["<s>", "</s>", "<|im_end|>", "<|im_start|>", "<|go|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1] * 256 + [3] * 5, "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 257}


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    hf = hf_model(SPEC)
    folder = tmp_path_factory.mktemp("emb")
    plain = write_gguf(folder / "plain.gguf", hf, SPEC, metadata=byte_vocab())
    cls = write_gguf(folder / "cls.gguf", hf, SPEC, metadata={**byte_vocab(), "llama.pooling_type": 2})
    return hf, plain, cls


def tiny_llm(path, pooling_type=-1):
    # a float32 KV cache: hidden states are compared element by element at 1e-4 (the f16 default moves them by
    # up to 1e-3 on this random model; its bound is on the logits' KL, tests/test_kv_cache_types.py)
    return Llama(path, n_ctx=128, pooling_type=pooling_type, type_k="f32", type_v="f32")


def hf_hidden(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf.model(torch.tensor([ids])).last_hidden_state[0].numpy()


@pytest.mark.parametrize("pooling,reduce", [
    ("mean", lambda h: h.mean(axis=0)), ("cls", lambda h: h[0]), ("last", lambda h: h[-1]), ("none", lambda h: h),
])
def test_pooled_hidden_states_match_transformers(tiny_files, pooling, reduce):
    hf, plain, _ = tiny_files
    llm = tiny_llm(plain, pooling_type=pooling)
    got = llm.embed(IDS)
    for ids, vec in zip(IDS, got):
        want = reduce(hf_hidden(hf, ids))
        np.testing.assert_allclose(np.array(vec), want, rtol=1e-4, atol=1e-4)


def test_file_pooling_type_is_used_and_mean_is_the_default(tiny_files):
    hf, plain, cls = tiny_files
    text = "Hello, pooling!"
    by_file, default = tiny_llm(cls), tiny_llm(plain)
    assert (by_file.pooling, default.pooling) == ("cls", "mean")
    ids = by_file.tokenize(text.encode())
    assert ids == default.tokenize(text.encode()) and len(ids) >= len(text)
    np.testing.assert_allclose(by_file.embed(text), hf_hidden(hf, ids)[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(default.embed(text), hf_hidden(hf, ids).mean(axis=0), rtol=1e-4, atol=1e-4)
    # the constructor's pooling_type wins over the file's
    np.testing.assert_allclose(tiny_llm(cls, pooling_type="last").embed(text), hf_hidden(hf, ids)[-1],
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def smollm(default_model):
    return Llama(default_model, n_ctx=512, embedding=True)


def test_default_model_embeddings(smollm):
    texts = ["Hello, world!", "Goodbye, world!", "Paris is the capital of France."]
    out = smollm.create_embedding(texts)
    assert out["object"] == "list" and [d["index"] for d in out["data"]] == [0, 1, 2]
    assert all(d["object"] == "embedding" and len(d["embedding"]) == smollm.n_embd() == 576 for d in out["data"])
    assert out["usage"]["prompt_tokens"] == sum(len(smollm.tokenize(t.encode())) for t in texts)
    single = smollm.create_embedding(texts[1])
    assert len(single["data"]) == 1
    np.testing.assert_array_equal(single["data"][0]["embedding"], out["data"][1]["embedding"])   # deterministic
    assert smollm.embed(texts[0]) == smollm.embed(texts[0])
    unit = np.array(smollm.embed(texts, normalize=True))
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)
    raw = np.array(smollm.embed(texts))
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    # similar sentences are closer than unrelated ones
    assert unit[0] @ unit[1] > unit[0] @ unit[2]


def test_embedding_does_not_disturb_generation(smollm):
    first = smollm.create_completion("The capital of France is", max_tokens=6, temperature=0)["choices"][0]["text"]
    smollm.embed("Something else entirely, long enough to fill a few cache positions.")
    again = smollm.create_completion("The capital of France is", max_tokens=6, temperature=0)["choices"][0]["text"]
    assert again == first


def test_long_input_truncates_or_fails(smollm):
    long = "word " * 700
    assert len(smollm.embed(long)) == 576
    with pytest.raises(LlmrunError):
        smollm.embed(long, truncate=False)


@pytest.mark.parametrize("bad", [[], [[]], 3, [1.5], {"a": 1}, [[1, 2], "x", 3]])
def test_bad_inputs_are_one_line_errors(smollm, bad):
    with pytest.raises(LlmrunError) as e:
        smollm.embed(bad)
    assert "\n" not in str(e.value)


def test_rank_pooling_is_refused(default_model):
    with pytest.raises(LlmrunError, match="rank"):
        Llama(default_model, vocab_only=True, pooling_type=4)

