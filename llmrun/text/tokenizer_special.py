"""The special tokens of a GGUF vocabulary, as llama.cpp's llama_vocab finds and uses them: token types, the
BOS/EOS/... ids from metadata, end-of-turn and end-of-generation tokens (also by their text), and splitting a
text on special tokens before the encoder sees it (tokenizer.py mixes these into `Tokenizer`)."""
from __future__ import annotations

import bisect
import enum
import logging
from typing import Sequence

import numpy as np

from ..gguf.metadata import TypedMetadata

log = logging.getLogger("llmrun.tokenizer")

KEY = "tokenizer.ggml."


class TokenType(enum.IntEnum):
    """``tokenizer.ggml.token_type`` values."""
    UNDEFINED = 0
    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# Texts llama.cpp treats as end of turn / end of generation even when the file does not say so
# (llama_vocab::impl::load). The EOT list is in priority order: the first one present is eot_id.
EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
             "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
             "<｜end▁of▁sentence｜>", "[e~[")
# fill-in-the-middle pad / repo / file-separator tokens also end generation in llama.cpp
FIM_EOG_TEXTS = (("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
                 ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
                 ("<|file_sep|>",))


def as_bytes(text) -> bytes:
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    # surrogateescape keeps bytes a GGUF reader could not decode as UTF-8
    return text.encode("utf-8", "surrogateescape")


def optional_id(md: TypedMetadata, key: str, default: int | None, n_vocab: int) -> int | None:
    value = md.get_int(KEY + key, default)
    if value is None:
        return None
    if not 0 <= value < n_vocab:
        log.warning("tokenizer: %s%s = %d is outside the vocab (%d tokens), ignored", KEY, key, value, n_vocab)
        return default if default is not None and 0 <= default < n_vocab else None
    return value


def _inside(ranges: list[tuple[int, int]], starts: list[int], a: int, b: int) -> bool:
    """Is [a, b) inside one of the sorted, disjoint ranges?"""
    i = bisect.bisect_right(starts, a) - 1
    return i >= 0 and b <= ranges[i][1]


class SpecialTokens:
    """Mixed into `Tokenizer` (tokenizer.py), whose tokens, types and ids these use: the vocabulary's special
    tokens -- end of generation, the pieces a text is split on first -- and that split."""

    def _find_end_tokens(self, md: TypedMetadata) -> None:
        """EOT and the end-of-generation set, as llama.cpp derives them (ids and token texts)."""
        n, types, lookup = self.n_vocab, self.token_types, self._token_to_id
        by_text: set[int] = set()  # found by their text: llama.cpp makes these control tokens

        def detect(key: str | None, texts: Sequence[str]) -> int | None:
            tid = optional_id(md, key, None, n) if key else None
            if tid is None:
                tid = next((lookup[t] for t in texts if t in lookup), None)
                if tid is not None:
                    by_text.add(tid)
            return tid

        self.eot_id: int | None = detect("eot_token_id", EOT_TEXTS)
        eom_id = detect("eom_token_id", ("<|eom_id|>",))
        fim = [detect(key, texts) for key, texts in zip(("fim_pad_token_id", "fim_rep_token_id", "fim_sep_token_id"),
                                                       FIM_EOG_TEXTS)]
        listed = {lookup[t] for t in EOG_TEXTS if t in lookup}
        by_text |= listed
        eog = listed | {i for i in (self.eos_id, self.eot_id, eom_id, *fim) if i is not None}
        for i in by_text:
            types[i] = TokenType.CONTROL  # hidden when decoding, never matched in user text
        self.eog_ids: frozenset[int] = frozenset(eog)

    def _special_cache(self) -> list[tuple[bytes, int, int]]:
        """Tokens the text is split on first: (text, id, type), longest text first."""
        wanted = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
        types = np.asarray(self.token_types)
        special_ids = np.flatnonzero(np.isin(types, np.array(wanted, dtype=types.dtype))).tolist()
        found = [(as_bytes(self.tokens[i]), i, self.token_types[i]) for i in special_ids if self.tokens[i]]
        found.sort(key=lambda e: (-len(e[0]), e[1]))
        return found

    def _rstrip_tokens(self, arch) -> frozenset[int]:
        """Tokens that swallow the whitespace after them, as llama.cpp marks them for Phi-3 (its added chat
        tokens are rstrip=True in HF's tokenizer config; the GGUF vocabulary does not say so)."""
        if arch != "phi3":
            return frozenset()
        ids = {tid for _, tid, _ in self._special_pieces}
        ids |= {self._token_to_id[t] for t in ("</s>",) if t in self._token_to_id}
        ids -= {self._token_to_id[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in self._token_to_id}
        return frozenset(ids)
    def _partition(self, text: bytes, special: bool | list[tuple[int, int]]) -> list[bytes | int]:
        """Split on special tokens (llama.cpp tokenizer_st_partition); user-defined ones always.

        special: True/False, or the sorted (start, end) byte ranges of `text` in which control tokens may
        be recognised (a token is taken only if it lies wholly inside one range)."""
        if special is True:
            special = [(0, len(text))]
        allowed = special or []
        starts = [a for a, _ in allowed]
        parts: list[tuple[bytes, int] | int] = [(text, 0)]
        for piece, tid, ttype in self._special_pieces:
            anywhere = ttype == TokenType.USER_DEFINED
            if not anywhere and not allowed:
                continue
            if not any(not isinstance(p, int) and piece in p[0] for p in parts):
                continue
            new: list[tuple[bytes, int] | int] = []
            for p in parts:
                if isinstance(p, int) or piece not in p[0]:
                    new.append(p)
                    continue
                data, offset = p
                start = search = 0
                while (k := data.find(piece, search)) >= 0:
                    if anywhere or _inside(allowed, starts, offset + k, offset + k + len(piece)):
                        if k > start:
                            new.append((data[start:k], offset + start))
                        new.append(tid)
                        start = k + len(piece)
                        if tid in self._rstrip_ids:     # Phi-3's added tokens swallow the whitespace after them
                            while start < len(data) and data[start] in b" \t\n\v\f\r":
                                start += 1
                        search = start
                    else:
                        search = k + 1
                if start < len(data):
                    new.append((data[start:], offset + start))
            parts = new
        return [p if isinstance(p, int) else p[0] for p in parts]

    def special_ids(self, text: str | bytes) -> list[int]:
        """The control/unknown tokens `encode(text, special=True)` would parse in text, in order (user-defined
        tokens are left out: they are recognised in any text anyway)."""
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
        if not raw:
            return []
        return [p for p in self._partition(raw, True)
                if isinstance(p, int) and self.token_types[p] != TokenType.USER_DEFINED]
