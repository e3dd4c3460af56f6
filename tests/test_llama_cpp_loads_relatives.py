"""llama.cpp (llama-cpp-python, the bench extra) loads every converted relative, f32 and q8_0, and where it
implements everything the checkpoint uses its logits match transformers'. Skipped without the bench extra."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers.tiny_hf import hf_logits, mean_kl
from helpers.tiny_relatives import hf_model, make_tiny
from llmrun.convert import convert_checkpoint
from test_relatives import CASES, N_TOKENS, _prompt

warnings.filterwarnings("ignore", category=UserWarning)
llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")

# llama.cpp runs these exactly as transformers does. The others use what its loader ignores: the window of
# a llama (Mistral) or phi3 file, and Gemma 3's attention.scale / sliding_window_pattern keys (llama.cpp
# assumes query_pre_attn_scalar = head_dim and every 6th layer global).
SAME_AS_TRANSFORMERS = {"qwen2_tied_biases", "qwen3_head_dim_qk_norm", "phi3_longrope_partial_rotary",
                        "gemma2_softcaps_windows"}


@pytest.mark.parametrize("name", list(CASES))
def test_llama_cpp_loads_our_file(name, tmp_path, llama2_tokenizer_model):
    hf_arch, tokenizer, config = CASES[name]
    d = make_tiny(tmp_path / "hf", hf_arch, tokenizer=tokenizer, spm_model=llama2_tokenizer_model,
                  seed=list(CASES).index(name), **config)
    model = hf_model(d)
    ids = _prompt(N_TOKENS, model.config.vocab_size)
    ref = hf_logits(model, ids)
    for out_type in ("f32", "q8_0"):
        path = convert_checkpoint(d, tmp_path / f"{out_type}.gguf", out_type=out_type)
        cpp = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False)
        assert cpp.n_vocab() == model.config.vocab_size
        cpp.eval(ids)
        theirs = np.array(cpp.scores[:N_TOKENS], dtype=np.float32)
        assert np.isfinite(theirs).all()
        if out_type == "f32" and name in SAME_AS_TRANSFORMERS:
            assert mean_kl(ref, theirs) <= 1e-5
