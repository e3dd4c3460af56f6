"""Text from files shown on a terminal: control characters escaped, so that a model's name, a metadata key or
an error message cannot move the cursor, clear the screen or write the clipboard (ESC ] 52 ; ...)."""
from __future__ import annotations

import unicodedata

# controls, format characters (bidi overrides, zero-width), lone surrogates (undecodable file bytes) and the
# Unicode line/paragraph separators
_UNSAFE = frozenset(["Cc", "Cf", "Cs", "Zl", "Zp"])
_SHORT = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:       # surrogateescape'd byte of a file that was not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str, keep: str = "") -> str:
    """`text` with every control/format character written as \\xNN / \\uNNNN (repr style), except those in
    `keep`. The result is one line unless `keep` holds a newline."""
    if text.isprintable() and not keep:
        return text
    return "".join(_escape(c) if c not in keep and unicodedata.category(c) in _UNSAFE else c for c in text)


def terminal_text(text: str) -> str:
    """Generated text for a terminal: newlines and tabs kept, every other control character escaped."""
    return printable(text, keep="\n\t")
