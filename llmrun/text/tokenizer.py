"""Tokenizers built from GGUF metadata alone, behaving like llama.cpp's llama_vocab.

``Tokenizer.from_metadata(reader.metadata)`` supports the two vocabularies LLaMA-family files use:
SentencePiece-style "llama" (tokenizer_spm.py) and byte-level BPE "gpt2" (tokenizer_bpe.py).
This module holds what both share: building from metadata, encoding around special tokens, token -> bytes,
and an incremental UTF-8 decoder for streaming; the special tokens themselves (types, BOS/EOS, end of
generation, the split on them) are tokenizer_special.py's.
"""
from __future__ import annotations

import codecs
import logging
from typing import Iterable, Mapping, Sequence

import numpy as np

from ..errors import TokenizerError
from ..gguf.metadata import TypedMetadata
from .tokenizer_bpe import BpeEncoder, piece_bytes, resolve_pre
from .tokenizer_special import KEY, SpecialTokens, TokenType, as_bytes, optional_id
from .tokenizer_spm import SPACE_MARK, SpmEncoder

log = logging.getLogger("llmrun.tokenizer")

# The largest vocabularies in use hold ~260k tokens; building a tokenizer costs ~5 us and ~250 bytes per
# token, so a file claiming millions of (tiny) tokens is refused instead of costing gigabytes and minutes.
MAX_VOCAB = 1 << 20
MAX_MERGES = 1 << 22


def _first_ids(texts) -> dict:
    """text -> the first id holding it (a file may list a text twice; llama.cpp refuses such files)."""
    ids: dict = {}
    setdefault = ids.setdefault
    for i, t in enumerate(texts):
        setdefault(t, i)
    return ids


class Tokenizer(SpecialTokens):
    """Text <-> token ids for one GGUF vocabulary (see the module docstring)."""

    def __init__(self, metadata: Mapping[str, object]):
        md = TypedMetadata(metadata, "tokenizer", TokenizerError)
        model = md.get_str(KEY + "model", None)
        if model is None:
            raise TokenizerError(f"tokenizer: metadata has no {KEY}model key (no vocabulary in this file)")
        if model not in ("llama", "gpt2"):
            raise TokenizerError(f"tokenizer: unsupported {KEY}model {model!r:.80} (supported: 'llama', 'gpt2')")
        raw_tokens = metadata.get(KEY + "tokens")
        if isinstance(raw_tokens, list) and all(isinstance(t, (bytes, bytearray)) for t in raw_tokens):
            raw_tokens = [as_bytes(t).decode("utf-8", "surrogateescape") for t in raw_tokens]
            metadata = {**metadata, KEY + "tokens": raw_tokens}
            md = TypedMetadata(metadata, "tokenizer", TokenizerError)
        tokens = md.get_array(KEY + "tokens", "str", [])
        if not tokens:
            raise TokenizerError(f"tokenizer: metadata has no {KEY}tokens")
        n = len(tokens)
        if n > MAX_VOCAB:
            raise TokenizerError(f"tokenizer: {KEY}tokens holds {n} tokens, more than the {MAX_VOCAB} supported")
        types_raw = md.get_array(KEY + "token_type", "int", None)
        if types_raw is not None and len(types_raw) < n:
            raise TokenizerError(f"tokenizer: {KEY}token_type has {len(types_raw)} entries for {n} tokens")
        types = types_raw[:n].astype(np.int64).tolist() if types_raw is not None else [TokenType.NORMAL] * n
        self.model: str = model
        self.tokens: list[str] = tokens
        self.token_types: list[int] = types
        self.n_vocab: int = n
        # kept as found: rendering refuses a template that is not a string (ChatTemplateError)
        self.chat_template: str | None = metadata.get("tokenizer.chat_template")

        spm = model == "llama"
        if spm:
            pre = None
            default_bos, default_eos, default_unk, add_bos, self.add_space_prefix = 1, 2, 0, True, True
        else:
            pre = resolve_pre(md.get_str(KEY + "pre", None))
            default_bos = None if pre.no_bos else 11
            default_eos, default_unk, add_bos, self.add_space_prefix = 11, None, pre.add_bos, False
        self.pre: str | None = md.get_str(KEY + "pre", None)
        self.add_space_prefix = md.get_bool(KEY + "add_space_prefix", self.add_space_prefix)
        self.bos_id = optional_id(md, "bos_token_id", default_bos, n)
        self.eos_id = optional_id(md, "eos_token_id", default_eos, n)
        self.unk_id = optional_id(md, "unknown_token_id", default_unk, n)
        self.pad_id = optional_id(md, "padding_token_id", None, n)
        self.add_bos: bool = md.get_bool(KEY + "add_bos_token", add_bos)
        self.add_eos: bool = md.get_bool(KEY + "add_eos_token", False)
        if self.add_bos and self.bos_id is None:
            raise TokenizerError(f"tokenizer: {KEY}add_bos_token is true but there is no BOS token id")
        if self.add_eos and self.eos_id is None:
            raise TokenizerError(f"tokenizer: {KEY}add_eos_token is true but there is no EOS token id")

        # first id wins when a text appears twice (llama.cpp refuses such files)
        self._token_to_id: dict[str, int] = _first_ids(tokens)
        self._find_end_tokens(md)
        self._special_pieces = self._special_cache()
        self._rstrip_ids = self._rstrip_tokens(md.get_str("general.architecture", None))

        if spm:
            scores_raw = md.get_array(KEY + "scores", "float", None, finite=False)
            if scores_raw is not None and len(scores_raw) < n:
                raise TokenizerError(f"tokenizer: {KEY}scores has {len(scores_raw)} entries for {n} tokens")
            scores = scores_raw[:n].astype(np.float64).tolist() if scores_raw is not None else [0.0] * n
            byte_ids = _first_ids([as_bytes(t) for t in tokens])
            self._encoder = SpmEncoder(byte_ids, scores, self.unk_id)
        else:
            merges = md.get_array(KEY + "merges", "str", None)
            if merges is None:
                raise TokenizerError(f"tokenizer: a 'gpt2' vocabulary needs {KEY}merges, the file has none")
            if len(merges) > MAX_MERGES:
                raise TokenizerError(f"tokenizer: {KEY}merges holds {len(merges)} merges, more than the "
                                     f"{MAX_MERGES} supported")
            self._encoder = BpeEncoder(tokens, merges, pre)
        self._pieces: dict[tuple[int, bool], bytes] = {}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, object]) -> "Tokenizer":
        return cls(metadata)

    # --- encode -----------------------------------------------------------------------------
    def encode_segments(self, segments: Sequence[tuple[str | bytes, bool]]) -> list[int]:
        """Token ids of the joined segment texts (no BOS/EOS added), control tokens parsed only inside the
        segments marked True. The text between control tokens is encoded as one piece, exactly as
        encode(joined, special=True) would when the other segments hold no control-token text."""
        raw_parts, allowed, pos = [], [], 0
        for text, parse_special in segments:
            raw = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
            if parse_special and raw:
                allowed.append((pos, pos + len(raw)))
            raw_parts.append(raw)
            pos += len(raw)
        return self._encode_text(b"".join(raw_parts), allowed, self.add_space_prefix)

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

    def _encode_text(self, raw: bytes, special: bool | list[tuple[int, int]], space_prefix: bool) -> list[int]:
        """special: as _partition takes it (True/False, or the byte ranges where control tokens count)."""
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
            return as_bytes(text) if special else b""
        if ttype == TokenType.USER_DEFINED:
            return as_bytes(text)
        if ttype == TokenType.NORMAL:
            if self.model == "llama":
                return as_bytes(text).replace(SPACE_MARK, b" ")
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
