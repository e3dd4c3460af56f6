"""PEFT LoRA adapters merged by the converter vs PEFT's own merge_and_unload (transformers float32):
tensors equal the merged, permuted HF weights; llmrun's logits on the file match the merged model."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from helpers.tiny_hf import (expected_gguf_tensors, hf_logits, make_lora, make_tiny_llama, mean_kl,
                             merged_reference)

import gguf  # dev dependency (make install-dev); a missing one must fail, not skip
warnings.filterwarnings("ignore", category=UserWarning)

IDS = [1, 5, 9, 33, 100, 7, 250, 3, 64, 17, 2, 120]


@pytest.fixture(scope="module")
def base(tmp_path_factory, llama2_tokenizer_model):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "base", tokenizer="spm",
                           spm_model=llama2_tokenizer_model, seed=10)


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "tied", tokenizer="bpe", tied=True, seed=11)


@pytest.fixture(scope="module")
def plain(base, tmp_path_factory):
    return make_lora(base, tmp_path_factory.mktemp("lora") / "plain", seed=1)


@pytest.fixture(scope="module")
def rslora_patterns(base, tmp_path_factory):
    """rsLoRA, a subset of modules, per-module ranks (rank_pattern) and alphas (alpha_pattern)."""
    return make_lora(base, tmp_path_factory.mktemp("lora") / "rs", r=8, alpha=4, use_rslora=True,
                     targets=("q_proj", "v_proj", "down_proj"),
                     rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6}, alpha_pattern={"q_proj": 16},
                     seed=2)


def _check(base_dir, adapters, out, ids=IDS):
    """The file's tensors equal PEFT's merge (permuted); llmrun's logits match the merged transformers model."""
    from llmrun.convert import convert_checkpoint
    from llmrun.gguf import GGUFReader
    from llmrun.engine.model import LlamaModel

    convert_checkpoint(base_dir, out, out_type="f32", loras=adapters)
    ref = merged_reference(base_dir, adapters)
    unmerged = expected_gguf_tensors(merged_reference(base_dir))
    expected = expected_gguf_tensors(ref)
    r = gguf.GGUFReader(str(out))
    assert {t.name for t in r.tensors} - {"output.weight"} == set(expected) - {"output.weight"}
    changed = 0
    for t in r.tensors:
        e = expected.get(t.name, expected["token_embd.weight"] if t.name == "output.weight" else None)
        if t.name == "output.weight" and "output.weight" not in expected:
            e = ref.lm_head.weight.detach().numpy()   # untied by the adapter
        got = np.asarray(t.data).reshape(e.shape)
        np.testing.assert_allclose(got, e, rtol=0, atol=1e-6, err_msg=t.name)
        changed += t.name in unmerged and not np.array_equal(unmerged[t.name], e)
    assert changed > 0   # the adapters really changed weights (B != 0 after training)
    with GGUFReader(out) as gr:
        ours = LlamaModel.load(gr, n_ctx=64, n_threads=1).forward(ids, all_logits=True)
    theirs = hf_logits(ref, ids)
    assert mean_kl(theirs, ours) <= 1e-5
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    return r


def test_plain_lora_all_linear_layers(base, plain, tmp_path):
    _check(base, [(plain, 1.0)], tmp_path / "plain.gguf")


def test_rslora_with_rank_and_alpha_patterns(base, rslora_patterns, tmp_path):
    _check(base, [(rslora_patterns, 1.0)], tmp_path / "rs.gguf")


def test_two_adapters_with_scales_in_order(base, plain, rslora_patterns, tmp_path):
    _check(base, [(plain, 0.5), (rslora_patterns, 2.0)], tmp_path / "two.gguf")


def test_modules_to_save_replace_whole_weights(base, tmp_path):
    a = make_lora(base, tmp_path / "mts", targets=("k_proj", "up_proj"), modules_to_save=["lm_head", "embed_tokens"],
                  seed=3)
    _check(base, [(a, 1.0)], tmp_path / "mts.gguf")


def test_embedding_and_lm_head_lora_untied(base, tmp_path):
    a = make_lora(base, tmp_path / "emb", targets=("embed_tokens", "lm_head", "gate_proj"), seed=4)
    _check(base, [(a, 1.0)], tmp_path / "emb.gguf")


def test_tied_base_lora_on_shared_embedding(tied_base, tmp_path):
    a = make_lora(tied_base, tmp_path / "temb", targets=("q_proj", "embed_tokens", "lm_head"), seed=5)
    r = _check(tied_base, [(a, 1.0)], tmp_path / "temb.gguf", ids=[0, 5, 9, 33, 100, 7])
    assert "output.weight" not in {t.name for t in r.tensors}   # still tied


def test_tied_base_modules_to_save_lm_head_unties(tied_base, tmp_path):
    a = make_lora(tied_base, tmp_path / "tmts", targets=("q_proj", "o_proj"), modules_to_save=["lm_head"], seed=6)
    r = _check(tied_base, [(a, 1.0)], tmp_path / "tmts.gguf", ids=[0, 5, 9, 33, 100, 7])
    assert "output.weight" in {t.name for t in r.tensors}


def test_cli_lora_scale_and_quantized_merge(base, plain, tmp_path):
    """`llmrun convert --lora DIR:SCALE --type q8_0`: merge in float32, permute, then ggml's Q8_0."""
    from gguf.quants import quantize as py_quantize

    from llmrun.cli import main

    out = tmp_path / "cli.gguf"
    res = CliRunner().invoke(main, ["convert", str(base), "-o", str(out), "--type", "q8_0",
                                    "--lora", f"{plain}:0.75"])
    assert res.exit_code == 0, res.output
    expected = expected_gguf_tensors(merged_reference(base, [(plain, 0.75)]))
    r = gguf.GGUFReader(str(out))
    for t in r.tensors:
        if t.name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"):
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            want = py_quantize(expected[t.name], gguf.GGMLQuantizationType.Q8_0)
            got = np.ascontiguousarray(t.data)
            # float32 merge order may differ from torch's by an ulp; allow rare one-step code differences
            assert got.shape == want.shape
            assert np.mean(got != want) < 1e-3, t.name


def test_parse_lora_arg():
    from llmrun.convert.lora import parse_lora_arg
    assert parse_lora_arg("adapters/a") == ("adapters/a", 1.0)
    assert parse_lora_arg("adapters/a:0.5") == ("adapters/a", 0.5)
    assert parse_lora_arg("C:/x/y:2") == ("C:/x/y", 2.0)
    assert parse_lora_arg("dir:with:colons") == ("dir:with:colons", 1.0)
