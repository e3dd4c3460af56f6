"""The model a server serves: weights loaded once, and `ServedLlama`, the Python API over them whose
generations the scheduler steps in its KV-cache slots (one batched forward for all running requests)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Sequence

from ..api import Llama
from .adapters import AdapterTable
from .runs import current_run, run_choices
from .scheduler import Scheduler


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


class ServedLlama(Llama):
    """`llmrun.Llama` whose completion calls run in the server: a call's generations (its n choices) go to the
    scheduler, which steps them beside every other request's; what needs the model outside the slots (prompt
    logprobs, embeddings) runs on the scheduler's thread between two steps. Everything else (parameters,
    checks, result shapes, tool calls, grammars) is the Python API's own."""

    scheduler: Scheduler | None = None

    def _run_choices(self, generations):
        return run_choices(self.scheduler, generations)

    def eval_logits(self, tokens):
        return self.scheduler.call(lambda: Llama.eval_logits(self, tokens), _run_adapters())

    def _hidden_states(self, model, tokens):
        return self.scheduler.call(lambda: Llama._hidden_states(self, model, tokens), _run_adapters())


def _run_adapters():
    run = current_run.get()
    return run.adapters if run is not None else None


class ModelHost:
    """Loads MODEL once (with its run-time LoRA adapters, if any: `adapters`): `llm` answers requests, `batch`
    holds the n_slots KV caches the scheduler steps, over the same weights."""

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int | None = None,
                 n_slots: int = 4, alias: str | None = None,
                 loras: Sequence[tuple[str, float] | tuple[str, float, str | None]] = (),
                 cache_types: tuple = (None, None)):
        from ..engine.batch import SlotCaches
        from ..gguf import GGUFReader
        from ..gguf.describe import describe

        path = Path(model_path)
        with GGUFReader(path) as reader:   # what the listings show (the Llama keeps its own reader)
            facts = describe(reader)
            arch = str(reader.get("general.architecture", "llama"))
            n_ctx_train = int(reader.get(f"{arch}.context_length", 0) or 0)
        self.llm = ServedLlama(path, n_ctx=n_ctx, n_threads=n_threads, type_k=cache_types[0],
                               type_v=cache_types[1])
        self.name = alias or path.name.removesuffix(".gguf")   # routes pass it as `model` to every call
        try:
            # (path, scale[, alias]): loaded and checked now; each request's configuration is installed by the
            # scheduler before the forward that steps it
            self.adapters = AdapterTable(self.llm._model, [(*spec, None)[:3] for spec in loras], self.name)
            self.model = self.llm._model
            self.batch = SlotCaches(self.model, n_slots)
        except BaseException:
            self.llm.close()
            raise
        self.n_ctx = self.llm.n_ctx()
        stat = path.stat()
        self.info = ModelInfo(
            name=self.name, path=str(path.resolve()), size=stat.st_size, modified=stat.st_mtime,
            architecture=arch, n_params=int(facts["n_params"]), file_type=str(facts["file_type"] or "unknown"),
            n_ctx_train=n_ctx_train, n_ctx=self.n_ctx, n_vocab=self.llm.n_vocab(),
            chat_template=self.llm.chat_template,
            metadata={k: v for k, v in facts["metadata"].items() if not isinstance(v, dict)})
        self.loaded_at = time.time()

    def attach(self, scheduler: Scheduler) -> None:
        self.llm.scheduler = scheduler

    def close(self) -> None:
        self.model = None
        self.llm.close()
