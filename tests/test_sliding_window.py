"""Sliding-window attention: the window changes the result (and ours matches transformers'), ring buffers
that wrap many times over a long prompt, truncation into a region a ring has overwritten, and the Llama
API's prefix reuse re-evaluating when the engine says it could not keep the prefix."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from helpers.tiny_hf import hf_logits, mean_kl
from helpers.tiny_relatives import hf_model, make_tiny
from llmrun.convert import convert_checkpoint
from llmrun.engine import kv_cache
from llmrun.engine.model import LlamaModel
from llmrun.gguf import GGUFReader

warnings.filterwarnings("ignore", category=UserWarning)

WINDOW = 8
RING_BATCH = 8   # rings of WINDOW + 7 slots: a 100-token prompt wraps them ~7 times


def _prompt(n, vocab, seed):
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n)]


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """Gemma 2: sliding (even) and global (odd) layers, window 8."""
    d = make_tiny(tmp_path_factory.mktemp("hf") / "gemma2", "Gemma2ForCausalLM", tokenizer="gemma", seed=3,
                  head_dim=16, num_hidden_layers=4, sliding_window=WINDOW, query_pre_attn_scalar=16)
    return d, convert_checkpoint(d, tmp_path_factory.mktemp("gguf") / "gemma2.gguf", out_type="f32")


@pytest.fixture
def small_rings(monkeypatch):
    monkeypatch.setattr(kv_cache, "RING_BATCH", RING_BATCH)


def _load(path, n_ctx):
    with GGUFReader(path) as r:
        return LlamaModel.load(r, n_ctx=n_ctx)


def test_the_window_matters(tmp_path, llama2_tokenizer_model):
    """Mistral with window 8: the file's window reproduces transformers; the same weights without it do not."""
    d = make_tiny(tmp_path / "mistral", "MistralForCausalLM", tokenizer="spm", spm_model=llama2_tokenizer_model,
                  seed=5, sliding_window=WINDOW)
    ids = _prompt(40, 300, seed=6)
    ref = hf_logits(hf_model(d), ids)
    windowed = _load(convert_checkpoint(d, tmp_path / "w.gguf", out_type="f32"), 64).forward(ids, all_logits=True)
    assert mean_kl(ref, windowed) <= 1e-5
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    full = _load(convert_checkpoint(d, tmp_path / "full.gguf", out_type="f32"), 64).forward(ids, all_logits=True)
    assert mean_kl(ref, full) > 1e-3


def test_rings_wrap_over_a_long_prompt(gemma2, small_rings):
    d, path = gemma2
    ids = _prompt(100, 500, seed=7)
    ref = hf_logits(hf_model(d), ids)
    m = _load(path, 128)
    sliding = [L.cache for L in m.layers[::2]]
    assert all(c.ring and c.capacity == WINDOW + RING_BATCH - 1 for c in sliding)
    assert all(not L.cache.ring and L.cache.capacity == 128 for L in m.layers[1::2])
    assert m.kv_nbytes == sum(L.cache.k.nbytes + L.cache.v.nbytes for L in m.layers)
    ours = m.forward(ids, all_logits=True)        # in batches of RING_BATCH, BLAS and small-batch attention
    assert mean_kl(ref, ours) <= 1e-5
    assert (ref.argmax(-1) == ours.argmax(-1)).all()
    # decode after truncating a little: the rings still hold the window
    assert m.truncate(96) == 96
    dec = np.stack([m.forward([t]) for t in ids[96:]])
    np.testing.assert_allclose(dec, ours[96:], rtol=0, atol=2e-4 * np.abs(ours).max())
    # a prefix the rings have overwritten: the engine starts over and says so
    assert m.truncate(60) == 0
    assert m.n_past == 0
    again = m.forward(ids[:70], all_logits=True)
    assert mean_kl(ref[:70], again) <= 1e-5


def test_one_token_at_a_time_through_wrapping_rings(gemma2, small_rings):
    d, path = gemma2
    ids = _prompt(40, 500, seed=8)
    ref = hf_logits(hf_model(d), ids)
    m = _load(path, 64)
    dec = np.stack([m.forward([t]) for t in ids])
    assert mean_kl(ref, dec) <= 1e-5


def test_api_reevaluates_a_prefix_the_rings_lost(gemma2, small_rings):
    import llmrun

    d, path = gemma2
    a = _prompt(100, 500, seed=9)
    lost = a[:60] + _prompt(20, 500, seed=10)      # shares 60 tokens, long overwritten in the rings
    kept = a[:97] + _prompt(3, 500, seed=11)       # shares 97 tokens, the window still held
    llm = llmrun.Llama(str(path), n_ctx=128, seed=0)
    fresh = llmrun.Llama(str(path), n_ctx=128, seed=0)

    def greedy(model, prompt):
        return model.create_completion(prompt, max_tokens=4, temperature=0)["choices"][0]["text"]

    greedy(llm, a)
    assert greedy(llm, lost) == greedy(fresh, lost)
    assert llm.last_timings["n_prompt_reused"] == 0 and llm.last_timings["n_prompt_eval"] == len(lost)
    greedy(llm, a)
    assert greedy(llm, kept) == greedy(fresh, kept)
    assert llm.last_timings["n_prompt_reused"] == 97
