"""A byte-level BPE ``tokenizer.json`` -> the GGUF "gpt2" vocabulary: tokens and types, merges, and the
pre-tokenizer's llama.cpp name (_set_vocab_gpt2 / get_vocab_base; vocab.py's docstring says why
``detect_pre`` names a pre-tokenizer by its configuration)."""
from __future__ import annotations

from pathlib import Path

from llmrun.errors import ConvertError, is_library_failure, one_line
from llmrun.gguf.metadata import is_integer, parse_bool
from llmrun.text.tokenizer import TokenType

from .vocab_files import (added_tokens_decoder, does_token_look_special, json_object, json_objects, read_json,
                          read_text)

# pre-tokenizer regexes as published in tokenizer.json files (JSON-decoded)
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _tokenizers_call(path: Path, what: str, fn, *args, **kwargs):
    """A call into HF tokenizers, whose errors (and Rust panics, BaseExceptions) become one ConvertError."""
    try:
        return fn(*args, **kwargs)
    except BaseException as e:
        if not is_library_failure(e):
            raise
        raise ConvertError(f"{path}: {what} ({one_line(e)})") from None


def detect_pre(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a tokenizer.json pre_tokenizer configuration.

    Rules (instead of llama.cpp's output hash): a Split on the Llama 3 regex -> "llama-bpe"; on the
    Qwen2 regex -> "qwen2"; Digits(individual) + ByteLevel(regex) -> "smollm" (SmolLM/StarCoder,
    one pre-tokenizer); a lone ByteLevel(regex) -> "gpt-2".
    """
    pre = json_object(tokenizer_json.get("pre_tokenizer"))
    steps = json_objects(pre.get("pretokenizers")) if pre.get("type") == "Sequence" else [pre]
    kinds = []
    for s in steps:
        t = s.get("type")
        if t == "Split":
            pattern = json_object(s.get("pattern"))
            kinds.append(("Split", pattern.get("Regex", pattern.get("String"))))
        elif t == "ByteLevel":
            kinds.append(("ByteLevel", bool(s.get("use_regex", True))))
        elif t == "Digits":
            kinds.append(("Digits", bool(s.get("individual_digits", False))))
        else:
            kinds.append((t, None))
    if kinds == [("Split", _LLAMA3_REGEX), ("ByteLevel", False)]:
        return "llama-bpe"
    if kinds == [("Split", _QWEN2_REGEX), ("ByteLevel", False)]:
        return "qwen2"
    if kinds == [("Digits", True), ("ByteLevel", True)]:
        return "smollm"
    if kinds == [("ByteLevel", True)]:
        return "gpt-2"
    raise ConvertError(f"{where}: pre-tokenizer {str(kinds)[:200]} is not one we know how to name for llama.cpp "
                       f"(known: llama-bpe, qwen2, smollm, gpt-2)")


def bpe_vocab(hf_dir: Path, n_vocab: int | None):
    from tokenizers import Tokenizer as HFTokenizer

    path = hf_dir / "tokenizer.json"
    data = read_json(path)
    if data is None:
        raise ConvertError(f"{path}: not a JSON object")
    model = json_object(data.get("model"))
    is_byte_level = any(step.get("type") == "ByteLevel" for step in _walk_pre(data.get("pre_tokenizer")))
    if model.get("type") != "BPE" or not is_byte_level:
        raise ConvertError(f"{path}: only byte-level BPE tokenizer.json files are supported "
                           f"(model {str(model.get('type'))[:40]!r}); SentencePiece models need tokenizer.model")
    hf = _tokenizers_call(path, "cannot load", HFTokenizer.from_file, str(path))
    vocab = _tokenizers_call(path, "cannot read the vocabulary", hf.get_vocab, with_added_tokens=True)
    vocab_size = n_vocab or len(vocab)
    if vocab and max(vocab.values()) >= vocab_size:
        raise ConvertError(f"{path}: token id {max(vocab.values())} does not fit vocab_size {vocab_size}")
    pre = detect_pre(data, path)

    added = {a["id"]: a for a in json_objects(data.get("added_tokens")) if is_integer(a.get("id"))}
    config = read_json(hf_dir / "tokenizer_config.json") or {}
    for key, a in added_tokens_decoder(hf_dir, config).items():
        if int(key) not in added and isinstance(a.get("content"), str) and a["content"] in vocab:
            added[int(key)] = {"id": int(key), **a}
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
            continue
        info = added.get(i)
        if info is not None and info.get("content") == text:
            if parse_bool(info.get("normalized", True)) is False:
                # llama.cpp stores added tokens in their encoded-then-decoded form
                ids = _tokenizers_call(path, "cannot encode an added token", hf.encode, text,
                                       add_special_tokens=False).ids
                text = _tokenizers_call(path, "cannot decode an added token", hf.decode, ids,
                                        skip_special_tokens=False)
            if parse_bool(info.get("special")) or does_token_look_special(text):
                types.append(int(TokenType.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(TokenType.USER_DEFINED))
        else:
            types.append(int(TokenType.NORMAL))
        tokens.append(text)
    return tokens, types, pre, data


def _walk_pre(pre: dict | None):
    if not isinstance(pre, dict) or not pre:
        return []
    if pre.get("type") == "Sequence":
        return json_objects(pre.get("pretokenizers"))
    return [pre]


def bpe_merges(hf_dir: Path, tokenizer_json: dict | None) -> list[str]:
    merges = json_object(json_object(tokenizer_json).get("model")).get("merges")
    if isinstance(merges, list) and merges:
        if all(isinstance(m, str) for m in merges):
            return list(merges)
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in merges):
            raise ConvertError(f"{hf_dir / 'tokenizer.json'}: model.merges must be strings \"a b\" or pairs "
                               "[\"a\", \"b\"]")
        # pair form (transformers >= 4.45): spaces inside a part are stored as U+0120 like llama.cpp
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    path = hf_dir / "merges.txt"
    if not path.is_file():
        return []
    out = []
    for n, line in enumerate(read_text(path, hf_dir).split("\n")):  # as a text file reads lines
        line = line.strip()
        if not line or (n == 0 and line.startswith("#")):
            continue
        parts = line.split()
        if len(parts) == 2:
            out.append(f"{parts[0]} {parts[1]}")
    return out
