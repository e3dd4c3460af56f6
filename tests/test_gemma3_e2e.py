"""A real relative end to end: Gemma 3 270M Q4_K_M as published (`make gemma3`), against transformers loading
the same GGUF file in float32 (its own dequantization and its own tokenizer conversion): tokens, greedy
completions, mean KL over prompts shorter and longer than the 512-token window. With llama-cpp-python
installed (the bench extra) also against llama.cpp on the same file: its tokens, and its KL to the same
float32 reference, which ours must beat."""
from __future__ import annotations

import numpy as np
import pytest

from helpers.tiny_hf import mean_kl

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
        "movable metal type, oil-based ink and a wooden screw press. Within a few decades presses spread across "
        "Europe, and the price of books fell sharply. Scholars argue about how quickly literacy rose, but the "
        "number of printed titles grew from a few hundred to tens of thousands by 1500. Printers also "
        "standardized spelling, page numbers and title pages, small inventions that we now take for granted. ")
PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "Water boils at"]


@pytest.fixture(scope="module")
def llm(gemma3_model):
    import llmrun
    return llmrun.Llama(str(gemma3_model), n_ctx=1024, seed=0)


@pytest.fixture(scope="module")
def hf(gemma3_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = dict(gguf_file=gemma3_model.name)
    model = AutoModelForCausalLM.from_pretrained(gemma3_model.parent, dtype=torch.float32,
                                                 attn_implementation="eager", **kw).eval()
    return model, AutoTokenizer.from_pretrained(gemma3_model.parent, **kw)


@pytest.fixture(scope="module")
def long_ids(llm):
    ids = llm.tokenize((TEXT * 8).encode())
    assert len(ids) > 600   # longer than the window: the sliding layers only see their last 512 positions
    return ids[:640]


@pytest.fixture(scope="module")
def reference(hf, long_ids):
    import torch
    with torch.no_grad():
        return hf[0](torch.tensor([long_ids])).logits[0].float().numpy()


def _llama_cpp(path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the bench extra) is not installed")
    return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)


def test_architecture(llm):
    hp = llm._model.hparams
    assert hp.arch.name == "gemma3" and hp.sliding_window == 512
    assert hp.swa_layers == [(i + 1) % 6 != 0 for i in range(18)]
    assert [len(llm._model.ropes), hp.rope_base, hp.rope_base_swa] == [2, 1e6, 10000.0]


def test_tokens_equal_transformers(llm, hf):
    tok = hf[1]
    for text in PROMPTS + [TEXT, "  spaces\tand\nnewlines  ", "Ünïcödé 日本語 😀", "<start_of_turn>user\nhi"]:
        assert llm.tokenize(text.encode(), special=True) == tok(text).input_ids, repr(text)


def test_greedy_completions_equal_transformers(llm, hf):
    import torch
    model, tok = hf
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        want = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0][len(ids):]
        got = llm.create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
        assert got == tok.decode(want, skip_special_tokens=True), prompt


def test_kl_to_float32_reference(llm, long_ids, reference):
    ours = llm.eval_logits(long_ids)
    for a, b in ((0, 200), (512, 640)):    # inside the window, and beyond it
        assert mean_kl(reference[a:b], ours[a:b]) <= 1e-6, (a, b)
    assert (reference.argmax(-1) == ours.argmax(-1)).mean() >= 0.99
    # token by token (decode kernels, the ring of each sliding layer) over the last positions
    model = llm._model
    model.truncate(len(long_ids) - 16)
    dec = np.stack([model.forward([t]) for t in long_ids[-16:]])
    assert mean_kl(reference[-16:], dec) <= 1e-6


def test_tokens_equal_llama_cpp(llm, gemma3_model):
    cpp = _llama_cpp(gemma3_model, vocab_only=True)
    for text in PROMPTS + [TEXT, "  spaces\tand\nnewlines  ", "Ünïcödé 日本語 😀"]:
        assert llm.tokenize(text.encode()) == cpp.tokenize(text.encode(), add_bos=True), repr(text)


def test_kl_lower_than_llama_cpp(llm, gemma3_model, long_ids, reference):
    ids = long_ids[:200]
    cpp = _llama_cpp(gemma3_model, n_ctx=512, n_batch=512, logits_all=True)
    cpp.eval(ids)
    theirs = np.array(cpp.scores[:len(ids)], dtype=np.float32)
    ours = llm.eval_logits(ids)
    assert mean_kl(reference[:200], ours) < mean_kl(reference[:200], theirs)
