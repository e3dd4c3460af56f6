"""LlamaModel vs float32 transformers on the same weights: tiny random models in every main type, the
default model, incremental decode, the KV cache contract and clean errors for unsupported files."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.tiny_gguf import (TinySpec, hf_model, mean_kl, reference_logits, reference_model_from_gguf,
                               write_gguf)
from llmrun.errors import ContextFullError, ModelError
from llmrun.gguf import GGUFReader
from llmrun.engine.model import LlamaModel


def _prompt(n, vocab, seed=1):
    return [int(t) for t in np.random.default_rng(seed).integers(0, vocab, n)]


def _engine_logits(path, ids, **kw):
    with GGUFReader(path) as r:
        m = LlamaModel.load(r, n_ctx=kw.pop("n_ctx", 512), **kw)
    return m, m.forward(ids, all_logits=True)


CASES = {
    # name: (spec, prompt length, KL bound)
    "f32_gqa_untied": (TinySpec(qtype="f32"), 40, 1e-6),
    "f16_mha_tied_linear_rope": (TinySpec(qtype="f16", heads=4, kv_heads=4, tied=True,
                                          rope={"rope_type": "linear", "factor": 2.0}), 40, 1e-4),
    "q8_0_gqa_long": (TinySpec(qtype="q8_0", heads=4, kv_heads=1), 200, 1e-4),
    "q4_0_gqa_tied": (TinySpec(qtype="q4_0", tied=True, seed=3), 40, 1e-4),
    "q4_k_head_dim": (TinySpec(qtype="q4_k", hidden=256, ff=512, heads=4, kv_heads=2, head_dim=128, seed=4), 40, 1e-4),
    "q6_k": (TinySpec(qtype="q6_k", hidden=256, ff=256, layers=1, seed=5), 24, 1e-4),
    # a q4_k_m-like mix: Q/K fused as Q4_K next to a Q6_K V, Q5_K down, Q6_K output
    "q4_k_m_mix": (TinySpec(qtype="q4_k", hidden=256, ff=512, seed=9,
                            mix={"attn_v.weight": "q6_k", "ffn_down.weight": "q5_k", "output.weight": "q6_k"}),
                   24, 1e-4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_model_matches_transformers(tmp_path, case):
    spec, n_tok, bound = CASES[case]
    model = hf_model(spec)
    path = write_gguf(tmp_path / f"{case}.gguf", model, spec)
    ids = _prompt(n_tok, spec.vocab)
    ref = reference_logits(reference_model_from_gguf(path), ids)
    if spec.qtype == "f32":
        # f32 file: the weights are the HF model's own, so compare with it directly too
        ref_orig = reference_logits(model, ids)
        assert np.abs(ref - ref_orig).max() < 1e-4
    m, ours = _engine_logits(path, ids)
    assert ours.shape == (n_tok, spec.vocab)
    assert mean_kl(ref, ours) <= bound
    assert (ref.argmax(-1) == ours.argmax(-1)).mean() >= 0.97
    # the last tokens again through the one-token (decode) kernels
    m.truncate(n_tok - 4)
    dec = np.stack([m.forward([t]) for t in ids[-4:]])
    assert mean_kl(ref[-4:], dec) <= bound


def test_llama3_rope_freqs_match_transformers(tmp_path):
    """rope_freqs.weight (Llama 3 scaling) against transformers' own llama3 rope on the original model."""
    spec = TinySpec(qtype="f32", rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    model = hf_model(spec)
    path = write_gguf(tmp_path / "llama3.gguf", model, spec)
    ids = _prompt(120, spec.vocab, seed=2)
    ref = reference_logits(model, ids)
    _, ours = _engine_logits(path, ids)
    assert mean_kl(ref, ours) <= 1e-6
    assert (ref.argmax(-1) == ours.argmax(-1)).all()
    # and the scaling matters at these positions: without it the engine must disagree
    spec_plain = TinySpec(qtype="f32")
    plain = write_gguf(tmp_path / "plain.gguf", model, spec_plain)
    _, unscaled = _engine_logits(plain, ids)
    assert mean_kl(ref, unscaled) > 1e-4


def test_yarn_rope_matches_transformers(tmp_path):
    """rope.scaling.type = yarn (ggml's ramp between correction dims + attention factor) vs transformers."""
    spec = TinySpec(qtype="f32", max_pos=256, rope={"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 64})
    model = hf_model(spec)
    path = write_gguf(tmp_path / "yarn.gguf", model, spec)
    ids = _prompt(150, spec.vocab, seed=6)
    ref = reference_logits(model, ids)
    m, ours = _engine_logits(path, ids)
    assert m.hparams.rope_scaling == "yarn"
    assert mean_kl(ref, ours) <= 1e-6
    assert (ref.argmax(-1) == ours.argmax(-1)).all()


def test_per_layer_hparam_arrays(tmp_path):
    """head_count / head_count_kv / feed_forward_length stored as per-layer arrays load like scalars."""
    spec = TinySpec(qtype="q8_0", seed=8)
    model = hf_model(spec)
    scalar = write_gguf(tmp_path / "scalar.gguf", model, spec)
    arrays = write_gguf(tmp_path / "arrays.gguf", model, spec, per_layer_arrays=True)
    ids = _prompt(20, spec.vocab, seed=7)
    m, a = _engine_logits(arrays, ids)
    assert m.hparams.n_head_per_layer == [spec.heads] * spec.layers
    _, b = _engine_logits(scalar, ids)
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def q8_tiny(tmp_path_factory):
    spec = TinySpec(qtype="q8_0", seed=7)
    return write_gguf(tmp_path_factory.mktemp("q8") / "tiny.gguf", hf_model(spec), spec), spec


def test_incremental_decode_equals_batched_prefill(q8_tiny):
    path, spec = q8_tiny
    ids = _prompt(30, spec.vocab, seed=3)
    m, full = _engine_logits(path, ids)
    m.reset()
    first = m.forward(ids[:10], all_logits=True)
    steps = [m.forward([t]) for t in ids[10:]]
    inc = np.concatenate([first, np.stack(steps)])
    assert m.n_past == len(ids)
    np.testing.assert_allclose(inc, full, rtol=0, atol=2e-4 * np.abs(full).max())
    # last-token logits by default
    m.truncate(20)
    last = m.forward(ids[20:])
    assert last.shape == (spec.vocab,)
    np.testing.assert_allclose(last, full[-1], rtol=0, atol=2e-4 * np.abs(full).max())


def test_context_full_leaves_cache_unchanged(q8_tiny):
    path, spec = q8_tiny
    with GGUFReader(path) as r:
        m = LlamaModel.load(r, n_ctx=16)
    ids = _prompt(12, spec.vocab, seed=4)
    before = m.forward(ids)
    with pytest.raises(ContextFullError):
        m.forward(ids[:5])
    assert m.n_past == 12
    m.truncate(11)
    np.testing.assert_allclose(m.forward(ids[11:]), before, atol=1e-4 * np.abs(before).max())
    with pytest.raises(ModelError):
        m.forward([spec.vocab])


def test_hparams(q8_tiny):
    path, spec = q8_tiny
    with GGUFReader(path) as r:
        m = LlamaModel.load(r, n_ctx=64)
    hp = m.hparams
    assert (hp.n_vocab, hp.n_embd, hp.n_layer, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ff) == \
        (spec.vocab, spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.hidden // spec.heads, spec.ff)
    assert hp.rms_eps == pytest.approx(spec.eps) and hp.rope_base == pytest.approx(spec.rope_theta)
    assert m.n_ctx == 64 and m.n_past == 0


def test_unsupported_files_raise_model_error(tmp_path):
    spec = TinySpec(qtype="f32", layers=1)
    model = hf_model(spec)
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", model, spec, arch="gpt2")
    with GGUFReader(gpt2) as r, pytest.raises(ModelError, match="gpt2"):
        LlamaModel.load(r)
    missing = write_gguf(tmp_path / "missing.gguf", model, spec, drop=("blk.0.ffn_up.weight",))
    with GGUFReader(missing) as r, pytest.raises(ModelError, match="blk.0.ffn_up.weight"):
        LlamaModel.load(r)
    shuffled = write_gguf(tmp_path / "shape.gguf", model, spec,
                          raw_override={"blk.0.ffn_up.weight": (np.zeros((spec.hidden, spec.ff), np.float32), None)})
    with GGUFReader(shuffled) as r, pytest.raises(ModelError, match="blk.0.ffn_up.weight.*shape"):
        LlamaModel.load(r)


def test_unsupported_tensor_type_raises_model_error(tmp_path):
    import gguf
    spec = TinySpec(qtype="f32", hidden=256, ff=256, layers=1)
    iq2 = gguf.GGMLQuantizationType.IQ2_XXS
    raw = np.zeros((spec.ff, 256 // 256 * gguf.GGML_QUANT_SIZES[iq2][1]), np.uint8)
    path = write_gguf(tmp_path / "iq2.gguf", hf_model(spec), spec, raw_override={"blk.0.ffn_up.weight": (raw, iq2)})
    with GGUFReader(path) as r, pytest.raises(ModelError, match="blk.0.ffn_up.weight.*iq2_xxs"):
        LlamaModel.load(r)


def test_default_model_matches_transformers(default_model):
    """SmolLM2-135M Q4_1 vs transformers fp32 on its dequantized weights, 64-token prompt."""
    ids = _prompt(64, 49152, seed=5)
    ref = reference_logits(reference_model_from_gguf(default_model), ids)
    m, ours = _engine_logits(default_model, ids, n_ctx=128)
    assert m.hparams.tied_embeddings and m.hparams.n_layer == 30
    kl = mean_kl(ref, ours)
    assert kl <= 1e-4, kl
    assert (ref.argmax(-1) == ours.argmax(-1)).mean() >= 0.95
    # token-by-token decode (int16-activation kernels) over the last 16 positions
    m.truncate(48)
    dec = np.stack([m.forward([t]) for t in ids[48:]])
    kl_dec = mean_kl(ref[48:], dec)
    assert kl_dec <= 1e-4, kl_dec
    assert (ref[48:].argmax(-1) == dec.argmax(-1)).mean() >= 0.9
