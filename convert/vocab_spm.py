"""A SentencePiece ``tokenizer.model`` (plus added tokens) -> the GGUF "llama" vocabulary's tokens, scores and
types, as llama.cpp's converter builds them (_set_vocab_sentencepiece)."""
from __future__ import annotations

import logging
from pathlib import Path

from llmrun.errors import ConvertError
from llmrun.gguf.metadata import is_integer, parse_bool
from llmrun.text.tokenizer import TokenType

from .safepaths import inside
from .vocab_files import added_tokens_decoder, does_token_look_special, read_json

log = logging.getLogger("convert.vocab")



def sentencepiece_vocab(hf_dir: Path, n_vocab: int | None, flavor: str = "llama"):
    from sentencepiece import SentencePieceProcessor

    path = inside(hf_dir / "tokenizer.model", hf_dir)
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except Exception as e:  # sentencepiece raises OSError or RuntimeError depending on the damage
        raise ConvertError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0] if str(e) else e})") from None
    sp_size = sp.vocab_size()
    vocab_size = n_vocab or sp_size
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    if sp_size > vocab_size:
        log.warning("%s: %d pieces but vocab_size is %d, extra pieces dropped", path, sp_size, vocab_size)
    for i in range(min(sp_size, vocab_size)):
        if sp.IsUnknown(i):
            t = TokenType.UNKNOWN
        elif sp.IsControl(i):
            t = TokenType.CONTROL
        elif sp.IsUnused(i):
            t = TokenType.UNUSED
        elif sp.IsByte(i):
            t = TokenType.BYTE
        else:
            t = TokenType.NORMAL
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), int(t)

    added = read_json(hf_dir / "added_tokens.json") or {}
    for text, tid in added.items():
        if is_integer(tid) and 0 <= tid < vocab_size:
            tokens[tid], scores[tid], types[tid] = text, -1000.0, int(TokenType.USER_DEFINED)
    config = read_json(hf_dir / "tokenizer_config.json") or {}
    entries = list(added_tokens_decoder(hf_dir, config).items())
    if flavor == "phi3":   # llama.cpp's Phi-3 converter also reads tokenizer.json's added tokens
        tj = read_json(hf_dir / "tokenizer.json") or {}
        listed = tj.get("added_tokens") if isinstance(tj.get("added_tokens"), list) else []
        entries += [(str(a.get("id")), a) for a in listed if isinstance(a, dict) and is_integer(a.get("id"))]
    for key, data in entries:
        tid, text = int(key), data.get("content")
        if not isinstance(text, str) or not 0 <= tid < vocab_size:
            continue
        if flavor == "phi3":   # taken as written: control if special, else user-defined
            types[tid] = int(TokenType.CONTROL if parse_bool(data.get("special")) else TokenType.USER_DEFINED)
        elif parse_bool(data.get("special")) or does_token_look_special(text):
            types[tid] = int(TokenType.CONTROL)
        else:
            text = text.replace("\u2581", " ")  # user-defined tokens are matched pre-normalized
            types[tid] = int(TokenType.USER_DEFINED)
        tokens[tid], scores[tid] = text, -1000.0
    return tokens, scores, types
