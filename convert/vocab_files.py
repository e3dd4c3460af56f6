"""Reading a Hugging Face tokenizer folder's files for vocab.py: JSON files and values that may hold anything,
text files inside the folder, tokenizer_config.json's added tokens and llama.cpp's rule for added tokens that
look special."""
from __future__ import annotations

from pathlib import Path

from llmrun.errors import ConvertError

from .jsonfile import read_json_object
from .safepaths import inside



def read_json(path: Path) -> dict | None:
    return read_json_object(path) if path.is_file() else None


def json_object(value) -> dict:
    """A JSON value expected to be an object: itself, or {} for anything else (the file may hold anything)."""
    return value if isinstance(value, dict) else {}


def json_objects(value) -> list[dict]:
    """A JSON value expected to be a list of objects: its objects (other entries ignored)."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def read_text(path: Path, folder: Path) -> str:
    inside(path, folder)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read ({e})") from None


def does_token_look_special(text: str) -> bool:
    """Added tokens some models forget to flag as special (same rule as llama.cpp's converter)."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def added_tokens_decoder(hf_dir: Path, config: dict) -> dict[str, dict]:
    """tokenizer_config.json's added_tokens_decoder: {"<id>": {"content": ..., "special": ...}} (entries of
    another shape are skipped; a value that is not an object at all is an error)."""
    decoder = config.get("added_tokens_decoder")
    if decoder is None:
        return {}
    if not isinstance(decoder, dict):
        raise ConvertError(f"{hf_dir / 'tokenizer_config.json'}: added_tokens_decoder must be an object")
    return {k: v for k, v in decoder.items() if k.isdigit() and len(k) < 12 and isinstance(v, dict)}
