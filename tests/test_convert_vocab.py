"""convert/vocab.py: HF tokenizer folders -> GGUF tokenizer metadata, checked against independent
references: sentencepiece (pieces, scores, types), gguf-py's SpecialVocab + GGUFWriter (special
ids, add_* flags, chat templates, value types) and the default model's own metadata, which
llama.cpp's converter wrote for SmolLM2.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llmrun.convert.vocab import vocab_metadata
from llmrun.errors import ConvertError
from llmrun.gguf import GGUFReader, GGUFValueType as VT
from llmrun.text.tokenizer import TokenType

TEMPLATES = [{"name": "default", "template": "{{ messages[0]['content'] }}"},
             {"name": "tool_use", "template": "{{ tools }}"}]


def as_dict(kvs):
    keys = [k for k, *_ in kvs]
    assert len(keys) == len(set(keys)), "duplicate keys"
    return {k: (v, t, e) for k, v, t, e in kvs}


@pytest.fixture(scope="module")
def sp(llama2_tokenizer_model):
    import sentencepiece
    return sentencepiece.SentencePieceProcessor(model_file=str(llama2_tokenizer_model))


@pytest.fixture
def spm_dir(tmp_path, llama2_tokenizer_model):
    shutil.copy(llama2_tokenizer_model, tmp_path / "tokenizer.model")
    return tmp_path


def test_sentencepiece_vocab(spm_dir, sp):
    kv = as_dict(vocab_metadata(spm_dir, 32000))
    assert kv["tokenizer.ggml.model"] == ("llama", VT.STRING, None)
    assert kv["tokenizer.ggml.pre"] == ("default", VT.STRING, None)
    tokens, t1, e1 = kv["tokenizer.ggml.tokens"]
    scores, t2, e2 = kv["tokenizer.ggml.scores"]
    types, t3, e3 = kv["tokenizer.ggml.token_type"]
    assert (t1, e1, t2, e2, t3, e3) == (VT.ARRAY, VT.STRING, VT.ARRAY, VT.FLOAT32, VT.ARRAY, VT.INT32)
    n = sp.get_piece_size()
    assert tokens == [sp.id_to_piece(i) for i in range(n)]
    np.testing.assert_array_equal(scores, np.array([sp.get_score(i) for i in range(n)], dtype=np.float32))
    expected_types = [TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                      else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL for i in range(n)]
    assert list(types) == expected_types
    assert "tokenizer.ggml.merges" not in kv and "tokenizer.chat_template" not in kv


def test_sentencepiece_padding_and_added_tokens(spm_dir, sp):
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        "32000": {"content": "<|im_start|>", "special": False},   # looks special -> control
        "32001": {"content": "my\u2581word", "special": False},   # user-defined, pre-normalized
        "2": {"content": "</s>", "special": True}}}))
    kv = as_dict(vocab_metadata(spm_dir, 32005))
    tokens, scores, types = (kv[f"tokenizer.ggml.{k}"][0] for k in ("tokens", "scores", "token_type"))
    assert len(tokens) == len(scores) == len(types) == 32005
    assert tokens[32000:32002] == ["<|im_start|>", "my word"]
    assert list(types[32000:32002]) == [TokenType.CONTROL, TokenType.USER_DEFINED]
    assert list(scores[32000:32002]) == [-1000.0, -1000.0]
    assert tokens[32002:] == ["[PAD32002]", "[PAD32003]", "[PAD32004]"]
    assert set(types[32002:]) == {TokenType.UNUSED} and set(scores[32002:]) == {-10000.0}
    assert types[2] == TokenType.CONTROL and scores[2] == -1000.0


def test_special_vocab_matches_gguf_py(spm_dir, tmp_path_factory):
    """Special ids, add_* flags and named chat templates: compare with gguf-py's SpecialVocab
    written through gguf-py's GGUFWriter (keys, values and value types)."""
    import gguf

    (spm_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "chat_template": TEMPLATES}))
    (spm_dir / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                                     "vocab_size": 32000}))
    ref_path = tmp_path_factory.mktemp("ref") / "ref.gguf"
    w = gguf.GGUFWriter(str(ref_path), "llama")
    gguf.SpecialVocab(spm_dir, n_vocab=32000).add_to_gguf(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    ref = {k: f for k, f in gguf.GGUFReader(str(ref_path)).fields.items() if k.startswith("tokenizer.")}

    ours = {k: v for k, v in as_dict(vocab_metadata(spm_dir, 32000)).items()
            if k not in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                         "tokenizer.ggml.scores", "tokenizer.ggml.token_type")}
    assert set(ours) == set(ref)
    for key, (value, vtype, etype) in ours.items():
        f = ref[key]
        assert f.types[0] == vtype, key
        if vtype == VT.ARRAY:
            assert f.types[1] == etype and sorted(f.contents()) == sorted(value), key
        else:
            assert f.contents() == value, key


def test_chat_template_sources(spm_dir):
    (spm_dir / "chat_template.jinja").write_text("JINJA", encoding="utf-8")
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({}))
    assert as_dict(vocab_metadata(spm_dir, 32000))["tokenizer.chat_template"] == ("JINJA", VT.STRING, None)
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": "CONFIG"}))
    assert as_dict(vocab_metadata(spm_dir, 32000))["tokenizer.chat_template"][0] == "CONFIG"


@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory, default_model):
    """A SmolLM2 tokenizer folder rebuilt from the default model (HF's published configuration)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    with GGUFReader(default_model) as r:
        md = r.metadata
        tokens = list(md["tokenizer.ggml.tokens"])
        types = [int(t) for t in md["tokenizer.ggml.token_type"]]
        merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
        template = md["tokenizer.chat_template"]
    hf = HFTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == TokenType.CONTROL])
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    folder = tmp_path_factory.mktemp("smollm2")
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>", "chat_template": template}))
    (folder / "config.json").write_text(json.dumps({"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2}))
    return folder


def test_smollm_folder_reproduces_llama_cpp_metadata(smollm_dir, default_model):
    """The default model's tokenizer keys were written by llama.cpp's converter: ours must agree on
    every key, value and value type (pre-tokenizer name and the 49152-vocab add_bos rule included)."""
    ours = as_dict(vocab_metadata(smollm_dir, 49152))
    with GGUFReader(default_model) as r:
        ref = {k: (v, r.metadata_types[k]) for k, v in r.metadata.items() if k.startswith("tokenizer.")}
    assert set(ours) == set(ref)
    for key, (value, (vtype, etype)) in ref.items():
        v, t, e = ours[key]
        assert (t, e) == (vtype, etype), key
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(np.asarray(v), value, err_msg=key)
        else:
            assert v == value, key


@pytest.mark.parametrize("case", ["empty", "bad_model", "unknown_pre", "wordpiece"])
def test_errors_are_one_line(tmp_path, case):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    if case == "bad_model":
        (tmp_path / "tokenizer.model").write_bytes(b"this is not a protobuf")
    elif case == "unknown_pre":
        hf = HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
        hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(), pre_tokenizers.ByteLevel()])
        hf.save(str(tmp_path / "tokenizer.json"))
    elif case == "wordpiece":
        hf = HFTokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
        hf.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConvertError) as err:
        vocab_metadata(tmp_path, 100)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
