"""Grammar-constrained decoding: GBNF grammars, JSON mode and JSON schemas as per-sequence token masks.

The masks come from llguidance (the engine llama.cpp itself can use), bridged to our tokenizers: its
vocabulary is built from each token's bytes as ``Tokenizer.token_to_piece`` gives them (control tokens
marked with a 0xFF prefix so that no grammar text can match them, as llama.cpp does), its end tokens are the
model's end-of-generation set, and it tokenizes with ``Tokenizer.encode_continuation``.

    grammar = Grammar.from_gbnf('root ::= "yes" | "no"')        # or from_json_schema(...), json_object()
    matcher = grammar.matcher(tokenizer)                         # one per generated sequence
    matcher.mask_logits(logits)                                  # forbidden tokens -> -inf, in place
    matcher.accept(token)                                        # after sampling

A ``Grammar`` is compiled and checked once (an invalid grammar or schema raises ``GrammarError``, one line)
and can serve many sequences; a ``GrammarMatcher`` holds one sequence's parse state.
"""
from __future__ import annotations

import json
import re
import threading
import weakref
from typing import Any, Mapping

import numpy as np

from ..errors import GrammarError

# Bounds on what a caller may hand us: the text size here, the grammar's size and the per-token work inside
# llguidance (its default limits), so a hostile grammar costs an error, not minutes.
MAX_GRAMMAR_CHARS = 512 * 1024

# JSON layout under a schema: one space after ':' and ',' and no other whitespace. Small models given free
# whitespace tend to emit runs of newlines; a fixed layout also makes the output what json.dumps writes.
# A schema's own "x-guidance" options override these.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _one_line(message: str, limit: int = 300) -> str:
    # llguidance's messages can span lines (regex errors draw a caret under the pattern): join them
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _llguidance():
    import llguidance
    return llguidance


class Grammar:
    """A compiled, checked constraint (immutable; shareable between threads and sequences)."""

    __slots__ = ("kind", "source", "compiled")

    def __init__(self, kind: str, source: str, compiled: str):
        self.kind = kind            # "gbnf" | "lark" | "json_schema" | "json_object" | "regex"
        self.source = source        # what the caller gave (for messages)
        self.compiled = compiled    # llguidance's grammar text

    def __repr__(self) -> str:
        return f"Grammar({self.kind}, {self.source[:60]!r})"

    # ---- constructors -----------------------------------------------------------------------------------
    @classmethod
    def from_gbnf(cls, text: str) -> "Grammar":
        """llama.cpp's GBNF (``root ::= ...``); llguidance's Lark syntax is accepted too."""
        text = _text_arg(text, "grammar")
        from llguidance.gbnf_to_lark import any_to_lark
        try:
            lark = any_to_lark(_plain_unicode_escapes(text))
        except RecursionError:
            raise GrammarError("grammar is nested too deeply") from None
        except Exception as e:  # the converter raises its own error types and ValueError/IndexError on odd input
            raise GrammarError(f"invalid grammar: {_one_line(e)}") from None
        return cls._checked("gbnf", text, _llguidance().LLMatcher.grammar_from_lark(lark))

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = False) -> "Grammar":
        """llama-cpp-python's ``LlamaGrammar.from_string``: GBNF text."""
        return cls.from_gbnf(grammar)

    @classmethod
    def from_file(cls, path, verbose: bool = False) -> "Grammar":
        """GBNF from a file (llama-cpp-python's ``LlamaGrammar.from_file``)."""
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_GRAMMAR_CHARS * 4 + 1)
        except OSError as e:
            raise GrammarError(f"cannot read grammar file {path}: {e.strerror or e}") from None
        return cls.from_gbnf(data)

    @classmethod
    def from_json_schema(cls, schema: Mapping[str, Any] | bool | str, verbose: bool = False) -> "Grammar":
        """Output must be JSON valid under ``schema`` (a dict, or its JSON text)."""
        if isinstance(schema, (str, bytes)):
            text = _text_arg(schema, "JSON schema")
            try:
                schema = json.loads(text)
            except ValueError as e:
                raise GrammarError(f"JSON schema is not valid JSON: {_one_line(e)}") from None
        if not isinstance(schema, (Mapping, bool)):
            raise GrammarError(f"a JSON schema must be an object (got {type(schema).__name__})")
        try:
            text = json.dumps(schema)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"JSON schema cannot be serialized: {_one_line(e)}") from None
        if len(text) > MAX_GRAMMAR_CHARS:
            raise GrammarError(f"JSON schema is too large ({len(text)} characters; at most {MAX_GRAMMAR_CHARS})")
        try:
            compiled = _llguidance().LLMatcher.grammar_from_json_schema(text, defaults=JSON_LAYOUT)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"invalid JSON schema: {_one_line(e)}") from None
        return cls._checked("json_schema", text, compiled)

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's ``response_format={"type": "json_object"}``)."""
        g = cls.from_json_schema({"type": "object"})
        return cls("json_object", "json_object", g.compiled)

    @classmethod
    def from_regex(cls, pattern: str) -> "Grammar":
        pattern = _text_arg(pattern, "regex")
        return cls._checked("regex", pattern, _llguidance().LLMatcher.grammar_from_regex(pattern))

    @classmethod
    def _checked(cls, kind: str, source: str, compiled: str) -> "Grammar":
        try:
            message = _llguidance().LLMatcher.validate_grammar(compiled)
        except Exception as e:  # llguidance raises ValueError/RuntimeError for API-level problems
            message = str(e) or type(e).__name__
        if message and not message.startswith("WARNING"):
            raise GrammarError(f"invalid {kind.replace('_', ' ')}: {_one_line(message)}")
        return cls(kind, source, compiled)

    # ---- use --------------------------------------------------------------------------------------------
    def matcher(self, tokenizer) -> "GrammarMatcher":
        """A fresh parse state for one sequence generated with ``tokenizer``."""
        return GrammarMatcher(self, tokenizer)


def _text_arg(text, what: str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not isinstance(text, str):
        raise GrammarError(f"{what} must be text (got {type(text).__name__})")
    if len(text) > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"{what} is too large ({len(text)} characters; at most {MAX_GRAMMAR_CHARS})")
    if not text.strip():
        raise GrammarError(f"{what} is empty")
    return text


# \uXXXX / \UXXXXXXXX after an even run of backslashes (an odd run escapes the backslash itself)
_UNICODE_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\(?:u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8}))")


def _plain_unicode_escapes(text: str) -> str:
    """GBNF's \\u / \\U escapes as the character itself (or \\xHH below 256): llguidance's GBNF converter
    writes them in a form its own Lark reader refuses."""
    def replace(m):
        cp = int(m.group(2) or m.group(3), 16)
        if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
            raise GrammarError(f"invalid grammar: \\u escape {m.group(0)[len(m.group(1)):]} is not a character")
        return m.group(1) + (f"\\x{cp:02x}" if cp < 256 else chr(cp))
    return _UNICODE_ESCAPE.sub(replace, text)


def as_grammar(grammar) -> Grammar | None:
    """``grammar=`` as callers pass it: None, GBNF text, or a compiled Grammar (or anything with a
    ``.grammar`` Grammar attribute)."""
    if grammar is None or isinstance(grammar, Grammar):
        return grammar
    inner = getattr(grammar, "grammar", None)
    if isinstance(inner, Grammar):
        return inner
    if isinstance(grammar, (str, bytes)):
        return Grammar.from_gbnf(grammar)
    raise GrammarError(f"grammar must be GBNF text or a Grammar (got {type(grammar).__name__})")


def response_format_grammar(response_format) -> Grammar | None:
    """The constraint an OpenAI-style ``response_format`` asks for (None for plain text).

    Accepted shapes: ``{"type": "text"}``, ``{"type": "json_object"}``, ``{"type": "json_object", "schema": S}``
    (llama-cpp-python's) and ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` (OpenAI's).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise GrammarError(f"response_format must be a dict (got {type(response_format).__name__})")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        return Grammar.json_object() if schema is None else Grammar.from_json_schema(schema)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise GrammarError('response_format {"type": "json_schema"} needs "json_schema": {"name", "schema"}')
        schema = spec.get("schema", response_format.get("schema"))
        return Grammar.json_object() if schema is None else Grammar.from_json_schema(schema)
    raise GrammarError(f"unsupported response_format type {kind!r} (supported: 'text', 'json_object', "
                       f"'json_schema')")


# ---- the vocabulary bridge ------------------------------------------------------------------------------
_vocab_lock = threading.Lock()
_vocabularies: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()


class _TokenizerView:
    """What llguidance.TokenizerWrapper reads from a tokenizer (attributes and a bytes -> ids call)."""

    def __init__(self, tokenizer):
        pieces = [self._piece(tokenizer, i) for i in range(tokenizer.n_vocab)]
        self.tokens = pieces
        self.special_token_ids = [i for i, p in enumerate(pieces) if p.startswith(b"\xff")]
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    @staticmethod
    def _piece(tokenizer, i: int) -> bytes:
        """Token i's bytes, with llguidance's 0xFF mark on special tokens (control, unknown, and user-defined
        ones shaped like <...>, as llama.cpp marks them). A tokenizer without token types (any TokenizerLike):
        special = shown only with special=True."""
        from .tokenizer import TokenType
        piece = tokenizer.token_to_piece(i, special=True)
        types = getattr(tokenizer, "token_types", None)
        if types is None:
            special = bool(piece) and not tokenizer.token_to_piece(i, special=False)
        else:
            special = types[i] in (TokenType.CONTROL, TokenType.UNKNOWN) or (
                types[i] == TokenType.USER_DEFINED and piece.startswith(b"<") and piece.endswith(b">"))
        return b"\xff" + piece if special else piece

    def __call__(self, text: bytes) -> list[int]:
        encode = getattr(self._tokenizer, "encode_continuation", None)
        if encode is not None:
            return encode(text, special=True)
        return list(self._tokenizer.encode(text, add_bos=False, special=True))


def grammar_vocabulary(tokenizer):
    """llguidance's tokenizer for ``tokenizer`` (built once per tokenizer: ~0.2 s for 50k tokens)."""
    with _vocab_lock:
        vocab = _vocabularies.get(tokenizer)
        if vocab is None:
            llg = _llguidance()
            ends = sorted(int(t) for t in (getattr(tokenizer, "eog_ids", None) or ()))
            if not ends and tokenizer.eos_id is not None:
                ends = [int(tokenizer.eos_id)]
            if not ends:
                raise GrammarError("this vocabulary has no end-of-generation token: a grammar cannot end")
            vocab = llg.LLTokenizer(llg.TokenizerWrapper(_TokenizerView(tokenizer)), eos_token=ends)
            _vocabularies[tokenizer] = vocab
        return vocab


class GrammarMatcher:
    """One sequence's parse state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, grammar: Grammar, tokenizer):
        llg = _llguidance()
        self.grammar = grammar
        self.n_vocab = int(tokenizer.n_vocab)
        limits = llg.LLParserLimits(verbose_errors=False)   # messages without parser state dumps
        self._m = llg.LLMatcher(grammar_vocabulary(tokenizer), grammar.compiled, log_level=0, limits=limits)
        self._check()
        self._bits = np.zeros((self.n_vocab + 31) // 32, dtype=np.int32)
        self._n_taken = 0

    def _check(self) -> None:
        if self._m.is_error():
            message = self._m.get_error()
            if message.startswith("NoExtension"):
                raise GrammarError("the grammar matches no text here (a rule that only refers to itself?)")
            raise GrammarError(f"grammar: {_one_line(message)}")

    def allowed(self) -> np.ndarray:
        """bool [n_vocab]: the tokens the grammar allows next (end-of-generation tokens once it is complete)."""
        bits = self._bits
        self._m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        self._check()
        return np.unpackbits(bits.view(np.uint8), count=self.n_vocab, bitorder="little").view(np.bool_)

    def mask_logits(self, logits: np.ndarray) -> np.ndarray:
        """Set the logits of forbidden tokens to -inf, in place (rows longer than the vocabulary: the tail too)."""
        allowed = self.allowed()
        n = self.n_vocab
        np.copyto(logits[:n], np.float32(-np.inf), where=~allowed[:logits.shape[-1]])
        if logits.shape[-1] > n:
            logits[n:] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        """Advance by one sampled token; a token the grammar forbids raises GrammarError."""
        if not self._m.consume_token(int(token)):
            raise GrammarError(f"token {int(token)} is not allowed by the grammar here: "
                               f"{_one_line(self._m.get_error()) or 'rejected'}")
        self._n_taken += 1

    def rollback(self, n_tokens: int) -> None:
        n_tokens = min(int(n_tokens), self._n_taken)
        if n_tokens > 0:
            self._m.rollback(n_tokens)
            self._n_taken -= n_tokens

    @property
    def is_accepting(self) -> bool:
        """The text so far is a complete match (generation may end here)."""
        return bool(self._m.is_accepting())

    @property
    def is_done(self) -> bool:
        """Nothing but an end token can follow."""
        return bool(self._m.is_stopped())


__all__ = ["Grammar", "GrammarError", "GrammarMatcher", "as_grammar", "grammar_vocabulary",
           "response_format_grammar"]
