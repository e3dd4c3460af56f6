"""Reading the small JSON files of HF checkpoints and PEFT adapters, with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

from llmrun.errors import ConvertError

from .safepaths import inside

_MAX_JSON_BYTES = 1 << 29    # tokenizer.json files reach tens of MB; refuse what no checkpoint holds


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; anything unreadable or not an object is a ConvertError naming the file.
    The file must lie inside its folder (safepaths.py); nesting deep enough to exhaust the parser's stack
    is an error too."""
    path = Path(path)
    inside(path, path.parent)
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes is too large for a JSON file of a checkpoint")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except RecursionError:
        raise ConvertError(f"{path}: cannot parse (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path}: cannot parse ({e})") from None
    return data
