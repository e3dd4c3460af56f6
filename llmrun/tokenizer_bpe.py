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

from .errors import TokenizerError

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
_DEEPSEEK_CJK = "[一-龥ࠀ-一가-퟿]+"
_DEEPSEEK_LLM_LETTERS = (
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼ"
    r"ℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+")

_REGEXES: dict[str, list[str]] = {
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
    "llama3": [_LLAMA3],
    "gpt2": [_GPT2],
    "starcoder": [r"\p{N}", _GPT2],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "deepseek-llm": [r"[\r\n]", _DEEPSEEK_LLM_LETTERS, r"\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$",
                     _DEEPSEEK_CJK, r"\p{N}+"],
    "deepseek-coder": [r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}"],
    "deepseek-v3": [r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
                    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
                    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    "falcon": [r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"],
    "bloom": [r" ?[^(\s|.,!?…。，、।۔،)]+"],
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

        vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # first id wins for duplicates
        pairs = [split_merge(m) for m in merges]
        try:
            model = models.BPE(vocab=vocab, merges=[p for p in pairs if p],
                               ignore_merges=pre.ignore_merges, fuse_unk=False, byte_fallback=False)
        except Exception:
            # tokenizers rejects merges whose parts or result are not tokens; llama.cpp could only
            # use such a merge as an intermediate step, which real vocabularies do not need.
            pairs = [p for p in pairs if p and p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
            try:
                model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre.ignore_merges,
                                   fuse_unk=False, byte_fallback=False)
            except Exception as e:  # tokenizers raises its own exception types
                raise TokenizerError(f"tokenizer: cannot build the BPE model from the GGUF vocab: {e}") from e
        tk = Tokenizer(model)
        steps = [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False)
                 for r in _REGEXES[pre.regex_key]]
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
        tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
        self._tk = tk

    def encode(self, text: bytes) -> list[int]:
        if not text:
            return []
        # llama.cpp replaces invalid UTF-8 by U+FFFD before splitting
        return self._tk.encode(text.decode("utf-8", "replace"), add_special_tokens=False).ids
