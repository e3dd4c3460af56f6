"""Batch invariance: a position's logits do not depend on how the tokens reached the model — one forward of the
whole prompt (eval_logits), token by token (decode), chunks of any size, after a cached prefix (docs/kernels.md,
"Batch invariance"). The products' integer GEMM rounds each block like the decode kernels (qmatmul._epilogue_ir)
and attention has one body for any number of queries (ops._attend), so the rows are equal bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.tiny_gguf import TinySpec, hf_model, write_gguf
from llmrun import Llama
from llmrun.engine.model import LlamaModel
from llmrun.gguf import GGUFReader
from llmrun.kernels.ops import ATTN_BLOCK

N_TINY = ATTN_BLOCK + 20   # past one block of widened K/V positions, several query tiles


def one_by_one(model: LlamaModel, ids) -> np.ndarray:
    model.reset()
    return np.stack([model.forward([t]) for t in ids])


def in_chunks(model: LlamaModel, ids, chunk: int, prefix: int = 0) -> np.ndarray:
    """All positions' logits, the first `prefix` tokens fed one forward earlier (a cached prefix)."""
    model.reset()
    rows = [model.forward(ids[:prefix], all_logits=True)] if prefix else []
    rows += [model.forward(ids[i:i + chunk], all_logits=True) for i in range(prefix, len(ids), chunk)]
    return np.concatenate(rows)


def greedy(model: LlamaModel, ids, n: int, chunk: int, prefix: int = 0) -> list[int]:
    last = in_chunks(model, ids, chunk, prefix)[-1]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(last)))
        last = model.forward([out[-1]])
    return out


@pytest.fixture(scope="module", params=["q4_0", "q8_0", "q4_k"])
def tiny_model(request, tmp_path_factory):
    """A random LLaMA with grouped K/V heads (8 query heads over 2 K/V heads) quantized to the given type."""
    spec = TinySpec(hidden=256, ff=512, heads=8, kv_heads=2, vocab=300, qtype=request.param, seed=5)
    path = write_gguf(tmp_path_factory.mktemp("inv") / f"tiny-{request.param}.gguf", hf_model(spec), spec)
    return LlamaModel.load(GGUFReader(path), n_ctx=256)


def test_tiny_models_prefill_equals_decode(tiny_model):
    ids = [int(t) for t in np.random.default_rng(1).integers(0, 300, N_TINY)]
    want = one_by_one(tiny_model, ids)
    for chunk in (N_TINY, 37, 16, 5, 2):
        np.testing.assert_array_equal(in_chunks(tiny_model, ids, chunk), want, err_msg=f"chunk {chunk}")
    np.testing.assert_array_equal(in_chunks(tiny_model, ids, 64, prefix=29), want)


def test_tiny_models_greedy_same_for_any_chunking(tiny_model):
    ids = [int(t) for t in np.random.default_rng(2).integers(0, 300, 40)]
    want = greedy(tiny_model, ids, 12, chunk=len(ids))
    for chunk, prefix in ((7, 0), (1, 0), (40, 13), (4, 31)):
        assert greedy(tiny_model, ids, 12, chunk, prefix) == want, (chunk, prefix)


PROMPT = ("Q: What is the capital of France? A: The capital of France is Paris. Q: And the capital of Italy? "
          "A: It is Rome. Q: Which colors are the primary colors? A:")


@pytest.fixture(scope="module")
def llm(default_model):
    return Llama(default_model, n_ctx=512, seed=0)


@pytest.fixture(scope="module")
def engine(default_model):
    """The default model's engine on its own (the Llama object keeps its cache's bookkeeping to itself)."""
    return LlamaModel.load(GGUFReader(default_model), n_ctx=512)


def test_default_model_eval_logits_equal_decoding(llm, engine):
    ids = llm.tokenize(PROMPT.encode(), add_bos=True)
    assert len(ids) > 32   # several query tiles of the prefill kernels
    want = one_by_one(engine, ids)
    np.testing.assert_array_equal(llm.eval_logits(ids), want)
    np.testing.assert_array_equal(in_chunks(engine, ids, 6, prefix=5), want)


def test_default_model_greedy_same_with_cached_prefix(default_model, llm, engine):
    want = llm.create_completion(PROMPT, max_tokens=16, temperature=0)["choices"][0]["text"]
    warm = Llama(default_model, n_ctx=512, seed=0)
    warm.create_completion(PROMPT[:40], max_tokens=4, temperature=0)   # leaves a shared prefix in the cache
    assert warm.create_completion(PROMPT, max_tokens=16, temperature=0)["choices"][0]["text"] == want
    ids = llm.tokenize(PROMPT.encode(), add_bos=True)
    assert greedy(engine, ids, 16, chunk=3) == greedy(engine, ids, 16, chunk=len(ids))
