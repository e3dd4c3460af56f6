"""`convert_checkpoint` on tiny random LLaMA checkpoints, checked against independent references:
gguf-py's reader (keys, value types, names, shapes, bytes), transformers' weights with the Q/K permutation
written out in the test, transformers' float32 logits, sentencepiece / HF tokenizers ids."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from helpers.tiny_hf import (expected_gguf_tensors, hf_logits, make_tiny_llama, mean_kl, merged_reference)

import gguf  # dev dependency (make install-dev); a missing one must fail, not skip

warnings.filterwarnings("ignore", category=UserWarning)

IDS = [1, 5, 9, 33, 100, 7, 250, 3, 64, 17, 2, 120]


def _convert(src, out, **kw):
    from llmrun.convert import convert_checkpoint
    return convert_checkpoint(src, out, **kw)


def _py_reader(path):
    return gguf.GGUFReader(str(path))


def _kv(r, key):
    """(value, gguf-py value type name, array element type name or None) of one key via gguf-py."""
    f = r.fields[key]
    vt = gguf.GGUFValueType(f.types[0]).name
    et = gguf.GGUFValueType(f.types[1]).name if len(f.types) > 1 else None
    return f.contents(), vt, et


def _tensor_bytes(t) -> bytes:
    return np.ascontiguousarray(t.data).tobytes()


@pytest.fixture(scope="module")
def spm_base(tmp_path_factory, llama2_tokenizer_model):
    """untied, GQA (4 heads / 2 kv), float32 weights, SentencePiece tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "spm", tokenizer="spm",
                           spm_model=llama2_tokenizer_model)


@pytest.fixture(scope="module")
def bpe_base(tmp_path_factory):
    """tied embeddings, bfloat16 weights in two shards + index, byte-level BPE tokenizer, padded vocab."""
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "bpe", tokenizer="bpe", tied=True, dtype="bfloat16",
                           vocab_pad=3, max_shard_size="100KB", seed=1)


@pytest.fixture(scope="module")
def spm_f32(spm_base, tmp_path_factory):
    return _convert(spm_base, tmp_path_factory.mktemp("out") / "spm-f32.gguf", out_type="f32")


@pytest.fixture(scope="module")
def spm_ref(spm_base):
    return merged_reference(spm_base)


def test_metadata_keys_and_types(spm_f32, spm_base):
    r = _py_reader(spm_f32)
    want = {
        "general.architecture": ("llama", "STRING"), "general.type": ("model", "STRING"),
        "general.name": (spm_base.name, "STRING"),
        "general.file_type": (0, "UINT32"), "general.quantization_version": (2, "UINT32"),
        "llama.block_count": (2, "UINT32"), "llama.context_length": (128, "UINT32"),
        "llama.embedding_length": (64, "UINT32"), "llama.feed_forward_length": (96, "UINT32"),
        "llama.attention.head_count": (4, "UINT32"), "llama.attention.head_count_kv": (2, "UINT32"),
        "llama.rope.freq_base": (10000.0, "FLOAT32"),
        "llama.attention.layer_norm_rms_epsilon": (pytest.approx(1e-5), "FLOAT32"),
        "llama.rope.dimension_count": (16, "UINT32"), "llama.vocab_size": (32000, "UINT32"),
        "llama.attention.key_length": (16, "UINT32"), "llama.attention.value_length": (16, "UINT32"),
        "tokenizer.ggml.model": ("llama", "STRING"),
    }
    for key, (value, vt) in want.items():
        got, gvt, _ = _kv(r, key)
        assert (got, gvt) == (value, vt), key
    assert _kv(r, "tokenizer.ggml.tokens")[1:] == ("ARRAY", "STRING")
    assert _kv(r, "tokenizer.ggml.token_type")[1:] == ("ARRAY", "INT32")
    assert not any(k.startswith("llama.rope.scaling") for k in r.fields)


def test_f32_tensors_equal_permuted_hf_weights(spm_f32, spm_ref):
    r = _py_reader(spm_f32)
    expected = expected_gguf_tensors(spm_ref)
    assert sorted(t.name for t in r.tensors) == sorted(expected)
    for t in r.tensors:
        e = expected[t.name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
        assert list(t.shape) == list(e.shape[::-1]), t.name          # GGUF ne order
        np.testing.assert_array_equal(np.asarray(t.data).reshape(e.shape), e, err_msg=t.name)


def test_f16_bytes_as_llama_cpp_writes_them(spm_base, spm_ref, tmp_path):
    out = _convert(spm_base, tmp_path / "f16.gguf")       # default type
    r = _py_reader(out)
    assert _kv(r, "general.file_type")[0] == 1
    expected = expected_gguf_tensors(spm_ref)
    for t in r.tensors:
        e = expected[t.name]
        if e.ndim == 1:   # norms stay float32
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            assert _tensor_bytes(t) == e.astype("<f4").tobytes()
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16
            assert _tensor_bytes(t) == e.astype("<f2").tobytes(), t.name


def test_bf16_from_f32_weights_as_gguf_py_rounds(spm_base, spm_ref, tmp_path):
    from gguf.quants import quantize as py_quantize

    r = _py_reader(_convert(spm_base, tmp_path / "bf16.gguf", out_type="bf16"))
    expected = expected_gguf_tensors(spm_ref)
    for t in r.tensors:
        e = expected[t.name]
        if e.ndim == 2:
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16
            assert _tensor_bytes(t) == py_quantize(e, gguf.GGMLQuantizationType.BF16).tobytes(), t.name


def test_bf16_sharded_tied_bit_exact(bpe_base, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = _convert(bpe_base, tmp_path / "bf16.gguf", out_type="bf16")
    r = _py_reader(out)
    assert _kv(r, "general.file_type")[0] == 32
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names and "token_embd.weight" in names     # tied: llama.cpp reuses token_embd
    sd = {}
    for shard in sorted(bpe_base.glob("model-*.safetensors")):
        sd.update(load_file(shard))
    assert len(list(bpe_base.glob("model-*.safetensors"))) >= 2
    cfg = json.loads((bpe_base / "config.json").read_text())
    from helpers.tiny_hf import permute_qk_reference
    for t in r.tensors:
        if t.name == "blk.1.attn_k.weight":
            bits = sd["model.layers.1.self_attn.k_proj.weight"].view(torch.int16).numpy()
            want = permute_qk_reference(bits, cfg["num_key_value_heads"])
        elif t.name == "blk.0.attn_q.weight":
            bits = sd["model.layers.0.self_attn.q_proj.weight"].view(torch.int16).numpy()
            want = permute_qk_reference(bits, cfg["num_attention_heads"])
        elif t.name == "token_embd.weight":
            want = sd["model.embed_tokens.weight"].view(torch.int16).numpy()
        elif t.name == "blk.0.ffn_down.weight":
            want = sd["model.layers.0.mlp.down_proj.weight"].view(torch.int16).numpy()
        else:
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.BF16
        assert _tensor_bytes(t) == want.tobytes(), t.name      # bf16 in, bf16 out: the same bits


def _llmrun_logits(path, ids):
    from llmrun.gguf import GGUFReader
    from llmrun.engine.model import LlamaModel
    with GGUFReader(path) as r:
        m = LlamaModel.load(r, n_ctx=64, n_threads=1)
        return m.forward(ids, all_logits=True)


def _assert_logits_match(path, ref_model, ids=IDS):
    ours, ref = _llmrun_logits(path, ids), hf_logits(ref_model, ids)
    assert mean_kl(ref, ours) <= 1e-5
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_logits_match_transformers_spm(spm_f32, spm_ref):
    _assert_logits_match(spm_f32, spm_ref)


def test_logits_match_transformers_bpe_tied_bf16(bpe_base, tmp_path):
    out = _convert(bpe_base, tmp_path / "bpe.gguf", out_type="f32")
    _assert_logits_match(out, merged_reference(bpe_base), ids=[0, 5, 9, 33, 100, 7, 250, 3, 64])


TEXTS = ["Hello world", "  leading spaces and\ttabs\nnewlines", "café naïve 日本語 🙂", "def f(x):\n    return 42"]


def test_tokens_match_original_tokenizers(spm_f32, bpe_base, tmp_path, llama2_tokenizer_model):
    import sentencepiece as spm
    from tokenizers import Tokenizer as HFTokenizer

    from llmrun.gguf import GGUFReader
    from llmrun.text.tokenizer import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(llama2_tokenizer_model))
    with GGUFReader(spm_f32) as r:
        tok = Tokenizer.from_metadata(r.metadata)
    for text in TEXTS:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text

    out = _convert(bpe_base, tmp_path / "bpe-tok.gguf")
    hf = HFTokenizer.from_file(str(bpe_base / "tokenizer.json"))
    with GGUFReader(out) as r:
        tok = Tokenizer.from_metadata(r.metadata)
    assert tok.n_vocab == 403                                   # padded to config vocab_size
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:
        assert tok.encode(text, add_bos=False, special=True) == hf.encode(text, add_special_tokens=False).ids


def _edit_config(folder, **changes):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def llama3_base(tmp_path_factory, llama2_tokenizer_model):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 500000.0}
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "l3", tokenizer="spm",
                           spm_model=llama2_tokenizer_model, rope_parameters=rope, seed=2)


def test_llama3_rope_freqs_tensor_and_logits(llama3_base, tmp_path):
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    out = _convert(llama3_base, tmp_path / "l3.gguf", out_type="f32")
    r = _py_reader(out)
    t = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [8]
    assert r.tensors[0].name == "rope_freqs.weight"
    assert not any(k.startswith("llama.rope.scaling") for k in r.fields)
    assert _kv(r, "llama.rope.freq_base")[0] == 500000.0
    # HF's own llama3 inverse frequencies: ggml divides theta by rope_freqs, so rope_freqs = default / llama3
    cfg = AutoConfig.from_pretrained(llama3_base)
    inv_l3, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    inv_default = 1.0 / (500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    np.testing.assert_allclose(np.asarray(t.data), (inv_default / inv_l3).numpy(), rtol=2e-6)
    ids = (IDS * 4)[:40]   # past original_max_position_embeddings
    _assert_logits_match(out, merged_reference(llama3_base), ids=ids)


def test_old_style_rope_scaling_and_defaults(spm_base, tmp_path):
    """rope_theta + rope_scaling {type: ...} (pre-rope_parameters configs) and absent optional keys."""
    src = tmp_path / "old"
    shutil.copytree(spm_base, src)
    _edit_config(src, rope_parameters=None, rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 4.0},
                 head_dim=None)
    r = _py_reader(_convert(src, tmp_path / "lin.gguf"))
    assert _kv(r, "llama.rope.scaling.type")[:2] == ("linear", "STRING")
    assert _kv(r, "llama.rope.scaling.factor")[:2] == (4.0, "FLOAT32")
    assert _kv(r, "llama.rope.freq_base")[0] == 20000.0

    _edit_config(src, rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                                    "beta_fast": 16.0, "attention_factor": 1.1})
    r = _py_reader(_convert(src, tmp_path / "yarn.gguf"))
    assert _kv(r, "llama.rope.scaling.type")[0] == "yarn"
    assert _kv(r, "llama.rope.scaling.original_context_length")[:2] == (64, "UINT32")
    assert _kv(r, "llama.rope.scaling.yarn_beta_fast")[:2] == (16.0, "FLOAT32")
    assert _kv(r, "llama.rope.scaling.yarn_attn_factor")[0] == pytest.approx(1.1)

    _edit_config(src, rope_scaling={"type": "dynamic", "factor": 2.0})
    r = _py_reader(_convert(src, tmp_path / "dyn.gguf"))
    assert not any(k.startswith("llama.rope.scaling") for k in r.fields)


def test_head_dim_and_missing_kv_heads(tmp_path, llama2_tokenizer_model):
    """explicit head_dim != hidden/heads, and num_key_value_heads absent (= heads, no GQA)."""
    src = make_tiny_llama(tmp_path / "hd", tokenizer="spm", spm_model=llama2_tokenizer_model,
                          head_dim=32, num_key_value_heads=4, seed=3)
    _edit_config(src, num_key_value_heads=None)
    out = _convert(src, tmp_path / "hd.gguf", out_type="f32")
    r = _py_reader(out)
    assert _kv(r, "llama.attention.head_count_kv")[0] == 4
    assert _kv(r, "llama.attention.key_length")[0] == 32
    assert _kv(r, "llama.rope.dimension_count")[0] == 32
    q = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
    assert list(q.shape) == [64, 128]
    ref = merged_reference(src)
    expected = expected_gguf_tensors(ref)
    np.testing.assert_array_equal(np.asarray(q.data), expected["blk.0.attn_q.weight"])
    _assert_logits_match(out, ref)


def test_mistral_without_sliding_window(tmp_path, llama2_tokenizer_model):
    src = make_tiny_llama(tmp_path / "mis", tokenizer="spm", spm_model=llama2_tokenizer_model, arch="mistral",
                          seed=4)
    out = _convert(src, tmp_path / "mis.gguf", out_type="f32")
    _assert_logits_match(out, merged_reference(src))


def test_q8_0_is_ggml_quantizer_on_converted_tensors(spm_base, spm_ref, tmp_path):
    from gguf.quants import quantize as py_quantize

    calls = []
    out = _convert(spm_base, tmp_path / "q8.gguf", out_type="q8_0",
                   progress=lambda i, n, name: calls.append((i, n, name)))
    r = _py_reader(out)
    assert _kv(r, "general.file_type")[0] == 7
    assert [c[0] for c in calls] == list(range(1, len(r.tensors) + 1))
    expected = expected_gguf_tensors(spm_ref)
    for t in r.tensors:
        e = expected[t.name]
        if e.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.name
        want = py_quantize(e, gguf.GGMLQuantizationType.Q8_0)   # gguf-py's Q8_0 is bit-exact with ggml
        assert _tensor_bytes(t) == want.tobytes(), t.name


def test_q4_0_dequantizes_close_to_weights(spm_base, spm_ref, tmp_path):
    from gguf.quants import dequantize as py_dequantize

    r = _py_reader(_convert(spm_base, tmp_path / "q4.gguf", out_type="q4_0"))
    expected = expected_gguf_tensors(spm_ref)
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_0
    for t in r.tensors:
        e = expected[t.name]
        got = py_dequantize(np.asarray(t.data), t.tensor_type).reshape(e.shape)
        err = np.abs(got - e).max() / np.abs(e).max()
        assert err < 0.1, t.name
