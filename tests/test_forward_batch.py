"""LlamaModel.forward_batch (continuous batching): several sequences, each with its own KV cache, in one
forward pass. Checked against transformers (float32, the file's own weights) and, row for row, against
forward() of each sequence alone (bit-identical: an answer must not depend on what else runs)."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.tiny_gguf import TinySpec, hf_model, mean_kl, reference_logits, reference_model_from_gguf, write_gguf
from llmrun.errors import ContextFullError, ModelError
from llmrun.gguf import GGUFReader
from llmrun.engine.model import LlamaModel

SPECS = {
    "q4_0": TinySpec(qtype="q4_0", seed=3),
    "q8_0": TinySpec(qtype="q8_0", heads=4, kv_heads=1, seed=4),
    "f16": TinySpec(qtype="f16", seed=5),
    # Q/K fused as Q4_K next to a Q6_K V: a product in two parts
    "q4_k_mix": TinySpec(qtype="q4_k", hidden=256, ff=512, seed=9, mix={"attn_v.weight": "q6_k"}),
}

# Steps of a schedule: per sequence, how many of its next tokens to feed (0 = not in this step).
# Decode steps (1 token each) mixed with prompt chunks of other sequences, sequences joining late.
SCHEDULE = [(7, 1, 0), (1, 20, 3), (1, 1, 1), (0, 1, 18), (1, 1, 1), (2, 0, 1), (1, 1, 1)]


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("pooled", [True, False], ids=["pooled_caches", "separate_caches"])
def test_forward_batch_equals_each_sequence_alone(tmp_path, name, pooled):
    spec = SPECS[name]
    path = write_gguf(tmp_path / f"{name}.gguf", hf_model(spec), spec)
    rng = np.random.default_rng(2)
    seqs = [[int(t) for t in rng.integers(0, spec.vocab, sum(step[i] for step in SCHEDULE))] for i in range(3)]
    ref_model = reference_model_from_gguf(path)
    refs = [reference_logits(ref_model, s) for s in seqs]
    with GGUFReader(path) as r:
        m = LlamaModel.load(r, n_ctx=64)
    # pooled: slices of one array per layer (new_caches), whose decode attention is one launch
    caches = m.new_caches(3) if pooled else [m.new_cache() for _ in seqs]
    pos = [0, 0, 0]
    alone_cache = {i: m.new_cache() for i in range(3)}
    for step in SCHEDULE:
        active = [i for i in range(3) if step[i]]
        feeds = [seqs[i][pos[i]:pos[i] + step[i]] for i in active]
        got = m.forward_batch([caches[i] for i in active], feeds)
        assert got.shape == (len(active), spec.vocab) and got.dtype == np.float32
        for row, i, feed in zip(got, active, feeds):
            pos[i] += len(feed)
            assert caches[i].n_past == pos[i]
            assert mean_kl(refs[i][pos[i] - 1:pos[i]], row[None]) <= 1e-4
            m.cache = alone_cache[i]          # the same tokens through forward() on a cache of its own
            np.testing.assert_array_equal(row, m.forward(feed))


def test_forward_batch_errors_and_cache_contract(tmp_path):
    spec = TinySpec(qtype="q8_0")
    path = write_gguf(tmp_path / "m.gguf", hf_model(spec), spec)
    with GGUFReader(path) as r:
        m = LlamaModel.load(r, n_ctx=16)
    a, b = m.new_cache(), m.new_cache()
    with pytest.raises(ModelError):
        m.forward_batch([a, a], [[1], [2]])
    with pytest.raises(ModelError):
        m.forward_batch([a, b], [[1]])
    with pytest.raises(ModelError):
        m.forward_batch([a, b], [[1], [spec.vocab]])
    with pytest.raises(ContextFullError):
        m.forward_batch([a, b], [[1], [2] * 17])
    m.forward_batch([a, b], [[1, 2, 3], [4]])
    assert (a.n_past, b.n_past, m.n_past) == (3, 1, 0)   # the model's own cache is untouched
    a.truncate(1)
    with pytest.raises(ModelError):
        a.truncate(2)
    assert a.nbytes == m.cache.nbytes == m.kv_nbytes


def test_forward_batch_with_run_time_lora(tmp_path, llama2_tokenizer_model):
    """LoRA side paths (engine/adapters.py, on every product and token_embd) change nothing of the contract."""
    from helpers.tiny_hf import make_lora, make_tiny_llama
    from llmrun.convert import convert_checkpoint
    from llmrun.engine import adapters

    base = make_tiny_llama(tmp_path / "base", tokenizer="spm", spm_model=llama2_tokenizer_model, seed=50)
    path = convert_checkpoint(base, tmp_path / "base.gguf", out_type="q8_0")
    adapter = make_lora(base, tmp_path / "lora", r=4, alpha=8, seed=1,
                        targets=("q_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"))
    with GGUFReader(path) as r:
        m = LlamaModel.load(r, n_ctx=64)
    adapters.install(m, adapters.build_side_paths(m, [(adapters.load_adapter(str(adapter), m), 0.7)]))
    assert m.embd_lora is not None and all(g.lora is not None for g in (m.output, m.layers[0].qkv, m.layers[0].down))
    rng = np.random.default_rng(4)
    n_vocab = m.hparams.n_vocab
    seqs = [[int(t) for t in rng.integers(0, n_vocab, sum(step[i] for step in SCHEDULE))] for i in range(3)]
    caches, alone, pos = m.new_caches(3), [m.new_cache() for _ in range(3)], [0, 0, 0]
    for step in SCHEDULE:
        active = [i for i in range(3) if step[i]]
        feeds = [seqs[i][pos[i]:pos[i] + step[i]] for i in active]
        got = m.forward_batch([caches[i] for i in active], feeds)
        for row, i, feed in zip(got, active, feeds):
            pos[i] += len(feed)
            m.cache = alone[i]
            np.testing.assert_array_equal(row, m.forward(feed))


@pytest.mark.parametrize("cls", ["Gemma2ForCausalLM", "Qwen2ForCausalLM"])
def test_forward_batch_on_relatives(tmp_path, cls, monkeypatch):
    """Sliding-window rings that wrap (small rings), attention soft-capping, post-norms, GeGLU (Gemma 2); Q/K/V
    biases and NEOX rope (Qwen2): each row still equals its own sequence's forward(), and transformers."""
    from helpers.tiny_hf import hf_logits
    from helpers.tiny_relatives import hf_model as relative_model, make_tiny
    from llmrun.convert import convert_checkpoint
    from llmrun.engine import kv_cache

    monkeypatch.setattr(kv_cache, "RING_BATCH", 8)   # rings of window + 7 slots: the schedule wraps them
    extra = dict(head_dim=16, num_hidden_layers=2, sliding_window=8, query_pre_attn_scalar=16) \
        if cls.startswith("Gemma") else {}
    d = make_tiny(tmp_path / "hf", cls, tokenizer="gemma" if cls.startswith("Gemma") else "bpe-qwen2", seed=3, **extra)
    path = convert_checkpoint(d, tmp_path / "m.gguf", out_type="f32")
    with GGUFReader(path) as r:
        m = LlamaModel.load(r, n_ctx=64)
    schedule = [(7, 1, 0), (1, 8, 3), (1, 1, 1), (0, 1, 8), (1, 1, 1), (2, 0, 1), (1, 1, 1)] + [(1, 1, 1)] * 6
    rng = np.random.default_rng(5)
    seqs = [[int(t) for t in rng.integers(3, 250, sum(s[i] for s in schedule))] for i in range(3)]
    refs = [hf_logits(relative_model(d), s) for s in seqs]
    caches, alone, pos = m.new_caches(3), [m.new_cache() for _ in range(3)], [0, 0, 0]
    for step in schedule:
        active = [i for i in range(3) if step[i]]
        feeds = [seqs[i][pos[i]:pos[i] + step[i]] for i in active]
        got = m.forward_batch([caches[i] for i in active], feeds)
        for row, i, feed in zip(got, active, feeds):
            pos[i] += len(feed)
            assert mean_kl(refs[i][pos[i] - 1:pos[i]], row[None]) <= 1e-4
            m.cache = alone[i]
            np.testing.assert_array_equal(row, m.forward(feed))
    assert any(L.ring for L in caches[0].layers) == cls.startswith("Gemma")
