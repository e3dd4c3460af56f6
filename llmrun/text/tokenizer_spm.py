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
        if text.isascii():
            start = list(range(n))
        else:
            start = []
            pos = 0
            while pos < n:
                start.append(pos)
                pos += _UTF8_LEN[text[pos] >> 4]
        count = len(start)
        # a truncated sequence at the very end is shortened, as in llama.cpp
        length = [b - a for a, b in zip(start, start[1:] + [n])]
        prev = list(range(-1, count - 1))
        nxt = list(range(1, count + 1))
        nxt[-1] = -1

        ids_get, scores = self._ids.get, self._scores
        heappush, heappop = heapq.heappush, heapq.heappop
        # queue entries: (-score, left, right, merged byte size); the min-heap pops the best score,
        # then the leftmost pair, like llama.cpp's comparator
        heap: list[tuple[float, int, int, int]] = []
        for i in range(1, count):
            s = start[i - 1]
            size = length[i - 1] + length[i]
            tid = ids_get(text[s:s + size])
            if tid is not None:
                heap.append((-scores[tid], i - 1, i, size))
        heapq.heapify(heap)

        while heap:
            _, left, right, size = heappop(heap)
            ll, lr = length[left], length[right]
            if ll == 0 or lr == 0 or ll + lr != size:
                continue  # stale: one side was merged since this pair was queued
            length[left] = size
            length[right] = 0
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
            # new candidate pairs on both sides of the merged symbol
            before = prev[left]
            if before >= 0:
                s = start[before]
                pair = length[before] + size
                tid = ids_get(text[s:s + pair])
                if tid is not None:
                    heappush(heap, (-scores[tid], before, left, pair))
            if after >= 0:
                s = start[left]
                pair = size + length[after]
                tid = ids_get(text[s:s + pair])
                if tid is not None:
                    heappush(heap, (-scores[tid], left, after, pair))

        out: list[int] = []
        byte_ids = self._byte_ids
        ids = self._ids
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
