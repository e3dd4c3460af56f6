"""Hugging Face tokenizer folder -> GGUF ``tokenizer.*`` metadata, the way llama.cpp's converter
writes it for LLaMA models (convert_hf_to_gguf.py: LlamaModel.set_vocab, _set_vocab_sentencepiece,
_set_vocab_gpt2 / get_vocab_base, gguf-py's SpecialVocab).

* ``tokenizer.model`` present -> SentencePiece vocabulary, ``tokenizer.ggml.model = "llama"``.
* else a byte-level BPE ``tokenizer.json`` -> ``"gpt2"`` with merges and a pre-tokenizer name.

Pre-tokenizer detection (``tokenizer.ggml.pre``): llama.cpp hashes the tokenizer's output on a test
string and looks the hash up in a table of known published models. We cannot compute those hashes
without the models, so we read the tokenizer.json ``pre_tokenizer`` configuration instead and map
the known shapes to the name llama.cpp would choose (see ``vocab_bpe.detect_pre``); an unknown shape is an
error, as in llama.cpp.

This module assembles the KVs; the parts are vocab_spm.py (SentencePiece), vocab_bpe.py (byte-level BPE),
vocab_special.py (special tokens, add_* flags, chat template) and vocab_files.py (reading the folder's files).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from llmrun.errors import ConvertError
from llmrun.gguf import GGUFValueType as VT
from llmrun.gguf.metadata import parse_bool

from .vocab_bpe import bpe_merges, bpe_vocab
from .vocab_files import read_json
from .vocab_special import SPECIAL_KEYS, special_vocab
from .vocab_spm import sentencepiece_vocab

KV = tuple  # (key, value, GGUFValueType, element GGUFValueType | None)

# architectures whose SentencePiece vocabulary llama.cpp writes without the space prefix (Gemma's)
_NO_SPACE_PREFIX = ("gemma2", "gemma3")


def _chat_template_kvs(template) -> list[KV]:
    if template is None:
        return []
    if isinstance(template, str):
        return [("tokenizer.chat_template", template, VT.STRING, None)]
    out, names, default = [], [], None
    for choice in template:
        if not isinstance(choice, dict):
            continue
        name = "".join(c if c.isascii() and c.isalnum() else "_" for c in str(choice.get("name", "")))
        text = choice.get("template")
        if not name or not isinstance(text, str):
            continue
        if name == "default":
            default = text
        else:
            names.append(name)
            out.append((f"tokenizer.chat_template.{name}", text, VT.STRING, None))
    if names:
        out.append(("tokenizer.chat_templates", names, VT.ARRAY, VT.STRING))
    if default is not None:
        out.append(("tokenizer.chat_template", default, VT.STRING, None))
    return out


# --- entry point ------------------------------------------------------------------------------
def vocab_metadata(hf_dir: Path, n_vocab: int, flavor: str = "llama") -> list[KV]:
    """The ``tokenizer.*`` KVs for a HF model folder, in llama.cpp's order and value types.

    ``n_vocab`` is config.json's vocab_size: the vocabulary is padded to it with ``[PAD{i}]``
    tokens of type unused (5). ``flavor`` is the GGUF architecture, for what llama.cpp's converter of
    that family does differently (Gemma: no space prefix; Phi-3: its added-token types). Raises
    ConvertError (one line) when there is no usable tokenizer.
    """
    hf_dir = Path(hf_dir)
    n_vocab = int(n_vocab) if n_vocab else None
    kvs: list[KV] = []
    tokenizer_json = None
    if (hf_dir / "tokenizer.model").is_file():
        tokens, scores, types = sentencepiece_vocab(hf_dir, n_vocab, flavor)
        if (hf_dir / "tokenizer.json").is_file():
            tokenizer_json = read_json(hf_dir / "tokenizer.json")
        kvs += [("tokenizer.ggml.model", "llama", VT.STRING, None),
                ("tokenizer.ggml.pre", "default", VT.STRING, None),
                ("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
                ("tokenizer.ggml.scores", np.asarray(scores, dtype=np.float32), VT.ARRAY, VT.FLOAT32),
                ("tokenizer.ggml.token_type", np.asarray(types, dtype=np.int32), VT.ARRAY, VT.INT32)]
        merges: list[str] = []
    elif (hf_dir / "tokenizer.json").is_file():
        tokens, types, pre, tokenizer_json = bpe_vocab(hf_dir, n_vocab)
        merges = bpe_merges(hf_dir, tokenizer_json)
        if not merges:
            raise ConvertError(f"{hf_dir / 'tokenizer.json'}: a byte-level BPE tokenizer without merges")
        kvs += [("tokenizer.ggml.model", "gpt2", VT.STRING, None),
                ("tokenizer.ggml.pre", pre, VT.STRING, None),
                ("tokenizer.ggml.tokens", tokens, VT.ARRAY, VT.STRING),
                ("tokenizer.ggml.token_type", np.asarray(types, dtype=np.int32), VT.ARRAY, VT.INT32)]
    else:
        raise ConvertError(f"{hf_dir}: no tokenizer (need tokenizer.model or tokenizer.json)")
    if merges:
        kvs.append(("tokenizer.ggml.merges", merges, VT.ARRAY, VT.STRING))

    ids, add, template = special_vocab(hf_dir, len(tokens), tokenizer_json)
    for kind, tid in ids.items():
        if SPECIAL_KEYS.get(kind):
            kvs.append((SPECIAL_KEYS[kind], int(tid), VT.UINT32, None))
    for kind in ("bos", "eos", "sep"):
        if kind in add:
            kvs.append((f"tokenizer.ggml.add_{kind}_token", bool(add[kind]), VT.BOOL, None))
    kvs += _chat_template_kvs(template)

    # LlamaModel.set_vocab extras
    config = read_json(hf_dir / "tokenizer_config.json") or {}
    if flavor in _NO_SPACE_PREFIX and kvs[0][1] == "llama":
        kvs.append(("tokenizer.ggml.add_space_prefix", False, VT.BOOL, None))
    elif parse_bool(config.get("add_prefix_space")) is not None:
        kvs.append(("tokenizer.ggml.add_space_prefix", parse_bool(config["add_prefix_space"]), VT.BOOL, None))
    if n_vocab == 49152:  # llama.cpp: "granite small models" (and SmolLM) never get a BOS
        kvs = [kv for kv in kvs if kv[0] != "tokenizer.ggml.add_bos_token"]
        kvs.append(("tokenizer.ggml.add_bos_token", False, VT.BOOL, None))
    return kvs
