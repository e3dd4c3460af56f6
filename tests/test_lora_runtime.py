"""Run-time LoRA (`Llama(..., lora_path=)`, `set_lora`, `--lora`) vs PEFT's unmerged model and vs the merged
conversion; llama.cpp's own GGUF LoRA layout (built here with gguf-py) loads; bad adapters change nothing."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.tiny_hf import (hf_logits, make_lora, make_tiny_llama, mean_kl, merged_reference,
                             permute_qk_reference, scale_lora_layers)

import gguf  # dev dependency; a missing one must fail, not skip
import torch
from safetensors.numpy import load_file

import llmrun
from llmrun.errors import LlmrunError

warnings.filterwarnings("ignore", category=UserWarning)

IDS = [1, 5, 9, 33, 100, 7, 250, 3, 64, 17, 2, 120]


@pytest.fixture(scope="module")
def base(tmp_path_factory, llama2_tokenizer_model):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "base", tokenizer="spm",
                           spm_model=llama2_tokenizer_model, seed=50)


@pytest.fixture(scope="module")
def base_gguf(base, tmp_path_factory):
    from llmrun.convert import convert_checkpoint
    return convert_checkpoint(base, tmp_path_factory.mktemp("gguf") / "base.gguf", out_type="f32")


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {
        "plain": make_lora(base, root / "plain", r=4, alpha=8, seed=1),
        "rs_patterns": make_lora(base, root / "rs", r=8, alpha=4, use_rslora=True,
                                 targets=("q_proj", "k_proj", "v_proj", "down_proj"),
                                 rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
                                 alpha_pattern={"q_proj": 16}, seed=2),
        "embedding": make_lora(base, root / "emb", r=4, alpha=4, targets=("embed_tokens", "lm_head", "o_proj"),
                               seed=3),
    }


@pytest.fixture(scope="module")
def llm(base_gguf):
    return llmrun.Llama(base_gguf, n_ctx=64, n_threads=1)


def _peft_unmerged(base, adapter, scale=1.0):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    scale_lora_layers(model, scale)
    return hf_logits(model.eval(), IDS)


def _gguf_lora(adapter, base, out):
    from llmrun.convert.lora_gguf import export_lora
    return export_lora(adapter, out, base_dir=base)


@pytest.mark.parametrize("kind", ["plain", "rs_patterns", "embedding"])
def test_matches_peft_unmerged(base, base_gguf, adapters, llm, tmp_path, kind):
    theirs = _peft_unmerged(base, adapters[kind], 0.7)
    for source in (adapters[kind], _gguf_lora(adapters[kind], base, tmp_path / "a.gguf")):
        llm.set_lora([(source, 0.7)])
        ours = llm.eval_logits(IDS)
        assert mean_kl(theirs, ours) <= 1e-4
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert mean_kl(theirs, _peft_unmerged(base, adapters[kind], 0.0)) > 1e-3   # the adapter matters
    llm.set_lora([])


def test_lora_path_keyword_equals_merged_conversion(base, base_gguf, adapters, tmp_path):
    from llmrun.convert import convert_checkpoint
    merged = convert_checkpoint(base, tmp_path / "merged.gguf", out_type="f32",
                                loras=[(adapters["rs_patterns"], 1.5)])
    want = llmrun.Llama(merged, n_ctx=64).eval_logits(IDS)
    got = llmrun.Llama(base_gguf, n_ctx=64, lora_path=adapters["rs_patterns"], lora_scale=1.5).eval_logits(IDS)
    assert mean_kl(want, got) <= 1e-6
    assert (want.argmax(-1) == got.argmax(-1)).all()


def test_two_adapters_with_scales_then_back_to_base(base, base_gguf, adapters, llm, tmp_path):
    from llmrun.convert import convert_checkpoint
    pair = [(adapters["plain"], 0.5), (adapters["embedding"], 2.0)]
    theirs = hf_logits(merged_reference(base, pair), IDS)
    merged = llmrun.Llama(convert_checkpoint(base, tmp_path / "m.gguf", out_type="f32", loras=pair),
                          n_ctx=64).eval_logits(IDS)
    llm.set_lora([])
    before = llm.eval_logits(IDS)
    llm.set_lora([(adapters["plain"], 0.5), (_gguf_lora(adapters["embedding"], base, tmp_path / "e.gguf"), 2.0)])
    ours = llm.eval_logits(IDS)
    assert mean_kl(theirs, ours) <= 1e-4 and (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert mean_kl(merged, ours) <= 1e-6
    llm.set_lora([])
    assert llm.lora == []
    assert np.array_equal(llm.eval_logits(IDS), before)   # exactly the base again
    llm.set_lora([(adapters["plain"], 0.0)])                # scale 0: exactly the base too
    assert np.array_equal(llm.eval_logits(IDS), before)
    llm.set_lora([])


def test_adapters_are_cached_and_the_kv_cache_is_emptied(adapters, llm, monkeypatch, tmp_path):
    from llmrun.engine import adapters as rt
    calls = []
    real = rt.load_adapter
    monkeypatch.setattr(rt, "load_adapter", lambda path, model: calls.append(path) or real(path, model))
    fresh = shutil.copytree(adapters["rs_patterns"], tmp_path / "fresh")
    llm.set_lora([(fresh, 1.0)])
    llm.create_completion(IDS[:6], max_tokens=2, temperature=0)
    assert llm.n_cached > 0
    llm.set_lora([(fresh, 0.3)])
    assert llm.n_cached == 0                       # cached keys/values belong to the old weights
    llm.set_lora([(fresh, 1.0)])
    assert len(calls) == 1                         # loaded once
    llm.set_lora([])


def test_llama_cpp_gguf_lora_layout(base, base_gguf, adapters, llm, tmp_path):
    """A file laid out as llama.cpp's convert_lora_to_gguf.py writes it, built with gguf-py from the PEFT
    tensors: f16 tensors, Q/K rows of B permuted, alpha verbatim, plus a norm tensor (ignored, as by llama.cpp)."""
    cfg = json.loads((base / "config.json").read_text())
    peft = load_file(str(adapters["plain"] / "adapter_model.safetensors"))
    path = tmp_path / "llama_cpp_style.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    table = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i in range(cfg["num_hidden_layers"]):
        for hf, g in table.items():
            a = peft[f"base_model.model.model.layers.{i}.{hf}.lora_A.weight"]
            b = peft[f"base_model.model.model.layers.{i}.{hf}.lora_B.weight"]
            if g in ("attn_q", "attn_k"):
                b = permute_qk_reference(b, cfg["num_attention_heads" if g == "attn_q" else "num_key_value_heads"])
            w.add_tensor(f"blk.{i}.{g}.weight.lora_a", a.astype(np.float16))
            w.add_tensor(f"blk.{i}.{g}.weight.lora_b", b.astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(cfg["hidden_size"], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    theirs = _peft_unmerged(base, adapters["plain"])
    llm.set_lora([(path, 1.0)])
    ours = llm.eval_logits(IDS)
    llm.set_lora([])
    assert mean_kl(theirs, ours) <= 1e-4     # f16 factors
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def _write_lora(path, tensors: dict, *, arch="llama", general_type="adapter", alpha=8.0):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(general_type)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_adapters_change_nothing(base, adapters, llm, tmp_path):
    llm.set_lora([(adapters["plain"], 1.0)])
    before = llm.eval_logits(IDS)
    E, F = 64, 96
    r = np.random.default_rng(0)
    ok = {"blk.0.attn_v.weight.lora_a": r.standard_normal((4, E), np.float32),
          "blk.0.attn_v.weight.lora_b": r.standard_normal((32, 4), np.float32)}
    cases = {
        "rank": ({**ok, "blk.0.attn_v.weight.lora_b": r.standard_normal((32, 3), np.float32)}, {}, "rank"),
        "shape": ({**ok, "blk.0.attn_v.weight.lora_a": r.standard_normal((4, F), np.float32)}, {}, "another base"),
        "layer": ({"blk.9.attn_v.weight.lora_a": ok["blk.0.attn_v.weight.lora_a"],
                   "blk.9.attn_v.weight.lora_b": ok["blk.0.attn_v.weight.lora_b"]}, {}, "does not exist"),
        "half": ({"blk.0.attn_v.weight.lora_a": ok["blk.0.attn_v.weight.lora_a"]}, {}, "missing one"),
        "suffix": ({**ok, "blk.0.attn_v.weight.lora_c": ok["blk.0.attn_v.weight.lora_a"]}, {}, "suffix"),
        "arch": (ok, {"arch": "qwen2"}, "architecture"),
        "type": (ok, {"general_type": "model"}, "not a LoRA adapter"),
    }
    for name, (tensors, kw, expect) in cases.items():
        bad = _write_lora(tmp_path / f"{name}.gguf", tensors, **kw)
        with pytest.raises(LlmrunError, match=expect) as e:
            llm.set_lora([(adapters["rs_patterns"], 1.0), (bad, 1.0)])
        assert "\n" not in str(e.value)
    other = make_tiny_llama(tmp_path / "other", tokenizer="bpe", seed=51, hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=1)
    mts = make_lora(base, tmp_path / "mts", targets=("q_proj",), modules_to_save=["lm_head"], seed=4)
    for bad, expect in ((make_lora(other, tmp_path / "o", seed=5), "(another|different) base"), (mts, "modules_to_save"),
                        (tmp_path / "missing", "not found")):
        with pytest.raises(LlmrunError, match=expect):
            llm.set_lora([(bad, 1.0)])
    for bad_arg in ("adapter", [("a",)], [(adapters["plain"], "x")], [(adapters["plain"], float("nan"))]):
        with pytest.raises(LlmrunError):
            llm.set_lora(bad_arg)
    assert llm.lora == [(str(adapters["plain"]), 1.0)]
    assert np.array_equal(llm.eval_logits(IDS), before)   # the previous adapter is still exactly in place
    llm.set_lora([])


def test_cli_lora_on_run(base, base_gguf, adapters, tmp_path):
    from llmrun.cli import main
    args = ["run", str(base_gguf), "-p", "Hello", "-n", "6", "--temp", "0", "--ctx", "64"]
    res = CliRunner().invoke(main, args + ["--lora", f"{adapters['plain']}:0.5", "--lora", str(adapters["embedding"])])
    assert res.exit_code == 0, res.output
    llm = llmrun.Llama(base_gguf, n_ctx=64)
    llm.set_lora([(adapters["plain"], 0.5), (adapters["embedding"], 1.0)])
    want = llm.create_completion("Hello", max_tokens=6, temperature=0)["choices"][0]["text"]
    assert res.output.rstrip("\n") == want
    bad = CliRunner().invoke(main, args + ["--lora", str(tmp_path / "nope")])
    assert bad.exit_code != 0 and bad.output.strip().startswith("error:") and len(bad.output.strip().splitlines()) == 1


def test_default_model_hf_form(default_model, tmp_path):
    """SmolLM2-135M (Q4_1) with a rank-8 adapter on every linear layer, vs PEFT on transformers holding the
    file's dequantized weights (its HF form)."""
    from helpers.tiny_gguf import reference_logits, reference_model_from_gguf
    from peft import LoraConfig, get_peft_model
    model = reference_model_from_gguf(default_model)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                              "gate_proj", "up_proj", "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    pm.save_pretrained(tmp_path / "adapter")
    ids = [int(t) for t in np.random.default_rng(5).integers(0, 49152, 48)]
    theirs = reference_logits(pm.eval(), ids)
    llm = llmrun.Llama(default_model, n_ctx=64, lora_path=tmp_path / "adapter")
    ours = llm.eval_logits(ids)
    assert mean_kl(theirs, ours) <= 1e-4
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.95
    with pm.disable_adapter():
        assert mean_kl(theirs, reference_logits(pm.eval(), ids)) > 1e-3   # the adapter matters
