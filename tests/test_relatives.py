"""The LLaMA relatives end to end on tiny random checkpoints built here with transformers: `llmrun convert`
(names, keys and value types against gguf-py's own tables and writer), then the engine against transformers'
float32 logits on the same checkpoint (f32 file) or on the file's own dequantized weights (quantized file),
token-by-token decode against prefill, sliding-window ring buffers and prefix reuse, LoRA merges."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import gguf  # dev dependency: a missing one must fail, not skip
from helpers.tiny_hf import hf_logits, make_lora, mean_kl, merged_reference
from helpers.tiny_relatives import GGUF_ARCH, as_multimodal, hf_model, make_tiny, reference_from_gguf
from llmrun.convert import convert_checkpoint
from llmrun.engine.model import LlamaModel
from llmrun.errors import ModelError
from llmrun.gguf import GGUFReader

warnings.filterwarnings("ignore", category=UserWarning)

_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
             "short_factor": [1.0, 1.3, 1.7, 2.1], "long_factor": [1.5, 2.5, 4.0, 6.0],
             "original_max_position_embeddings": 32}
_GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
CASES = {
    # name: (HF class, tokenizer, config) -- windows (8) shorter than the 40-token prompts
    "qwen2_tied_biases": ("Qwen2ForCausalLM", "bpe-qwen2", dict(tie_word_embeddings=True)),
    "qwen3_head_dim_qk_norm": ("Qwen3ForCausalLM", "bpe-qwen2", dict(head_dim=32, tie_word_embeddings=False)),
    "mistral_window": ("MistralForCausalLM", "spm", dict(sliding_window=8)),
    "phi3_longrope_partial_rotary": ("Phi3ForCausalLM", "phi3", dict(max_position_embeddings=128,
                                     original_max_position_embeddings=32, rope_parameters=_LONGROPE)),
    "phi3_mha_window_tied": ("Phi3ForCausalLM", "phi3", dict(num_key_value_heads=4, sliding_window=8,
                                                             tie_word_embeddings=True)),
    "gemma2_softcaps_windows": ("Gemma2ForCausalLM", "gemma", dict(
        head_dim=32, num_hidden_layers=4, sliding_window=8, query_pre_attn_scalar=32,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3_local_global": ("Gemma3ForCausalLM", "gemma", dict(
        head_dim=32, num_hidden_layers=7, sliding_window=8, query_pre_attn_scalar=24, rope_parameters=_GEMMA3_ROPE)),
    "gemma3_layer_types_untied": ("Gemma3ForCausalLM", "gemma", dict(
        head_dim=16, num_hidden_layers=3, num_key_value_heads=1, sliding_window=8, tie_word_embeddings=False,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=4.0)),
}
N_TOKENS = 40


def _prompt(n, vocab, seed=1):
    return [int(t) for t in np.random.default_rng(seed).integers(3, vocab, n)]


def _load(path, n_ctx=512, **kw):
    with GGUFReader(path) as r:
        return LlamaModel.load(r, n_ctx=n_ctx, **kw)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, llama2_tokenizer_model):
    hf_arch, tokenizer, config = CASES[request.param]
    d = make_tiny(tmp_path_factory.mktemp("hf") / request.param, hf_arch, tokenizer=tokenizer,
                  spm_model=llama2_tokenizer_model, seed=list(CASES).index(request.param), **config)
    f32 = convert_checkpoint(d, tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", out_type="f32")
    model = hf_model(d)
    ids = _prompt(N_TOKENS, model.config.vocab_size)
    return dict(name=request.param, hf_arch=hf_arch, dir=d, f32=f32, model=model, ids=ids,
                ref=hf_logits(model, ids))


def test_f32_logits_match_transformers(case):
    ids, ref = case["ids"], case["ref"]
    # all float32, the cache too: the graph's own error (the f16 default adds up to 1.1e-5 on the tiny random
    # gemma3_local_global, ~1e-7 on the others; tests/test_kv_cache_types.py has the cache types' bounds)
    m = _load(case["f32"], type_k="f32", type_v="f32")
    ours = m.forward(ids, all_logits=True)
    kl = mean_kl(ref, ours)
    assert kl <= 1e-5, kl
    assert (ref.argmax(-1) == ours.argmax(-1)).all()
    # the last tokens again, one at a time (decode kernels, ring slots)
    m.truncate(N_TOKENS - 8)
    dec = np.stack([m.forward([t]) for t in ids[-8:]])
    np.testing.assert_allclose(dec, ours[-8:], rtol=0, atol=2e-4 * np.abs(ours).max())
    assert mean_kl(ref[-8:], dec) <= 1e-5


def test_q8_0_matches_transformers_on_its_weights(case, tmp_path):
    q8 = convert_checkpoint(case["dir"], tmp_path / "q8.gguf", out_type="q8_0")
    ref = hf_logits(reference_from_gguf(case["dir"], q8), case["ids"])
    ours = _load(q8).forward(case["ids"], all_logits=True)
    assert mean_kl(ref, ours) <= 1e-4
    assert (ref.argmax(-1) == ours.argmax(-1)).mean() >= 0.97


# keys llama.cpp reads, with the type gguf-py's own writer gives them
_WRITER_CALLS = {
    "block_count": ("add_block_count", 1), "context_length": ("add_context_length", 1),
    "embedding_length": ("add_embedding_length", 1), "feed_forward_length": ("add_feed_forward_length", 1),
    "attention.head_count": ("add_head_count", 1), "attention.head_count_kv": ("add_head_count_kv", 1),
    "rope.freq_base": ("add_rope_freq_base", 1.0), "attention.layer_norm_rms_epsilon": ("add_layer_norm_rms_eps", 1.0),
    "attention.key_length": ("add_key_length", 1), "attention.value_length": ("add_value_length", 1),
    "vocab_size": ("add_vocab_size", 1), "rope.dimension_count": ("add_rope_dimension_count", 1),
    "attention.sliding_window": ("add_sliding_window", 1),
    "attention.sliding_window_pattern": ("add_sliding_window_pattern", [True, False]),
    "attn_logit_softcapping": ("add_attn_logit_softcapping", 1.0),
    "final_logit_softcapping": ("add_final_logit_softcapping", 1.0),
    "attention.scale": ("add_attention_scale", 1.0), "rope.freq_base_swa": ("add_rope_freq_base_swa", 1.0),
    "rope.scaling.type": ("add_rope_scaling_type", gguf.RopeScalingType.LINEAR),
    "rope.scaling.factor": ("add_rope_scaling_factor", 1.0),
    "rope.scaling.original_context_length": ("add_rope_scaling_orig_ctx_len", 1),
    "rope.scaling.attn_factor": ("add_rope_scaling_attn_factors", 1.0),
}


def _gguf_py_types(arch: str) -> dict[str, tuple]:
    w = gguf.GGUFWriter(None, arch)
    for method, value in _WRITER_CALLS.values():
        getattr(w, method)(value)
    # arrays: gguf-py picks the element type from the values when it writes them
    return {k: (v.type, v.sub_type or (gguf.GGUFValueType.get_type(v.value[0]) if v.type == gguf.GGUFValueType.ARRAY
                                      else None)) for k, v in w.kv_data[0].items()}


def test_file_as_llama_cpp_names_it(case):
    r = gguf.GGUFReader(str(case["f32"]))
    arch = GGUF_ARCH[case["hf_arch"]]
    assert r.fields["general.architecture"].contents() == arch
    cfg = case["model"].config
    # tensor names: gguf-py's map of the HF model's own parameters (lm_head only when untied)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    want = {names.get_name(n, try_suffixes=(".weight", ".bias"))
            for n in case["model"].state_dict() if not (n == "lm_head.weight" and cfg.tie_word_embeddings)}
    rope = cfg.rope_parameters if isinstance(getattr(cfg, "rope_parameters", None), dict) else {}
    if rope.get("rope_type") == "longrope":
        want |= {"rope_factors_short.weight", "rope_factors_long.weight"}
        np.testing.assert_array_equal(r.get_tensor(
            [t.name for t in r.tensors].index("rope_factors_long.weight")).data, np.float32(rope["long_factor"]))
    assert {t.name for t in r.tensors} == want
    known = {gguf.TENSOR_NAMES[k].format(bid=i) for k in gguf.constants.MODEL_TENSORS[gguf.MODEL_ARCH[arch.upper()]]
             for i in range(cfg.num_hidden_layers)}
    assert {t.name.rsplit(".", 1)[0] for t in r.tensors} <= known
    # every key under the architecture is one llama.cpp knows, typed as gguf-py writes it
    types = _gguf_py_types(arch)
    for key, field in r.fields.items():
        if key.startswith(arch + "."):
            assert key in types, key
            sub = gguf.GGUFValueType(field.types[1]) if len(field.types) > 1 else None
            assert (gguf.GGUFValueType(field.types[0]), sub) == types[key], key

    def kv(key, default=None):
        f = r.fields.get(f"{arch}.{key}")
        return default if f is None else f.contents()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert kv("attention.key_length") == head_dim
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers
    if window and "sliding_attention" in layer_types:
        assert kv("attention.sliding_window") == window
    if arch == "phi3":
        assert kv("rope.dimension_count") == int(head_dim * rope.get("partial_rotary_factor", 1.0))
        assert kv("rope.scaling.original_context_length") == cfg.original_max_position_embeddings
    if arch.startswith("gemma"):
        assert r.fields["tokenizer.ggml.add_space_prefix"].contents() is False
        assert kv("final_logit_softcapping", 0.0) == pytest.approx(cfg.final_logit_softcapping or 0.0)
        assert kv("attn_logit_softcapping", 0.0) == pytest.approx(cfg.attn_logit_softcapping or 0.0)
        scale = kv("attention.scale", cfg.head_dim ** -0.5)
        assert scale == pytest.approx(cfg.query_pre_attn_scalar ** -0.5)


def test_gemma3_conditional_generation_converts_its_text_model(tmp_path):
    """Gemma3ForConditionalGeneration: the text config and model.language_model.* tensors give the same file
    as the text-only class; vision tensors are left out."""
    text = make_tiny(tmp_path / "text", "Gemma3ForCausalLM", tokenizer="gemma", seed=12, head_dim=16,
                     num_hidden_layers=2, sliding_window=8, query_pre_attn_scalar=16)
    multi = as_multimodal(text, tmp_path / "multi")
    a = gguf.GGUFReader(str(convert_checkpoint(text, tmp_path / "text.gguf", out_type="f32")))
    b = gguf.GGUFReader(str(convert_checkpoint(multi, tmp_path / "multi.gguf", out_type="f32")))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        np.testing.assert_array_equal(ta.data, tb.data, err_msg=ta.name)
    fields = lambda r: {k: f.contents() for k, f in r.fields.items() if k != "general.name" and
                        not k.startswith("GGUF.")}
    assert fields(a) == fields(b)


# LoRA on each family's own module names: fused (Phi-3's qkv_proj, gate_up_proj), biased (Qwen2's q/k/v),
# and Gemma's norm-shifted neighbours; the reference is PEFT's own merge_and_unload
LORA_CASES = {
    "phi3_fused": ("Phi3ForCausalLM", "phi3", dict(), ("qkv_proj", "gate_up_proj", "o_proj", "down_proj")),
    "qwen2_biased": ("Qwen2ForCausalLM", "bpe-qwen2", dict(), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gemma3_all": ("Gemma3ForCausalLM", "gemma", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
                   ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
}


@pytest.mark.parametrize("name", list(LORA_CASES))
def test_lora_merges_into_each_family(name, tmp_path, llama2_tokenizer_model):
    hf_arch, tokenizer, config, targets = LORA_CASES[name]
    base = make_tiny(tmp_path / "base", hf_arch, tokenizer=tokenizer, spm_model=llama2_tokenizer_model, seed=13,
                     **config)
    adapter = make_lora(base, tmp_path / "lora", targets=targets, steps=2)
    out = convert_checkpoint(base, tmp_path / "merged.gguf", out_type="f32", loras=[(adapter, 0.7)])
    ref_model = merged_reference(base, [(adapter, 0.7)])
    ids = _prompt(24, ref_model.config.vocab_size, seed=14)
    ref, ours = hf_logits(ref_model, ids), _load(out).forward(ids, all_logits=True)
    assert mean_kl(ref, ours) <= 1e-5
    assert mean_kl(hf_logits(hf_model(base), ids), ours) > 1e-6   # the adapter changed the model


def test_k_quant_mix_on_gemma3(tmp_path):
    """q4_k_m on a Gemma 3 wide enough for K-quant rows (Q4_K/Q6_K mix, the tied embedding as output)."""
    d = make_tiny(tmp_path / "g3", "Gemma3ForCausalLM", tokenizer="gemma", seed=15, hidden_size=256,
                  intermediate_size=512, head_dim=64, num_hidden_layers=2, sliding_window=8,
                  query_pre_attn_scalar=64)
    q = convert_checkpoint(d, tmp_path / "q4km.gguf", out_type="q4_k_m")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["token_embd.weight"] == "Q6_K"
    ids = _prompt(40, 500, seed=16)
    ref = hf_logits(reference_from_gguf(d, q), ids)
    m = _load(q)
    ours = m.forward(ids, all_logits=True)
    assert mean_kl(ref, ours) <= 1e-4
    assert (ref.argmax(-1) == ours.argmax(-1)).mean() >= 0.97
    m.truncate(32)
    dec = np.stack([m.forward([t]) for t in ids[32:]])
    assert mean_kl(ref[32:], dec) <= 1e-4


def _rewrite(src, dst, drop=(), override=None):
    """A copy of a GGUF file through gguf-py, without the `drop` tensors and with keys set to override's
    (value, type) pairs."""
    override = dict(override or {})
    r = gguf.GGUFReader(str(src))
    arch = override.pop("general.architecture", (r.fields["general.architecture"].contents(),))[0]
    w = gguf.GGUFWriter(str(dst), arch)
    for key, f in r.fields.items():
        if key.startswith(("GGUF.", "general.architecture")) or key in override:
            continue
        sub = gguf.GGUFValueType(f.types[1]) if len(f.types) > 1 else None
        w.add_key_value(key, f.contents(), gguf.GGUFValueType(f.types[0]), sub_type=sub)
    for key, (value, vtype) in override.items():
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.asarray(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_relative_files_with_a_missing_piece_are_one_line_errors(tmp_path):
    d = make_tiny(tmp_path / "q2", "Qwen2ForCausalLM", tokenizer="bpe-qwen2", seed=17)
    path = convert_checkpoint(d, tmp_path / "q2.gguf", out_type="f32")
    nobias = _rewrite(path, tmp_path / "nobias.gguf", drop=("blk.1.attn_k.bias",))
    with GGUFReader(nobias) as r, pytest.raises(ModelError, match="blk.1.attn_k.bias"):
        LlamaModel.load(r)
    bad_key = _rewrite(path, tmp_path / "badkey.gguf",
                       override={"qwen2.attention.sliding_window": ("eight", gguf.GGUFValueType.STRING)})
    with GGUFReader(bad_key) as r, pytest.raises(ModelError, match="qwen2.attention.sliding_window must be an integer"):
        LlamaModel.load(r)
    other = _rewrite(path, tmp_path / "other.gguf",
                     override={"general.architecture": ("mamba", gguf.GGUFValueType.STRING)})
    with GGUFReader(other) as r, pytest.raises(ModelError, match="'mamba'.*'qwen2', 'qwen3', 'phi3', 'gemma2', 'gemma3'"):
        LlamaModel.load(r)
