"""Where the default model lives when a command gets no MODEL argument."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import LlmrunError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """$LLMRUN_MODEL if set, else <repo>/models/<default> beside the (editable) package, else a clear error."""
    env = os.environ.get("LLMRUN_MODEL")
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise LlmrunError(f"LLMRUN_MODEL points to {p}, which is not a file")
        return p
    p = Path(__file__).resolve().parents[2] / "models" / DEFAULT_MODEL_NAME
    if p.is_file():
        return p
    raise LlmrunError(f"no MODEL given and no default model at {p}: run `make model` or set LLMRUN_MODEL")


def resolve_model(model: str | os.PathLike | None) -> Path:
    return Path(model) if model else default_model_path()
