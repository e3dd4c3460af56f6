"""Tokenizers built from GGUF metadata alone, behaving like llama.cpp's llama_vocab.

``Tokenizer.from_metadata(reader.metadata)`` supports the two vocabularies LLaMA-family files use:
SentencePiece-style "llama" (tokenizer_spm.py) and byte-level BPE "gpt2" (tokenizer_bpe.py).
This module holds what both share: special-token parsing, BOS/EOS, end-of-generation tokens,
token -> bytes, and an incremental UTF-8 decoder for streaming.
"""
from __future__ import annotations

import codecs
import enum
import logging
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import TokenizerError
from .tokenizer_bpe import BpeEncoder, piece_bytes, resolve_pre
from .tokenizer_spm import SPACE_MARK, SpmEncoder

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


def _as_list(value, key: str) -> list:
    if value is None:
        return []
    try:
        return list(value)
    except TypeError:
        raise TokenizerError(f"tokenizer: metadata {KEY}{key} is not an array") from None


def _as_bytes(text) -> bytes:
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    # surrogateescape keeps bytes a GGUF reader could not decode as UTF-8
    return text.encode("utf-8", "surrogateescape")


def _optional_id(metadata: Mapping, key: str, default: int | None, n_vocab: int) -> int | None:
    value = metadata.get(KEY + key)
    if value is None:
        value = default
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n_vocab:
        log.warning("tokenizer: %s%s = %d is outside the vocab (%d tokens), ignored", KEY, key, value, n_vocab)
        return default if default is not None and 0 <= default < n_vocab else None
    return value


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary (see the module docstring)."""

    def __init__(self, metadata: Mapping[str, object]):
        model = metadata.get(KEY + "model")
        if model is None:
            raise TokenizerError(f"tokenizer: metadata has no {KEY}model key (no vocabulary in this file)")
        if model not in ("llama", "gpt2"):
            raise TokenizerError(f"tokenizer: unsupported {KEY}model {model!r} (supported: 'llama', 'gpt2')")
        tokens = _as_list(metadata.get(KEY + "tokens"), "tokens")
        if tokens and not isinstance(tokens[0], str):
            tokens = [_as_bytes(t).decode("utf-8", "surrogateescape") for t in tokens]
        if not tokens:
            raise TokenizerError(f"tokenizer: metadata has no {KEY}tokens")
        n = len(tokens)
        types_raw = metadata.get(KEY + "token_type")
        types = np.asarray(types_raw, dtype=np.int64).ravel().tolist() if types_raw is not None else []
        if types and len(types) < n:
            raise TokenizerError(f"tokenizer: {KEY}token_type has {len(types)} entries for {n} tokens")
        types = types[:n] if types else [TokenType.NORMAL] * n
        self.model: str = model
        self.tokens: list[str] = tokens
        self.token_types: list[int] = types
        self.n_vocab: int = n
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")

        spm = model == "llama"
        if spm:
            pre = None
            default_bos, default_eos, default_unk, add_bos, self.add_space_prefix = 1, 2, 0, True, True
        else:
            pre = resolve_pre(metadata.get(KEY + "pre"))
            default_bos = None if pre.no_bos else 11
            default_eos, default_unk, add_bos, self.add_space_prefix = 11, None, pre.add_bos, False
        self.pre: str | None = metadata.get(KEY + "pre")
        self.add_space_prefix = bool(metadata.get(KEY + "add_space_prefix", self.add_space_prefix))
        self.bos_id = _optional_id(metadata, "bos_token_id", default_bos, n)
        self.eos_id = _optional_id(metadata, "eos_token_id", default_eos, n)
        self.unk_id = _optional_id(metadata, "unknown_token_id", default_unk, n)
        self.pad_id = _optional_id(metadata, "padding_token_id", None, n)
        self.add_bos: bool = bool(metadata.get(KEY + "add_bos_token", add_bos))
        self.add_eos: bool = bool(metadata.get(KEY + "add_eos_token", False))
        if self.add_bos and self.bos_id is None:
            raise TokenizerError(f"tokenizer: {KEY}add_bos_token is true but there is no BOS token id")
        if self.add_eos and self.eos_id is None:
            raise TokenizerError(f"tokenizer: {KEY}add_eos_token is true but there is no EOS token id")

        # first id wins when a text appears twice (llama.cpp refuses such files)
        self._token_to_id: dict[str, int] = {t: i for i, t in reversed(list(enumerate(tokens)))}
        self._find_end_tokens(metadata)
        self._special_pieces = self._special_cache()
        self._rstrip_ids = self._rstrip_tokens(metadata.get("general.architecture"))

        if spm:
            scores_raw = metadata.get(KEY + "scores")
            scores = (np.asarray(scores_raw, dtype=np.float64).ravel().tolist()
                      if scores_raw is not None else [0.0] * n)
            if len(scores) < n:
                raise TokenizerError(f"tokenizer: {KEY}scores has {len(scores)} entries for {n} tokens")
            byte_ids = {_as_bytes(t): i for i, t in reversed(list(enumerate(tokens)))}
            self._encoder = SpmEncoder(byte_ids, scores, self.unk_id)
        else:
            merges = metadata.get(KEY + "merges")
            if merges is None:
                raise TokenizerError(f"tokenizer: a 'gpt2' vocabulary needs {KEY}merges, the file has none")
            self._encoder = BpeEncoder(tokens, _as_list(merges, "merges"), pre)
        self._pieces: dict[tuple[int, bool], bytes] = {}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, object]) -> "Tokenizer":
        return cls(metadata)

    # --- special tokens ---------------------------------------------------------------------
    def _find_end_tokens(self, metadata: Mapping) -> None:
        """EOT and the end-of-generation set, as llama.cpp derives them (ids and token texts)."""
        n, types, lookup = self.n_vocab, self.token_types, self._token_to_id
        by_text: set[int] = set()  # found by their text: llama.cpp makes these control tokens

        def detect(key: str | None, texts: Sequence[str]) -> int | None:
            tid = _optional_id(metadata, key, None, n) if key else None
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
        found = [(_as_bytes(self.tokens[i]), i, self.token_types[i]) for i in special_ids if self.tokens[i]]
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

    # --- encode -----------------------------------------------------------------------------
    def _partition(self, text: bytes, special: bool) -> list[bytes | int]:
        """Split on special tokens (llama.cpp tokenizer_st_partition); user-defined ones always."""
        parts: list[bytes | int] = [text]
        for piece, tid, ttype in self._special_pieces:
            if not special and ttype != TokenType.USER_DEFINED:
                continue
            if not any(isinstance(p, bytes) and piece in p for p in parts):
                continue
            new: list[bytes | int] = []
            for p in parts:
                if isinstance(p, int) or piece not in p:
                    new.append(p)
                    continue
                chunks = p.split(piece)
                for k, chunk in enumerate(chunks):
                    if k:
                        new.append(tid)
                        if tid in self._rstrip_ids:
                            chunk = chunk.lstrip(b" \t\n\v\f\r")
                    if chunk:
                        new.append(chunk)
            parts = new
        return parts

    def encode(self, text: str | bytes, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of ``text``.

        add_bos: None -> the file's add_bos_token (and add_eos_token); True -> prepend BOS (and the
        file's EOS if it wants one); False -> no BOS/EOS. special: parse control tokens such as
        ``<|im_start|>`` in the text; when False they are ordinary text (user-defined tokens are
        always recognised, as in llama.cpp).
        """
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
        add_special = add_bos is not False
        want_bos = self.add_bos if add_bos is None else bool(add_bos)
        out: list[int] = []
        if add_special and want_bos and self.bos_id is not None:
            out.append(self.bos_id)
        out.extend(self._encode_text(raw, special, self.add_space_prefix))
        if add_special and want_bos and self.bos_id is not None and len(out) >= 2 and out[1] == self.bos_id:
            log.warning("tokenizer: the prompt starts with a BOS token and another one was added (2 BOS)")
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def encode_continuation(self, text: str | bytes, special: bool = True) -> list[int]:
        """Token ids of ``text`` as it would continue a sequence: no BOS/EOS and no SentencePiece space
        prefix, so the ids decode to exactly ``text`` (what grammar engines expect of a tokenizer)."""
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
        return self._encode_text(raw, special, False)

    def _encode_text(self, raw: bytes, special: bool, space_prefix: bool) -> list[int]:
        out: list[int] = []
        parts = self._partition(raw, special) if raw else []
        prev_special = True  # SentencePiece prefixes a space to text that starts a fragment run
        for p in parts:
            if isinstance(p, int):
                out.append(p)
                prev_special = True
                continue
            if self.model == "llama":
                if space_prefix and prev_special:
                    p = b" " + p
                out.extend(self._encoder.encode(p.replace(b" ", SPACE_MARK)))
            else:
                out.extend(self._encoder.encode(p))
            prev_special = False
        return out

    # --- decode -----------------------------------------------------------------------------
    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """Bytes of one token (llama.cpp token_to_piece): control/unknown tokens are empty unless
        ``special``; byte tokens give their byte; SentencePiece "▁" becomes a space."""
        key = (token_id, special)
        piece = self._pieces.get(key)
        if piece is None:
            piece = self._pieces[key] = self._piece(token_id, special)
        return piece

    def _piece(self, token_id: int, special: bool) -> bytes:
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(f"tokenizer: token id {token_id} is outside the vocab (0..{self.n_vocab - 1})")
        ttype, text = self.token_types[token_id], self.tokens[token_id]
        if ttype in (TokenType.CONTROL, TokenType.UNKNOWN):
            return _as_bytes(text) if special else b""
        if ttype == TokenType.USER_DEFINED:
            return _as_bytes(text)
        if ttype == TokenType.NORMAL:
            if self.model == "llama":
                return _as_bytes(text).replace(SPACE_MARK, b" ")
            return piece_bytes(text)
        if ttype == TokenType.BYTE and text.startswith("<0x") and len(text) == 6:
            return bytes([int(text[3:5], 16)])
        return b""  # unused / undefined tokens print nothing, as in llama.cpp

    def decode(self, ids: Iterable[int], special: bool = False) -> bytes:
        """Bytes of a token sequence. With a space-prefix vocabulary (SentencePiece) the space the
        encoder added is removed from the first text token (after a leading BOS), so that
        ``decode(encode(s)) == s``."""
        ids = list(ids)
        out = bytearray()
        strip = self.add_space_prefix
        for k, tid in enumerate(ids):
            piece = self.token_to_piece(tid, special)
            if strip and not (k == 0 and tid == self.bos_id and len(ids) > 1):
                if piece.startswith(b" "):
                    piece = piece[1:]
                strip = False
            out += piece
        return bytes(out)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, bos={self.bos_id}, "
                f"eos={self.eos_id}, eot={self.eot_id}, eog={sorted(self.eog_ids)})")


class Utf8Stream:
    """Incremental UTF-8 decoder for streamed token pieces.

    ``feed(piece_bytes)`` returns the text that is complete so far and holds back a trailing,
    not yet finished multi-byte character; ``flush()`` returns what is left (invalid bytes become
    U+FFFD).
    """

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._dec.decode(data, final=False)

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


def decode_stream(tokenizer: Tokenizer, ids: Sequence[int], special: bool = False) -> Iterable[str]:
    """Yield text token by token, never splitting a UTF-8 character (helper for streaming)."""
    stream = Utf8Stream()
    for tid in ids:
        text = stream.feed(tokenizer.token_to_piece(tid, special))
        if text:
            yield text
    tail = stream.flush()
    if tail:
        yield tail


__all__ = ["Tokenizer", "TokenType", "Utf8Stream", "decode_stream"]
