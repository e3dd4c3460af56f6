"""Turning generated token pieces into text that is safe to show: UTF-8 and stop strings.

Two things can make the text of the tokens generated so far unsafe to print yet:

* a multi-byte UTF-8 character split across tokens (byte-level BPE does this for emoji and CJK): its first
  bytes are held until the rest arrives;
* the beginning of a stop string ("\\nUser" when stop=["\\nUser:"]): text that could still turn into a stop
  string is held until it either completes (then it is dropped and generation ends) or cannot anymore.

So a stream never shows a broken character nor any part of a stop string.
"""
from __future__ import annotations

from typing import Iterable

from .tokenizer import Utf8Stream


def normalize_stop(stop: str | Iterable[str] | None) -> list[str]:
    """None, one string or a list of strings -> list of non-empty stop strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    return [s for s in stop if s]


class StopScanner:
    """Feed raw token pieces (bytes) in order; get back the text that may be emitted now."""

    def __init__(self, stop: str | Iterable[str] | None = None):
        self.stop = normalize_stop(stop)
        # Incomplete trailing characters are buffered; invalid bytes become U+FFFD instead of raising.
        self._utf8 = Utf8Stream()
        self._held = ""          # decoded text not yet emitted (a possible stop-string prefix)
        self.stopped = False     # a stop string was found; everything from it on is discarded

    def push(self, piece: bytes) -> str:
        if self.stopped:
            return ""
        self._held += self._utf8.feed(piece)
        return self._release()

    def flush(self) -> str:
        """Generation ended without a stop string: release everything, incl. an incomplete last character."""
        if self.stopped:
            return ""
        text = self._held + self._utf8.flush()
        self._held = ""
        return text

    def _release(self) -> str:
        text = self._held
        if not self.stop:
            self._held = ""
            return text
        # Earliest complete stop string wins; the text before it is the last we emit.
        hit = -1
        for s in self.stop:
            i = text.find(s)
            if i != -1 and (hit == -1 or i < hit):
                hit = i
        if hit != -1:
            self.stopped = True
            self._held = ""
            return text[:hit]
        # Hold back the longest tail that is a proper prefix of some stop string; any later match must start
        # inside that tail, because everything before it has already been ruled out.
        keep = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]
