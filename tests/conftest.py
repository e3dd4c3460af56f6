"""Shared test fixtures: where the reference material and the default model live."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI clones main next to a copy of shared/; locally it is /work/shared. LLMRUN_SHARED overrides.
SHARED_DIR = Path(os.environ.get("LLMRUN_SHARED", REPO_ROOT.parent / "shared"))
FIXTURES_DIR = SHARED_DIR / "fixtures"
DEFAULT_MODEL = REPO_ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_MODEL = REPO_ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"   # `make gemma3`


def _require(path: Path) -> Path:
    # A missing fixture is a broken checkout, not a reason to skip: fail loudly.
    if not path.exists():
        raise FileNotFoundError(f"test input missing: {path} (run `make model` and `make gemma3`; shared/ must sit "
                                "beside the repo)")
    return path


@pytest.fixture(scope="session")
def quant_vectors():
    import numpy as np
    return np.load(_require(FIXTURES_DIR / "quant-vectors.npz"))


@pytest.fixture(scope="session")
def llama2_tokenizer_model() -> Path:
    return _require(FIXTURES_DIR / "llama2-tokenizer.model")


@pytest.fixture(scope="session")
def default_model() -> Path:
    return _require(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def gemma3_model() -> Path:
    return _require(GEMMA3_MODEL)
