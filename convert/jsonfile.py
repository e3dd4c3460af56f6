"""Reading the small JSON files of HF checkpoints and PEFT adapters, with one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

from llmrun.errors import ConvertError


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; anything unreadable or not an object is a ConvertError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConvertError(f"{path}: cannot parse ({e})") from None
    return data
