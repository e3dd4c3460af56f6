"""SentencePiece-style vocabularies (GGUF ``tokenizer.ggml.model = "llama"``).

llama.cpp's algorithm (llm_tokenizer_spm): the text is cut into UTF-8 characters, then the
adjacent pair whose concatenation is the vocabulary token with the highest score is merged,
again and again (ties: leftmost first). Symbols that are not tokens at the end are emitted as
byte tokens ``<0xNN>``. Everything works on bytes, so any input (even invalid UTF-8) is handled.
"""
from __future__ import annotations

import heapq

SPACE_MARK = "\u2581".encode()  # "▁", SentencePiece's escaped space

# UTF-8 sequence length from the high nibble of the lead byte (continuation bytes count as 1)
_UTF8_LEN = (1,) * 12 + (2, 2, 3, 4)


class SpmEncoder:
    """Raw text (no special tokens in it) -> token ids for one SentencePiece vocabulary."""

    def __init__(self, token_to_id: dict[bytes, int], scores: list[float], unk_id: int | None):
        self._ids = token_to_id
        self._scores = scores
        self._byte_ids = [self._byte_token(b, unk_id) for b in range(256)]

    def _byte_token(self, b: int, unk_id: int | None) -> int | None:
        # llama.cpp byte_to_token: "<0xNN>", else the single byte as a token, else (ours) unknown
        tid = self._ids.get(b"<0x%02X>" % b)
        if tid is None:
            tid = self._ids.get(bytes([b]), unk_id)
        return tid

    def encode(self, text: bytes) -> list[int]:
        """``text`` is already space-escaped (" " -> "▁") and prefixed as the caller wants."""
        n = len(text)
        if n == 0:
            return []
        # symbols as parallel lists: start offset, byte length (0 = merged away), prev, next
        start: list[int] = []
        pos = 0
        while pos < n:
            start.append(pos)
            pos += _UTF8_LEN[text[pos] >> 4]
        count = len(start)
        length = [min(start[i + 1] if i + 1 < count else n, n) - start[i] for i in range(count)]
        prev = list(range(-1, count - 1))
        nxt = list(range(1, count + 1))
        nxt[-1] = -1

        ids, scores = self._ids, self._scores
        heap: list[tuple[float, int, int, int]] = []

        def push(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            s = start[left]
            size = length[left] + length[right]
            tid = ids.get(text[s:s + size])
            if tid is not None:
                # min-heap on (-score, left): best score first, then leftmost
                heapq.heappush(heap, (-scores[tid], left, right, size))

        for i in range(1, count):
            push(i - 1, i)

        while heap:
            _, left, right, size = heapq.heappop(heap)
            ll, lr = length[left], length[right]
            if ll == 0 or lr == 0 or ll + lr != size:
                continue  # stale: one side was merged since this pair was queued
            length[left] = size
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])

        out: list[int] = []
        byte_ids = self._byte_ids
        i = 0
        while i != -1:
            s = start[i]
            piece = text[s:s + length[i]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(t for t in (byte_ids[b] for b in piece) if t is not None)
            i = nxt[i]
        return out
