"""Fakes for the generation loop's tests: a byte tokenizer and a model that plays a script.

They fit protocols.py's TokenizerLike and SequenceModel, so the loop runs with exact control over what is
generated.
"""
from __future__ import annotations

import time

import numpy as np

from llmrun.errors import ContextFullError

BOS, EOS, IM_END, IM_START, GO = 256, 257, 258, 259, 260
SPECIAL = {BOS: b"<s>", EOS: b"</s>", IM_END: b"<|im_end|>", IM_START: b"<|im_start|>", GO: b"<|go|>"}


class ByteTokenizer:
    """One token per byte (so multi-byte characters are split across tokens) plus a few control tokens."""
    n_vocab = 261
    bos_id, eos_id, eot_id = BOS, EOS, None
    eog_ids = frozenset({EOS, IM_END})
    add_bos, add_eos = True, False
    chat_template = None   # -> ChatML

    def encode(self, text, add_bos=None, special=False):
        data = text.encode() if isinstance(text, str) else bytes(text)
        ids = [BOS] if (self.add_bos if add_bos is None else add_bos) else []
        i = 0
        while i < len(data):
            for tid, s in SPECIAL.items():
                if special and data.startswith(s, i):
                    ids.append(tid)
                    i += len(s)
                    break
            else:
                ids.append(data[i])
                i += 1
        return ids

    def token_to_piece(self, tid, special=False):
        if tid in SPECIAL:
            return SPECIAL[tid] if special else b""
        return bytes([tid])

    def decode(self, ids, special=False):
        return b"".join(self.token_to_piece(t, special) for t in ids)


class ScriptedModel:
    """Predicts `script[j]` where j counts tokens since the last <|go|> (or <|im_start|>assistant\\n); after
    the script it predicts `after` (EOS by default). Counts evaluated tokens; honours the engine contract."""

    def __init__(self, script: bytes | list[int], n_ctx=64, after=EOS, delay=0.0):
        self.script = list(script)
        self.n_ctx, self.after, self.delay = n_ctx, after, delay
        self.seq: list[int] = []
        self.n_evaluated = 0
        self.calls: list[int] = []

    @property
    def n_past(self):
        return len(self.seq)

    def _next(self):
        start = None
        for i in range(len(self.seq) - 1, -1, -1):
            if self.seq[i] == GO:
                start = i + 1
                break
            if self.seq[i] == IM_START and self.seq[i + 1:i + 11] == list(b"assistant\n"):
                start = i + 11
                break
        j = len(self.seq) - start if start is not None else 0
        if j < len(self.script):
            return self.script[j]
        return self.after if self.after != "cycle" else self.script[j % len(self.script)]

    def _row(self):
        row = np.zeros(ByteTokenizer.n_vocab, dtype=np.float32)
        row[self._next()] = 20.0
        return row

    def forward(self, tokens, all_logits=False):
        if len(self.seq) + len(tokens) > self.n_ctx:
            raise ContextFullError("fake: full")
        if self.delay:
            time.sleep(self.delay)
        rows = []
        for t in tokens:
            self.seq.append(int(t))
            rows.append(self._row())
        self.n_evaluated += len(tokens)
        self.calls.append(len(tokens))
        return np.stack(rows) if all_logits else rows[-1]

    def truncate(self, n):
        del self.seq[n:]

    def reset(self):
        self.truncate(0)
