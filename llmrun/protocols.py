"""The seams between the front ends (api.py, generate.py) and what they drive, as `typing.Protocol`s.

* `TokenizerLike`: text <-> ids and the token facts generation needs (text/tokenizer.py's Tokenizer).
* `SequenceModel`: an engine with one KV cache, fed token by token (engine/model.py's LlamaModel).
* `BatchModel`: an engine holding several sequences (KV-cache slots) that evaluates one step of all of them
  in ONE call, `forward_batch`. This is the seam continuous batching builds on. Today's engine keeps one cache
  per LlamaModel; generate.py's `PerSlotModels` gives that the BatchModel shape (one single-cache model per
  slot, run one after the other). An engine with many slots in one batched graph replaces it behind the
  same method.
* `TokenMask`: restricts the next token (grammars, JSON schemas) between logits and sampling.

Any object with these attributes and methods fits; nothing needs to inherit from them (isinstance checks
that the names exist, tests use it to keep the real classes in line).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class TokenizerLike(Protocol):
    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    eog_ids: frozenset[int]       # ids that end a generation (EOS, EOT, <|im_end|>, ...)
    add_bos: bool                 # the model wants BOS in front of a prompt
    chat_template: str | None     # the file's Jinja2 chat template; None: ChatML

    def encode(self, text: str | bytes, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """add_bos None: as the model asks; special: parse control tokens written in the text."""

    def decode(self, ids: Iterable[int], special: bool = False) -> bytes: ...

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """The bytes of one token (control tokens are empty unless `special`)."""


@runtime_checkable
class SequenceModel(Protocol):
    n_ctx: int       # positions the KV cache holds
    n_past: int      # positions in use

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Evaluate `tokens` after the cached ones; float32 logits after the last one [n_vocab]
        (all_logits: after each one, [len(tokens), n_vocab])."""

    def truncate(self, n: int) -> None:
        """Keep the first n cached positions."""

    def reset(self) -> None: ...


class BatchItem(NamedTuple):
    """One sequence's part of a batched step: its slot keeps its first `pos` positions, then `tokens` follow."""
    slot: int
    pos: int
    tokens: Sequence[int]


@runtime_checkable
class BatchModel(Protocol):
    n_slots: int     # independent sequences (KV-cache slots) it holds
    n_ctx: int       # positions per slot

    def forward_batch(self, batch: Sequence[BatchItem]) -> list[np.ndarray]:
        """Evaluate every item (at most one per slot) in one call; for each, in order, the float32 logits
        [n_vocab] after its last token."""


@runtime_checkable
class TokenMask(Protocol):
    """A per-sequence filter on the next token, told what was picked so it can follow along (a grammar's
    state). The loop asks `allowed()` before each sampling and calls `accept()` with the token sampled."""

    def allowed(self) -> np.ndarray | None:
        """bool [n_vocab]: the tokens allowed next (None: all of them)."""

    def accept(self, token: int) -> None: ...
