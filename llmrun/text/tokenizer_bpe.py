"""Byte-level BPE vocabularies (GGUF ``tokenizer.ggml.model = "gpt2"``).

The text is split by llama.cpp's pre-tokenizer regexes (chosen by ``tokenizer.ggml.pre``), every
piece is mapped byte by byte to GPT-2's printable alphabet, and merges are applied by rank. The
regex splitting and the merge loop run inside Hugging Face ``tokenizers`` (a runtime dependency,
Rust, exact Unicode classes), built here from the GGUF tokens and merges alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

from ..errors import TokenizerError, is_library_failure, one_line

log = logging.getLogger("llmrun.tokenizer")

# --- pre-tokenizer regexes (llama.cpp src/llama-vocab.cpp, llm_tokenizer_bpe) -----------------
# Each entry is a list of regexes applied one after the other: every regex splits the pieces the
# previous one produced, keeping both the matches and the text between them.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + "(?:" + _CONTRACTIONS + ")?"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + "(?:" + _CONTRACTIONS + ")?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SEED_CODER = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BAILINGMOE = (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+")
def _char_class(ranges: str) -> str:
    """Regex character class from "XXXX-YYYY ZZZZ ..." code point ranges (hex), spelled with
    escapes so that no editor or normalizer can change the characters."""
    parts = []
    for item in ranges.split():
        lo, _, hi = item.partition("-")
        parts.append(f"\\x{{{lo}}}" + (f"-\\x{{{hi}}}" if hi else ""))
    return "[" + "".join(parts) + "]"


_DEEPSEEK_CJK = _char_class("4E00-9FA5 0800-4E00 AC00-D7FF") + "+"
# cased letters (DeepSeek LLM's tokenizer.json, as llama.cpp copies it)
_DEEPSEEK_LLM_LETTERS = r"\s?" + _char_class(
    "41-5A 61-7A B5 C0-D6 D8-F6 F8-1BA 1BC-1BF 1C4-293 295-2AF 370-373 376-377 37B-37D 37F 386 388-38A "
    "38C 38E-3A1 3A3-3F5 3F7-481 48A-52F 531-556 10A0-10C5 13A0-13F5 13F8-13FD 1C90-1CBA 1CBD-1CBF "
    "1D00-1D2B 1D6B-1D77 1D79-1D9A 1E00-1F15 1F18-1F1D 1F20-1F45 1F48-1F4D 1F50-1F57 1F59 1F5B 1F5D "
    "1F5F-1F7D 1F80-1FB4 1FB6-1FBC 1FBE 1FC2-1FC4 1FC6-1FCC 1FD0-1FD3 1FD6-1FDB 1FE0-1FEC 1FF2-1FF4 "
    "1FF6-1FFC 2102 2107 210A-2113 2115 2119-211D 2124 2126 2128 212A-212D 212F-2134 2139 213C-213F "
    "2145-2149 214E 2183-2184 2C00-2C7B 2C7E-2CE4 2CEB-2CEE 2CF2-2CF3 A640-A66D A680-A69B A722-A76F "
    "A771-A787 A78B-A78E AB70-ABBF FB00-FB06 FB13-FB17 FF21-FF3A FF41-FF5A 10400-1044F 104B0-104D3 "
    "104D8-104FB 10C80-10CB2 10CC0-10CF2 118A0-118DF 1E900-1E943") + "+"
_DEEPSEEK_LLM_PUNCT = r"\s?" + _char_class("21-2F 3A-7E FF01-FF0F FF1A-FF5E 2018-201F 3000-3002") + "+"
_KANA_CJK = _char_class("4E00-9FA5 3040-309F 30A0-30FF") + "+"
_BLOOM = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{0964}\x{06D4}\x{060C})]+"

_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3],
    "gpt2": [_GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "deepseek-llm": [r"[\r\n]", _DEEPSEEK_LLM_LETTERS, _DEEPSEEK_LLM_PUNCT, r"\s+$", _DEEPSEEK_CJK, r"\p{N}+"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"],
    "deepseek-v3": [r"\p{N}{1,3}", _KANA_CJK,
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "bloom": [_BLOOM],
    "tekken": [_TEKKEN],
    "gpt-4o": [_GPT4O],
    "seed-coder": [_SEED_CODER],
    "bailingmoe": [_BAILINGMOE],
}


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp treats one ``tokenizer.ggml.pre`` value."""
    regex_key: str
    ignore_merges: bool = False  # a whole pre-token found in the vocab is used as is (Llama 3)
    add_bos: bool = False        # llama.cpp's default when the file has no add_bos_token key
    no_bos: bool = False         # llama.cpp clears the BOS id (chatglm)


def _family(names: str, pre: PreTokenizer) -> dict[str, PreTokenizer]:
    return {name: pre for name in names.split()}


# tokenizer.ggml.pre value -> behaviour (names as llama.cpp's llama_vocab::impl::load spells them)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer("default"),
    **_family("llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
              PreTokenizer("llama3", ignore_merges=True, add_bos=True)),
    **_family("dbrx smaug-bpe jais-2", PreTokenizer("llama3")),
    **_family("glm4 chatglm-bpe", PreTokenizer("llama3", no_bos=True)),
    **_family("gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert "
              "jina-v1-en jina-v2-code roberta-bpe mpt olmo jais exaone4 trillion granite-docling",
              PreTokenizer("gpt2")),
    **_family("starcoder refact command-r smollm codeshell exaone minerva-7b mellum2",
              PreTokenizer("starcoder")),
    **_family("qwen2 deepseek-r1-qwen kormo f2llmv2 stablelm2 megrez hunyuan solar-open",
              PreTokenizer("qwen2")),
    "qwen35": PreTokenizer("qwen35"),
    "deepseek-llm": PreTokenizer("deepseek-llm"),
    "deepseek-coder": PreTokenizer("deepseek-coder"),
    **_family("deepseek-v3 hunyuan-dense joyai-llm hy_v4", PreTokenizer("deepseek-v3")),
    "falcon": PreTokenizer("falcon"),
    **_family("poro-chat bloom gpt3-finnish", PreTokenizer("bloom")),
    "tekken": PreTokenizer("tekken", ignore_merges=True, add_bos=True),
    **_family("gpt-4o llama4 kanana2 talkie minimax-m2", PreTokenizer("gpt-4o")),
    "seed-coder": PreTokenizer("seed-coder"),
    **_family("bailingmoe bailingmoe2 llada-moe", PreTokenizer("bailingmoe")),
    "grok-2": PreTokenizer("qwen2"),
}


def resolve_pre(pre: str | None) -> PreTokenizer:
    """The behaviour for a ``tokenizer.ggml.pre`` value; unknown or missing -> "default" (warned)."""
    if pre in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[pre]
    log.warning("tokenizer: %s pre-tokenizer type %r, using 'default' (generation quality may suffer)",
                "missing" if not pre else "unknown", pre)
    return PRE_TOKENIZERS["default"]


# --- GPT-2 byte <-> printable character map ---------------------------------------------------
@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters.

    Printable Latin-1 bytes map to themselves; the others (controls, space, 0x7F-0xA0, 0xAD) are
    moved, in byte order, to U+0100 upwards, so that every byte has a visible, non-space character.
    """
    keep = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_char().items()}


def piece_bytes(token_text: str) -> bytes:
    """Raw bytes of a normal byte-level token (characters outside the map are kept as UTF-8)."""
    table = char_to_byte()
    out = bytearray()
    for ch in token_text:
        b = table.get(ch)
        if b is None:
            out += ch.encode("utf-8", "surrogatepass")
        else:
            out.append(b)
    return bytes(out)


def split_merge(merge: str) -> tuple[str, str] | None:
    """A GGUF merge "a b" -> ("a", "b"), split at the first space after position 0 like llama.cpp."""
    if merge[:1] != " ":
        a, sep, b = merge.partition(" ")
        return (a, b) if sep else None
    pos = merge.find(" ", 1)
    return (merge[:pos], merge[pos + 1:]) if pos > 0 else None


class BpeEncoder:
    """Raw text (no special tokens in it) -> token ids for one byte-level BPE vocabulary."""

    def __init__(self, tokens: list[str], merges: list[str], pre: PreTokenizer):
        from tokenizers import Regex, Tokenizer
        from tokenizers import models, pre_tokenizers

        vocab: dict[str, int] = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)  # first id wins for duplicates
        # Only merges whose parts and result are tokens: tokenizers accepts the others but panics when one
        # applies (llama.cpp could use such a merge as an intermediate step; real vocabularies do not need that).
        pairs = [p for p in map(split_merge, merges)
                 if p and p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
        try:
            model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges,
                               fuse_unk=False, byte_fallback=False)
        except BaseException as e:  # tokenizers' own exception types, or a Rust panic
            if not is_library_failure(e):
                raise
            raise TokenizerError(f"tokenizer: cannot build the BPE model from the GGUF vocab: {one_line(e)}") \
                from None
        tk = Tokenizer(model)
        try:
            steps = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False)
                     for r in _REGEXES[pre.regex_key]]
        except Exception as e:  # an Oniguruma syntax error: a bug here, not in the file
            raise TokenizerError(f"tokenizer: pre-tokenizer {pre.regex_key!r} regex does not compile: {e}") from e
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
        tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
        self._tk = tk

    def encode(self, text: bytes) -> list[int]:
        if not text:
            return []
        try:
            # llama.cpp replaces invalid UTF-8 by U+FFFD before splitting
            return self._tk.encode(text.decode("utf-8", "replace"), add_special_tokens=False).ids
        except BaseException as e:
            if not is_library_failure(e):
                raise
            raise TokenizerError(f"tokenizer: the BPE vocabulary cannot encode this text: {one_line(e)}") from None
