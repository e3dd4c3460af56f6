"""llama.cpp's quantization mixes: checked against a file llama-quantize made, and against llama.cpp's
documented rules (src/llama-quant.cpp) worked out by hand for a TinyLlama-shaped model."""
from __future__ import annotations

import pytest

from llmrun.errors import LlmrunError
from llmrun.gguf import GGUFReader
from llmrun.ggml import GGMLType as T
from llmrun.gguf.constants import LlamaFileType
from llmrun.quants.mixes import FILE_TYPE_NAMES, parse_file_type, plan_tensor_types

# TinyLlama-1.1B: 22 layers, 32 heads, 4 kv heads (gqa 8), hidden 2048, ffn 5632, vocab 32000, untied output.
N_LAYER, N_HEAD, N_HEAD_KV = 22, 32, 4
# llama.cpp's use_more_bits(i, 22): i < 22/8=2, i >= 7*22/8=19, or (i - 2) % 3 == 2 -- worked out by hand.
MORE_BITS_22 = {0, 1, 4, 7, 10, 13, 16, 19, 20, 21}


def _tinyllama_tensors(n_layer=N_LAYER, hidden=2048, ffn=5632, kv=256, vocab=32000, tied=False):
    tensors = [("token_embd.weight", (vocab, hidden))]
    for i in range(n_layer):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (hidden,)),
            (f"blk.{i}.attn_q.weight", (hidden, hidden)),
            (f"blk.{i}.attn_k.weight", (kv, hidden)),
            (f"blk.{i}.attn_v.weight", (kv, hidden)),
            (f"blk.{i}.attn_output.weight", (hidden, hidden)),
            (f"blk.{i}.ffn_norm.weight", (hidden,)),
            (f"blk.{i}.ffn_gate.weight", (ffn, hidden)),
            (f"blk.{i}.ffn_up.weight", (ffn, hidden)),
            (f"blk.{i}.ffn_down.weight", (hidden, ffn)),
        ]
    tensors.append(("output_norm.weight", (hidden,)))
    if not tied:
        tensors.append(("output.weight", (vocab, hidden)))
    return tensors


def _plan(ftype, tensors=None, n_layer=N_LAYER, n_head=N_HEAD, n_head_kv=N_HEAD_KV):
    return plan_tensor_types(tensors or _tinyllama_tensors(), ftype, n_layer=n_layer, n_head=n_head,
                             n_head_kv=n_head_kv)


def _by_layer(plan, kind):
    return [plan[f"blk.{i}.{kind}.weight"] for i in range(N_LAYER)]


def test_default_model_types_are_what_llama_quantize_chose(default_model):
    # The file's tensor types were chosen by llama.cpp's llama-quantize: our plan must reproduce them.
    with GGUFReader(default_model) as r:
        tensors = [(ti.name, ti.shape) for ti in r.tensors.values()]
        actual = {ti.name: T(ti.ggml_type) for ti in r.tensors.values()}
        plan = plan_tensor_types(tensors, LlamaFileType(r.get("general.file_type")),
                                 n_layer=r.get("llama.block_count"), n_head=r.get("llama.attention.head_count"),
                                 n_head_kv=r.get("llama.attention.head_count_kv"))
    assert plan == actual
    # the interesting one: tied embeddings are treated as the output (Q6_K), which 576 columns cannot
    # hold (576 % 256 != 0), so llama.cpp fell back to Q8_0
    assert actual["token_embd.weight"] == T.Q8_0


def test_q4_k_m_tinyllama():
    plan = _plan("q4_k_m")
    assert plan["output.weight"] == T.Q6_K
    assert plan["token_embd.weight"] == T.Q4_K  # untied embeddings keep the default type
    assert plan["output_norm.weight"] == T.F32
    assert all(plan[f"blk.{i}.{n}_norm.weight"] == T.F32 for i in range(N_LAYER) for n in ("attn", "ffn"))
    want = [T.Q6_K if i in MORE_BITS_22 else T.Q4_K for i in range(N_LAYER)]
    assert _by_layer(plan, "attn_v") == want
    assert _by_layer(plan, "ffn_down") == want
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(_by_layer(plan, kind)) == {T.Q4_K}


def test_q5_k_m_tinyllama():
    plan = _plan("q5_k_m")
    want = [T.Q6_K if i in MORE_BITS_22 else T.Q5_K for i in range(N_LAYER)]
    assert _by_layer(plan, "attn_v") == want and _by_layer(plan, "ffn_down") == want
    assert plan["output.weight"] == T.Q6_K and plan["blk.3.attn_q.weight"] == T.Q5_K


def test_q3_k_mixes_tinyllama():
    m = _plan("q3_k_m")
    assert _by_layer(m, "attn_v") == [T.Q5_K] * 2 + [T.Q4_K] * (N_LAYER - 2)
    assert _by_layer(m, "ffn_down") == [T.Q5_K] + [T.Q4_K] * (N_LAYER - 1)  # i < 22/16 = 1
    assert set(_by_layer(m, "attn_output")) == {T.Q4_K}
    assert set(_by_layer(m, "ffn_up")) == {T.Q3_K} and m["output.weight"] == T.Q6_K
    big = _plan("q3_k_l")
    for kind in ("attn_v", "ffn_down", "attn_output"):
        assert set(_by_layer(big, kind)) == {T.Q5_K}
    small = _plan("q3_k_s")
    assert set(small[n] for n in small if "norm" not in n and n != "output.weight") == {T.Q3_K}


def test_q2_k_and_q4_k_s_tinyllama():
    q2 = _plan("q2_k")
    assert set(_by_layer(q2, "attn_v")) == {T.Q4_K}  # gqa 8 >= 4
    assert set(_by_layer(q2, "ffn_down")) == {T.Q3_K} and set(_by_layer(q2, "attn_output")) == {T.Q3_K}
    assert q2["blk.0.attn_q.weight"] == T.Q2_K
    q2_mha = _plan("q2_k", n_head_kv=N_HEAD)  # no GQA: attn_v only gets Q3_K
    assert set(_by_layer(q2_mha, "attn_v")) == {T.Q3_K}
    q4s = _plan("q4_k_s")
    assert _by_layer(q4s, "attn_v") == [T.Q5_K] * 4 + [T.Q4_K] * (N_LAYER - 4)
    assert _by_layer(q4s, "ffn_down") == [T.Q5_K] * 2 + [T.Q4_K] * (N_LAYER - 2)


def test_iq4_nl_tinyllama():
    plan = _plan("iq4_nl")
    assert set(_by_layer(plan, "attn_v")) == {T.Q5_K}  # gqa >= 4
    assert _by_layer(plan, "ffn_down") == [T.Q5_K] * 2 + [T.IQ4_NL] * (N_LAYER - 2)
    assert plan["output.weight"] == T.Q6_K and plan["blk.0.attn_q.weight"] == T.IQ4_NL


@pytest.mark.parametrize("name,qtype", [("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("q5_0", T.Q5_0), ("q5_1", T.Q5_1)])
def test_legacy_mixes_only_bump_the_output(name, qtype):
    plan = _plan(name)
    assert plan["output.weight"] == T.Q6_K
    rest = {t for n, t in plan.items() if n != "output.weight" and "norm" not in n}
    assert rest == {qtype}


@pytest.mark.parametrize("name,qtype", [("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0)])
def test_uniform_types(name, qtype):
    plan = _plan(name)
    assert {t for n, t in plan.items() if "norm" not in n} == {qtype}
    assert {t for n, t in plan.items() if "norm" in n} == {T.F32}


def test_tied_embeddings_are_quantized_like_the_output():
    plan = _plan("q4_k_m", tensors=_tinyllama_tensors(tied=True))
    assert "output.weight" not in plan and plan["token_embd.weight"] == T.Q6_K


def test_fallbacks_for_rows_256_does_not_divide():
    # SmolLM-like widths: 576 = 18*32 but not a multiple of 256; 1536 = 6*256
    tensors = _tinyllama_tensors(n_layer=8, hidden=576, ffn=1536, kv=192, vocab=49152)
    tensors.append(("blk.0.odd.weight", (8, 48)))  # 48: not even a multiple of 32
    plan = plan_tensor_types(tensors, "q4_k_m", n_layer=8, n_head=9, n_head_kv=3)
    assert plan["blk.2.attn_q.weight"] == T.Q5_0           # Q4_K -> Q5_0
    assert plan["output.weight"] == T.Q8_0                 # Q6_K -> Q8_0
    assert plan["blk.0.attn_v.weight"] == T.Q8_0           # use_more_bits layer: Q6_K -> Q8_0
    assert plan["blk.0.ffn_down.weight"] == T.Q6_K         # 1536 columns hold a K type
    assert plan["blk.2.ffn_down.weight"] == T.Q4_K
    assert plan["blk.0.odd.weight"] == T.F16               # Q4_K -> Q5_0 does not fit either
    q5 = plan_tensor_types(tensors[:-1], "q5_k_s", n_layer=8, n_head=9, n_head_kv=3)
    assert q5["blk.2.attn_q.weight"] == T.Q5_1             # Q5_K -> Q5_1
    q2 = plan_tensor_types(tensors[:-1], "q2_k", n_layer=8, n_head=9, n_head_kv=3)
    assert q2["blk.2.attn_q.weight"] == T.Q4_0 and q2["blk.2.attn_v.weight"] == T.Q4_0  # Q2_K/Q3_K -> Q4_0


def test_legacy_type_without_a_fitting_block_is_an_error():
    with pytest.raises(LlmrunError, match="blk.0.odd.weight"):
        plan_tensor_types([("blk.0.odd.weight", (8, 48))], "q4_0", n_layer=1, n_head=1, n_head_kv=1)


def test_counters_follow_layer_order_not_list_order():
    # llama.cpp counts attn_v tensors in layer-number order (blk.2 before blk.10), whatever the file order
    tensors = sorted(_tinyllama_tensors(), key=lambda t: t[0], reverse=True)
    assert plan_tensor_types(tensors, "q3_k_m", n_layer=N_LAYER, n_head=N_HEAD, n_head_kv=N_HEAD_KV) == _plan("q3_k_m")
    assert list(plan_tensor_types(tensors, "q3_k_m", n_layer=N_LAYER, n_head=N_HEAD,
                                  n_head_kv=N_HEAD_KV)) == [n for n, _ in tensors]


def test_70b_attn_v_gets_q5_k():
    tensors = [(f"blk.{i}.attn_v.weight", (1024, 8192)) for i in range(80)]
    plan = plan_tensor_types(tensors, "q3_k_m", n_layer=80, n_head=64, n_head_kv=8)
    assert set(plan.values()) == {T.Q5_K}
    plan = plan_tensor_types(tensors, "q3_k_m", n_layer=80, n_head=64, n_head_kv=64)  # 65B: no bump
    assert [plan[n] for n, _ in tensors] == [T.Q5_K] * 2 + [T.Q4_K] * 78


def test_pure_skips_the_mix_rules_but_not_the_fallback():
    tensors = _tinyllama_tensors() + [("blk.0.narrow.weight", (4, 96))]
    plan = plan_tensor_types(tensors, "q4_k_m", n_layer=N_LAYER, n_head=N_HEAD, n_head_kv=N_HEAD_KV, pure=True)
    assert plan["output.weight"] == T.Q4_K and plan["blk.0.attn_v.weight"] == T.Q4_K
    assert plan["blk.0.narrow.weight"] == T.Q5_0


def test_parse_file_type_names_aliases_and_numbers():
    assert parse_file_type("Q4_K_M") == LlamaFileType.MOSTLY_Q4_K_M
    assert parse_file_type("q4_k") == LlamaFileType.MOSTLY_Q4_K_M
    assert parse_file_type("q5_k") == LlamaFileType.MOSTLY_Q5_K_M
    assert parse_file_type("q3_k") == LlamaFileType.MOSTLY_Q3_K_M
    assert parse_file_type("f32") == LlamaFileType.ALL_F32
    assert parse_file_type("iq4_nl") == LlamaFileType.MOSTLY_IQ4_NL
    assert parse_file_type("15") == LlamaFileType.MOSTLY_Q4_K_M
    for name in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m",
                 "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl"):
        assert name in FILE_TYPE_NAMES
    with pytest.raises(LlmrunError, match="q4_k_m") as err:
        parse_file_type("q4_x")
    assert "\n" not in str(err.value)
