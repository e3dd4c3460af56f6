"""Generation events (generate.py) shaped into the pieces of OpenAI / llama-cpp-python results: the text and
log-probabilities of one choice, in the completion shape (llama-cpp-python's ``logprobs=N``) and the chat
shape (OpenAI's ``logprobs=True, top_logprobs=N``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .generate import Event, TokenLogprob, token_logprob


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="ignore")


@dataclass
class ChoiceLog:
    """What one choice produced: its text, finish reason, usage, and (when recorded) per-token logprobs."""
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None

    def add(self, event: Event) -> None:
        self.text.append(event.text)
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        if event.finish_reason is not None:
            self.finish_reason, self.usage = event.finish_reason, event.usage

    @property
    def content(self) -> str:
        return "".join(self.text)


def completion_logprobs(tokenizer, entries: list[TokenLogprob], *, text_offset: int = 0,
                        prompt: list[tuple[int, TokenLogprob | None]] = ()) -> dict[str, Any]:
    """llama-cpp-python's completion ``logprobs``: tokens, text_offset, token_logprobs, top_logprobs.

    ``prompt`` (echo): (token, logprob or None) for the prompt tokens first; the first has no logprob.
    Offsets count characters from the start of the returned text (plus ``text_offset``).
    """
    tokens, offsets, token_logprobs, tops = [], [], [], []
    offset = text_offset
    rows = [(t, lp) for t, lp in prompt] + [(e.token, e) for e in entries]
    for token, entry in rows:
        piece = _text(tokenizer.token_to_piece(token, special=False))
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        if entry is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(entry.logprob)
        top = {_text(tokenizer.token_to_piece(i, special=False)): lp for i, lp in entry.top}
        top.setdefault(piece, entry.logprob)
        tops.append(top)
    return {"tokens": tokens, "text_offset": offsets, "token_logprobs": token_logprobs, "top_logprobs": tops}


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        piece = tokenizer.token_to_piece(token, special=False)
        return {"token": _text(piece), "logprob": logprob, "bytes": list(piece)}
    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(i, lp) for i, lp in e.top]}
                        for e in entries],
            "refusal": None}


def prompt_logprobs(tokens: list[int], rows, top_n: int) -> list[tuple[int, TokenLogprob | None]]:
    """(token, its TokenLogprob given what precedes it) for each prompt token; the first gets None.
    ``rows[i]`` are the logits after token i."""
    return [(t, token_logprob(rows[i - 1], t, top_n) if i else None) for i, t in enumerate(tokens)]
