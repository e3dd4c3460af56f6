"""SentencePiece ("llama") tokenizer built from GGUF metadata vs the sentencepiece library.

The metadata is produced the way the converter does it (convert/vocab.py on a folder holding the
LLaMA 2 tokenizer.model fixture), written to a real GGUF file and read back, so the whole path
HF folder -> GGUF -> Tokenizer is exercised. The reference is sentencepiece itself.
"""
from __future__ import annotations

import random
import shutil

import pytest

from llmrun.convert.vocab import vocab_metadata
from llmrun.errors import TokenizerError
from llmrun.gguf import GGUFReader, GGUFWriter
from llmrun.text.tokenizer import Tokenizer, Utf8Stream, decode_stream

HARD_INPUTS = [
    "",
    " ",
    "  ",
    "Hello world",
    " Hello",
    "   three leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\n\n\r\n",
    " \t \n  \t\t\n",
    "日本語のテキストを分割する",
    "中文测试，你好！",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧",
    "àéîõü ñ ç ß Ωμέγα Привет",
    "12345 3.14159 1,000,000 0x1F",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A: pass",
    "\x00\x01\x7f control bytes",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ ǅ \U0010ffff",  # rare characters -> byte fallback
    "<s> </s> <unk> typed as text",
    "▁ already escaped ▁▁",
    "The quick brown fox jumps over the lazy dog. " * 5,
]


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory, llama2_tokenizer_model):
    folder = tmp_path_factory.mktemp("llama2")
    shutil.copy(llama2_tokenizer_model, folder / "tokenizer.model")
    path = folder / "vocab.gguf"
    w = GGUFWriter(path)
    w.add("general.architecture", "llama", 8)
    for key, value, vtype, etype in vocab_metadata(folder, 32000):
        w.add(key, value, vtype, etype)
    w.write()
    return path


@pytest.fixture(scope="module")
def tok(spm_gguf) -> Tokenizer:
    with GGUFReader(spm_gguf) as r:
        return Tokenizer.from_metadata(r.metadata)


@pytest.fixture(scope="module")
def sp(llama2_tokenizer_model):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(llama2_tokenizer_model))


@pytest.mark.parametrize("text", HARD_INPUTS)
def test_encode_matches_sentencepiece(tok, sp, text):
    assert tok.encode(text, add_bos=False) == sp.encode(text)
    assert tok.encode(text) == [sp.bos_id()] + sp.encode(text)  # the file's add_bos (true for SPM)


def test_random_strings_match_sentencepiece(tok, sp):
    rng = random.Random(1234)
    alphabet = list("abcXYZ  \t\n\r.,!?'\"0123456789_-") + [
        "é", "ü", "日", "本", "😀", "🏽", "\u200d", "▁", "<0x0A>", "Ω", "\u00a0", "\u3000", "ǅ", "</s>"]
    for _ in range(1500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        assert tok.encode(text, add_bos=False) == sp.encode(text), repr(text)


def test_bytes_input_and_invalid_utf8(tok, sp):
    assert tok.encode("héllo".encode(), add_bos=False) == sp.encode("héllo")
    # invalid UTF-8 goes through byte fallback, one <0xNN> token per byte
    ids = tok.encode(b"a\xff\xfeb", add_bos=False)
    assert sp.id_to_piece(ids[-3]) == "<0xFF>" and sp.id_to_piece(ids[-2]) == "<0xFE>"
    assert tok.decode(ids) == b"a\xff\xfeb"


def test_vocab_facts(tok, sp):
    assert tok.n_vocab == sp.get_piece_size() == 32000
    assert (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    assert tok.add_bos is True and tok.add_eos is False
    assert tok.eot_id is None
    assert tok.eog_ids == frozenset({sp.eos_id()})  # "</s>"


def test_special_tokens_parsed_only_when_asked(tok, sp):
    text = "Hi</s>there<s>"
    # llama.cpp: text after a special token gets the space prefix again
    assert tok.encode(text, add_bos=False, special=True) == (
        sp.encode("Hi") + [sp.eos_id()] + sp.encode("there") + [sp.bos_id()])
    assert tok.encode(text, add_bos=False, special=False) == sp.encode(text)
    # a prompt that already starts with BOS gets a second one, as llama.cpp does (it only warns)
    assert tok.encode("<s>Hi", special=True)[:2] == [sp.bos_id(), sp.bos_id()]


@pytest.mark.parametrize("text", [t for t in HARD_INPUTS if t])
def test_decode_round_trip(tok, sp, text):
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids).decode() == sp.decode(ids)
    assert tok.decode([tok.bos_id] + ids) == tok.decode(ids)  # BOS hidden, prefix space removed
    if "\u2581" not in text:  # a typed "▁" reads back as a space, in sentencepiece too
        assert tok.decode(ids) == text.encode()


def test_decode_special_and_pieces(tok, sp):
    ids = [sp.bos_id()] + sp.encode("Hi") + [sp.eos_id()]
    assert tok.decode(ids) == b"Hi"
    assert tok.decode(ids, special=True) == b"<s>Hi</s>"
    hello = sp.piece_to_id("▁Hello")
    assert tok.token_to_piece(hello) == b" Hello"
    assert tok.token_to_piece(sp.piece_to_id("<0x0A>")) == b"\n"
    assert tok.token_to_piece(sp.eos_id()) == b"" and tok.token_to_piece(sp.eos_id(), special=True) == b"</s>"
    with pytest.raises(TokenizerError):
        tok.token_to_piece(32000)


def test_streaming_decode_never_splits_characters(tok, sp):
    text = "𝔘𝔫𝔦 😀 日本 ǅ"
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > len(text)  # several characters are spelled with byte tokens
    chunks = list(decode_stream(tok, ids))
    assert "".join(chunks).lstrip(" ") == text
    assert all("\ufffd" not in c for c in chunks)
    # the incremental decoder holds back an unfinished sequence and releases it when complete
    s = Utf8Stream()
    emoji = "😀".encode()
    assert s.feed(emoji[:1]) == "" and s.feed(emoji[1:3]) == "" and s.feed(emoji[3:]) == "😀"
    assert s.feed(b"\xe6\x97") == "" and s.flush() == "\ufffd"


