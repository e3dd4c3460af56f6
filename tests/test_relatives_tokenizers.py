"""The relatives' vocabularies, converted by convert/vocab.py and read back from GGUF metadata, against
Hugging Face `tokenizers` (and sentencepiece): Gemma's SentencePiece without the space prefix and with
byte fallback, the Qwen2 BPE pre-tokenizer, Phi-3's added chat tokens (control, rstrip)."""
from __future__ import annotations

import pytest

from helpers.tiny_hf import write_bpe_tokenizer
from helpers.tiny_relatives import write_gemma_tokenizer, write_phi3_tokenizer
from llmrun.convert.vocab import vocab_metadata
from llmrun.gguf import GGUFReader, GGUFWriter
from llmrun.text.tokenizer import Tokenizer, TokenType
from test_tokenizer_bpe import HARD_INPUTS, random_texts


def _gguf_tokenizer(folder, n_vocab, arch) -> Tokenizer:
    path = folder / "vocab.gguf"
    w = GGUFWriter(path)
    w.add("general.architecture", arch, 8)
    for key, value, vtype, etype in vocab_metadata(folder, n_vocab, flavor=arch):
        w.add(key, value, vtype, etype)
    w.write()
    with GGUFReader(path) as r:
        return Tokenizer.from_metadata(r.metadata)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer
    import sentencepiece

    d = tmp_path_factory.mktemp("gemma")
    n = write_gemma_tokenizer(d)
    return (_gguf_tokenizer(d, n, "gemma3"), HFTokenizer.from_file(str(d / "tokenizer.json")),
            sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model")))


GEMMA_TEXTS = HARD_INPUTS + ["<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
                             "  two leading spaces", "trailing  ", "1234567", "tab\tafter"]


def test_gemma_matches_tokenizers_and_sentencepiece(gemma):
    tok, hf, sp = gemma
    assert tok.add_space_prefix is False
    for text in GEMMA_TEXTS + random_texts(5, 400):
        ids = tok.encode(text, add_bos=False, special=True)
        assert ids == hf.encode(text, add_special_tokens=False).ids, repr(text)
        assert ids == sp.encode(text), repr(text)


def test_gemma_byte_fallback_and_round_trip(gemma):
    tok, hf, sp = gemma
    text = "日本語 😀 Ωμέγα"          # characters the tiny vocabulary only spells with byte tokens
    ids = tok.encode(text, add_bos=False)
    assert any(tok.token_types[i] == TokenType.BYTE for i in ids)
    assert tok.decode(ids) == text.encode() == hf.decode(ids).encode()
    assert tok.decode(tok.encode(" leading", add_bos=False)) == b" leading"   # no prefix space to remove
    assert tok.encode("Hi")[0] == sp.bos_id()


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    from tokenizers import Tokenizer as HFTokenizer

    d = tmp_path_factory.mktemp("qwen2")
    n = write_bpe_tokenizer(d, pre="qwen2")
    return _gguf_tokenizer(d, n, "qwen2"), HFTokenizer.from_file(str(d / "tokenizer.json"))


def test_qwen2_bpe_matches_tokenizers(qwen2):
    tok, hf = qwen2
    assert tok.pre == "qwen2" and tok.add_bos is False
    for text in HARD_INPUTS + random_texts(6, 400) + ["<|im_start|>user\n12345 digits<|im_end|>\n"]:
        assert tok.encode(text, add_bos=False, special=True) == hf.encode(text, add_special_tokens=False).ids, \
            repr(text)


@pytest.fixture(scope="module")
def phi3(tmp_path_factory, llama2_tokenizer_model):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("phi3")
    n = write_phi3_tokenizer(d, llama2_tokenizer_model)
    # legacy: text after a special token is encoded with its own dummy prefix, as llama.cpp's SentencePiece does
    return _gguf_tokenizer(d, n, "phi3"), AutoTokenizer.from_pretrained(d, legacy=True, from_slow=True)


def test_phi3_added_tokens(phi3):
    tok, hf = phi3
    chat = {"<|user|>": 32003, "<|end|>": 32002, "<|assistant|>": 32001, "<|endoftext|>": 32000}
    for text, tid in chat.items():
        assert tok.tokens[tid] == text and tok.token_types[tid] == TokenType.CONTROL
    assert tok.eot_id == 32002 and {32000, 32002} <= tok.eog_ids
    texts = ["<|user|>\nHi there<|end|>\n<|assistant|>\n Answer<|end|>",
             "<|system|>You are helpful.<|end|><|user|>Hi",
             "a<|end|>  b",                       # <|end|> swallows the spaces after it (rstrip)
             "x <|end|>y", "Hello world. This is a test"]
    for text in texts:
        assert tok.encode(text, add_bos=False, special=True) == hf.encode(text, add_special_tokens=False), text
    # not parsed unless asked: the marker is plain text then
    assert 32003 not in tok.encode("<|user|>", add_bos=False)
