"""Bench extra only (`make install-bench`): our GGUF LoRA files in llama.cpp itself, via llama-cpp-python.
llama.cpp loads the base GGUF from `llmrun convert` with the adapter from `llmrun convert-lora` and gives
PEFT's (unmerged) logits. Without llama-cpp-python installed this file is skipped; the core tests never are."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers.tiny_hf import hf_logits, make_lora, make_tiny_llama, mean_kl, scale_lora_layers

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (bench extra) is not installed")
warnings.filterwarnings("ignore", category=UserWarning)

IDS = [1, 5, 9, 33, 100, 7, 250, 3, 64, 17, 2, 120]


@pytest.fixture(scope="module")
def base(tmp_path_factory, llama2_tokenizer_model):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "base", tokenizer="spm",
                           spm_model=llama2_tokenizer_model, seed=40)


@pytest.fixture(scope="module")
def base_gguf(base, tmp_path_factory):
    from llmrun.convert import convert_checkpoint
    return convert_checkpoint(base, tmp_path_factory.mktemp("gguf") / "base.gguf", out_type="f32")


def _peft_logits(base, adapter, scale):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    scale_lora_layers(model, scale)
    return hf_logits(model.eval(), IDS)


def _llama_cpp_logits(model, lora, scale):
    llm = llama_cpp.Llama(str(model), lora_path=str(lora), lora_scale=scale, n_ctx=64, n_threads=1,
                          logits_all=True, verbose=False)
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)], dtype=np.float32)


@pytest.mark.parametrize("kind,scale", [("plain", 1.0), ("rs_patterns", 0.5)])
def test_llama_cpp_runs_our_lora_with_pefts_logits(base, base_gguf, tmp_path, kind, scale):
    from llmrun.convert.lora_gguf import export_lora
    if kind == "plain":
        adapter = make_lora(base, tmp_path / "a", r=4, alpha=8, seed=1)
    else:
        adapter = make_lora(base, tmp_path / "a", r=8, alpha=4, use_rslora=True,
                            targets=("q_proj", "k_proj", "v_proj", "down_proj", "lm_head"),
                            rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16}, seed=2)
    lora = export_lora(adapter, tmp_path / "a.gguf", base_dir=base)
    theirs = _peft_logits(base, adapter, scale)
    ours = _llama_cpp_logits(base_gguf, lora, scale)
    # llama.cpp keeps the KV cache in f16: close, not equal (measured ~4e-8)
    assert mean_kl(theirs, ours) <= 1e-6
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert mean_kl(theirs, _peft_logits(base, adapter, 0.0)) > 1e-3   # the adapter matters
