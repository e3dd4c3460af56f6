"""The model a server serves: weights loaded once, the tokenizer and the Llama API helpers over them, and the
batch engine (one KV cache per slot) the scheduler steps."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..completion_options import CompletionOptions
from ..generate import CacheSlot, Generation


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What /v1/models, /api/tags and /api/show say about the model."""
    name: str
    path: str
    size: int
    modified: float
    architecture: str
    n_params: int
    file_type: str
    n_ctx_train: int
    n_ctx: int
    n_vocab: int
    chat_template: str | None
    metadata: dict[str, Any]

    @property
    def digest(self) -> str:
        """Identifies the file (path, size and time; hashing a large file would delay the first request)."""
        return hashlib.sha256(f"{self.path}:{self.size}:{self.modified}".encode()).hexdigest()

    @property
    def parameter_size(self) -> str:
        n = self.n_params
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


class ModelHost:
    """Loads MODEL once (with its run-time LoRA adapters, if any); `llm` (tokenize, chat_tokens, embeddings) and
    `batch` (n_slots KV caches) share it."""

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int | None = None,
                 n_slots: int = 4, alias: str | None = None, loras: Sequence[tuple[str, float]] = ()):
        from ..api import Llama
        from ..engine.batch import SlotCaches
        from ..engine.model import LlamaModel
        from ..gguf import GGUFReader
        from ..gguf.describe import describe
        from ..text.tokenizer import Tokenizer

        path = Path(model_path)
        reader = GGUFReader(path)
        try:
            tokenizer = Tokenizer.from_metadata(reader.metadata)
            arch = str(reader.get("general.architecture", "llama"))
            n_ctx_train = int(reader.get(f"{arch}.context_length", 0) or 0)
            if not n_ctx or n_ctx <= 0:
                n_ctx = n_ctx_train or 4096
            model = LlamaModel.load(reader, n_ctx=n_ctx, n_threads=n_threads)
            facts = describe(reader)
        except BaseException:
            reader.close()
            raise
        self._reader = reader          # stays open: the weights are views into its mmap
        self.name = alias or path.name.removesuffix(".gguf")
        self.llm = Llama.from_parts(tokenizer, model, n_ctx=n_ctx, name=self.name)
        if loras:   # beside the shared weights, so every slot runs with them
            try:
                self.llm.set_lora(list(loras))
            except BaseException:
                reader.close()
                raise
        self.tokenizer = tokenizer
        self.model = model
        self.batch = SlotCaches(model, n_slots)
        self.n_ctx = int(n_ctx)
        stat = path.stat()
        self.info = ModelInfo(
            name=self.name, path=str(path.resolve()), size=stat.st_size, modified=stat.st_mtime,
            architecture=arch, n_params=int(facts["n_params"]), file_type=str(facts["file_type"] or "unknown"),
            n_ctx_train=n_ctx_train, n_ctx=self.n_ctx, n_vocab=int(tokenizer.n_vocab),
            chat_template=tokenizer.chat_template,
            metadata={k: v for k, v in facts["metadata"].items() if not isinstance(v, dict)})
        self.loaded_at = time.time()

    def close(self) -> None:
        self.model = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    # ---- what requests need --------------------------------------------------------------------------------
    def prompt_tokens(self, prompt: str | Sequence[int]) -> list[int]:
        return self.llm.prompt_tokens(prompt)

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        return self.llm.chat_tokens(messages)

    def generation(self, tokens: list[int], options: CompletionOptions) -> Generation:
        """The Python API's generation for `tokens` with `options` (every option it takes), not yet in a slot:
        the scheduler gives it one. Without a seed each request draws fresh randomness. Bad options raise
        LlmrunError here, before anything is queued."""
        if options.seed is None:
            options = dataclasses.replace(options, seed=int(np.random.SeedSequence().entropy % (1 << 63)))
        return self.llm.new_generation(tokens, options, CacheSlot(-1, self.n_ctx))
