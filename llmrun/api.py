"""`llmrun.Llama`: a llama-cpp-python-shaped Python API. It loads a GGUF file, runs the generation loop
(generate.py) and shapes its events into OpenAI dicts (llama_types.py).

Behaviour worth knowing (also in the class docstring):

* KV-cache reuse: the tokens of the last evaluation stay cached; a new prompt only evaluates what follows the
  longest common prefix. A chat therefore never re-processes earlier turns.
* Context full: generation ends with finish_reason "length"; a prompt that does not fit at all raises
  ContextFullError.
* Cancel: `cancel()` may be called from any thread; the generation running at that moment stops before its
  next token with finish_reason "cancelled" (a stream gets a last chunk with that reason, like a server
  closing a request). A cancel while nothing runs is a no-op.
* Threads: one Llama runs one evaluation at a time (a lock; callers from other threads wait). Use one Llama
  per thread for parallel work; nothing mutable is shared between Llama objects.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .completion_options import CompletionOptions, takes_options
from .errors import LlmrunError
from .generate import CacheSlot, Event, Generation, PerSlotModels, check_fits, generate
from .gguf import GGUFReader
from .llama_types import (ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, CompletionUsage,
                          FinishReason)
from .protocols import SequenceModel, TokenizerLike
from .text.chat_template import render_chat
from .text.sampling import Sampler
from .text.tokenizer import Tokenizer


def _pieces(events: Iterable[Event]) -> Iterator[tuple[str, FinishReason | None]]:
    """(text, None) for each piece of text to show, then ("", finish_reason) once."""
    for event in events:
        if event.text:
            yield event.text, None
        if event.finish_reason is not None:
            yield "", event.finish_reason


def _collect(events: Iterable[Event]) -> tuple[str, FinishReason, CompletionUsage]:
    parts, last = [], None
    for event in events:
        parts.append(event.text)
        last = event
    return "".join(parts), last.finish_reason, last.usage


class Llama:
    """A GGUF model ready to tokenize, evaluate and generate.

    ``llm = Llama("model.gguf", n_ctx=4096, n_threads=None, seed=None, vocab_only=False, verbose=False)``

    ``n_ctx=0`` uses the model's training context. ``seed`` seeds this object's random generator (calls with
    their own ``seed=`` use a fresh generator from that seed, so the same seed and settings give the same
    output). ``vocab_only=True`` loads only the tokenizer. See the module docstring for cache reuse, cancel
    and threading rules.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int | None = None, vocab_only: bool = False, verbose: bool = False,
                 lora_path: str | os.PathLike | None = None, lora_scale: float = 1.0):
        self.model_path = str(model_path)
        reader = GGUFReader(model_path)
        try:
            tokenizer = Tokenizer.from_metadata(reader.metadata)
            if n_ctx is None or n_ctx <= 0:
                arch = reader.get("general.architecture", "llama")
                n_ctx = int(reader.get(f"{arch}.context_length", 4096))
            model = None
            if not vocab_only:
                from .engine.model import LlamaModel   # here: vocab_only never imports numba and the kernels
                model = LlamaModel.load(reader, n_ctx=n_ctx, n_threads=n_threads)
        except BaseException:
            reader.close()
            raise
        self._reader = reader   # stays open: the model's weights are views into its mmap
        self._setup(tokenizer, model, n_ctx, seed, verbose, os.path.basename(self.model_path))
        self.lora_path, self.lora_scale = lora_path, lora_scale   # llama-cpp-python's attributes
        if lora_path is not None:
            try:
                self.set_lora([(lora_path, lora_scale)])
            except BaseException:
                self.close()
                raise
        if verbose and model is not None:
            print(f"llmrun: loaded {self._name} in {model.load_seconds:.2f} s: weights "
                  f"{model.weights_nbytes / 2**20:.0f} MiB, KV cache {model.kv_nbytes / 2**20:.0f} MiB "
                  f"for {n_ctx} tokens", file=sys.stderr)

    @classmethod
    def from_parts(cls, tokenizer: TokenizerLike, model: SequenceModel | None, *, n_ctx: int | None = None,
                   seed: int | None = None, name: str = "model", verbose: bool = False) -> "Llama":
        """A Llama over an already-built tokenizer and model (any objects with the interfaces in protocols.py;
        model None: vocab only). n_ctx defaults to the model's."""
        self = cls.__new__(cls)
        self.model_path = name
        self._reader = None
        if n_ctx is None:
            n_ctx = model.n_ctx if model is not None else 0
        self._setup(tokenizer, model, n_ctx, seed, verbose, name)
        return self

    def _setup(self, tokenizer: TokenizerLike, model: SequenceModel | None, n_ctx: int, seed, verbose, name):
        self.tokenizer = tokenizer
        self._model = model
        self._slot = CacheSlot(0, int(n_ctx))    # the model's one KV cache and the tokens in it
        self._rng = np.random.default_rng(seed)
        self.verbose = verbose
        self._name = name
        self._lock = threading.Lock()
        self._owner: int | None = None        # thread id holding the lock (to refuse same-thread re-entry)
        self._running: Generation | None = None
        # What the last prompt/generation cost; the chat command prints it, tests read it.
        self.last_timings: dict[str, float] = {}
        self._adapter_cache = None                    # engine.adapters.AdapterCache, made on first set_lora
        self.lora: list[tuple[str, float]] = []       # the active adapters, as given to set_lora

    # ---- small queries ---------------------------------------------------------------------------------
    def n_ctx(self) -> int:
        return self._slot.capacity

    def n_vocab(self) -> int:
        return int(self.tokenizer.n_vocab)

    def token_bos(self) -> int:
        return int(self.tokenizer.bos_id) if self.tokenizer.bos_id is not None else -1

    def token_eos(self) -> int:
        return int(self.tokenizer.eos_id) if self.tokenizer.eos_id is not None else -1

    @property
    def n_cached(self) -> int:
        """Tokens currently held in the KV cache (reused by the next prompt sharing that prefix)."""
        return len(self._slot.tokens)

    def close(self) -> None:
        """Drop the weights and the file mapping (waits for a running generation on another thread)."""
        with self._exclusive():
            self._model = None
            self._slot.clear()
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- tokens ----------------------------------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of `text`. As in llama-cpp-python, add_bos=True adds BOS only if the model asks for it
        (GGUF `tokenizer.ggml.add_bos_token`); add_bos=False never adds it."""
        return list(self.tokenizer.encode(text, add_bos=None if add_bos else False, special=special))

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return bytes(self.tokenizer.decode(list(tokens), special=special))

    # ---- evaluation ------------------------------------------------------------------------------------
    def eval_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 [len(tokens), n_vocab]: logits after each token of a fresh sequence starting at position 0."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return np.zeros((0, self.n_vocab()), dtype=np.float32)
        check_fits(len(tokens), self._slot.capacity)
        with self._exclusive():
            model = self._require_model()
            try:
                model.reset()
                self._slot.clear()
                out = np.asarray(model.forward(tokens, all_logits=True), dtype=np.float32)
                self._slot.tokens.extend(tokens)
            except BaseException:
                self._drop_cache()
                raise
        return out.reshape(len(tokens), -1)

    # ---- adapters --------------------------------------------------------------------------------------
    def set_lora(self, adapters: Sequence[tuple[str | os.PathLike, float]]) -> None:
        """Replace the active LoRA adapters with [(path, scale), ...]: GGUF LoRA files or PEFT adapter folders,
        applied beside the base weights (which stay loaded as they are); [] is exactly the base. Each adapter
        is loaded once and cached. All are checked against the model before anything changes. The KV cache
        is emptied: it was computed with the previous weights."""
        if isinstance(adapters, (str, bytes, os.PathLike)) or not isinstance(adapters, Sequence):
            raise LlmrunError("set_lora takes a list of (path, scale) pairs ([] for the base model)")
        items = []
        for item in adapters:
            if not (isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2):
                raise LlmrunError(f"set_lora: {item!r} is not a (path, scale) pair")
            path, scale = item
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                raise LlmrunError(f"set_lora: scale {scale!r} of {path} is not a number") from None
            if not np.isfinite(scale):
                raise LlmrunError(f"set_lora: scale of {path} must be finite, got {scale}")
            items.append((os.fspath(path), scale))
        with self._exclusive():
            model = self._require_model()
            if not hasattr(model, "matrix_groups"):
                raise LlmrunError(f"{self._name}: this model takes no LoRA adapters")
            from .engine import adapters as lora
            if self._adapter_cache is None:
                self._adapter_cache = lora.AdapterCache()
            loaded = [(self._adapter_cache.get(path, model), scale) for path, scale in items]
            side_paths = lora.build_side_paths(model, loaded)
            lora.install(model, side_paths)
            self._drop_cache()
            self.lora = items

    def cancel(self) -> None:
        """Stop the generation running right now (thread-safe). It ends with finish_reason "cancelled"."""
        running = self._running
        if running is not None:
            running.cancel()

    # ---- completions -----------------------------------------------------------------------------------
    @takes_options()
    def create_completion(self, prompt: str | bytes | Sequence[int], options: CompletionOptions
                          ) -> Completion | Iterator[CompletionChunk]:
        """OpenAI-shaped text completion (dict), or an iterator of chunks with stream=True.

        The keywords are CompletionOptions' fields (see the signature). `max_tokens` None or <= 0 means
        "until end of generation or the context is full".
        """
        events = self._events(self._prompt_tokens(prompt), options)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish: FinishReason | None) -> CompletionChunk:
            return {"id": cid, "object": "text_completion", "created": created, "model": self._name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if options.stream:
            return (chunk(text, finish) for text, finish in _pieces(events))
        text, finish, usage = _collect(events)
        return {**chunk(text, finish), "usage": usage}

    __call__ = create_completion

    @takes_options(max_tokens=None, temperature=0.2)
    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]], options: CompletionOptions
                               ) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        """OpenAI-shaped chat completion using the model's chat template (ChatML if the file has none).

        The keywords are create_completion's, with other defaults for max_tokens and temperature.
        """
        events = self._events(self.chat_tokens(messages), options)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if options.stream:
            def chunks() -> Iterator[ChatCompletionChunk]:
                def chunk(delta, finish):
                    return {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": self._name,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                yield chunk({"role": "assistant"}, None)
                for text, finish in _pieces(events):
                    yield chunk({"content": text} if finish is None else {}, finish)
            return chunks()

        text, finish, usage = _collect(events)
        return {"id": cid, "object": "chat.completion", "created": created, "model": self._name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage}

    def chat_tokens(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt tokens for a conversation (template rendered, special tokens parsed)."""
        tok = self.tokenizer
        text = render_chat(messages, tok.chat_template, add_generation_prompt=add_generation_prompt,
                           bos_token=self._piece(tok.bos_id), eos_token=self._piece(tok.eos_id))
        ids = list(tok.encode(text, add_bos=False, special=True))
        # Templates usually write {{ bos_token }} themselves; add it only when the model wants one and the
        # template did not (never two).
        if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
            ids.insert(0, int(tok.bos_id))
        return ids

    # ---- internals -------------------------------------------------------------------------------------
    def _piece(self, token_id) -> str:
        if token_id is None or token_id < 0:
            return ""
        return self.tokenizer.token_to_piece(int(token_id), special=True).decode("utf-8", errors="replace")

    def _prompt_tokens(self, prompt) -> list[int]:
        if isinstance(prompt, (str, bytes)):
            # Like llama-cli: BOS as the model asks, and control tokens written in the prompt are parsed.
            return list(self.tokenizer.encode(prompt, add_bos=None, special=True))
        return [int(t) for t in prompt]

    def _events(self, tokens: list[int], options: CompletionOptions) -> Iterator[Event]:
        """The events of one generation. Bad input raises now; the lock is taken at the first next() and
        released when the generator ends or is closed."""
        # A call's own seed restarts the randomness; otherwise this Llama's generator continues.
        rng = np.random.default_rng(options.seed) if options.seed is not None else self._rng
        sampler = Sampler(options.sampling_params(), rng=rng)
        self._require_model()
        gen = Generation(tokens, self._slot, self.tokenizer, sampler, stop=options.stop,
                         max_tokens=options.max_tokens)

        def run():
            with self._exclusive():
                self._running = gen
                self.last_timings = gen.timings
                try:
                    yield from generate(PerSlotModels([self._require_model()]), gen)
                finally:
                    self._running = None
                    gen.close()
                    if self.verbose:
                        self._print_timings()
        return run()

    def _require_model(self) -> SequenceModel:
        if self._model is None:
            raise LlmrunError(f"{self.model_path}: loaded with vocab_only=True (or closed): no weights to evaluate")
        return self._model

    def _drop_cache(self) -> None:
        # After an interrupted forward the cache content is unknown: start clean next time.
        self._slot.clear()
        if self._model is not None:
            self._model.reset()

    class _Exclusive:
        def __init__(self, llm):
            self.llm = llm

        def __enter__(self):
            llm = self.llm
            if llm._owner == threading.get_ident():
                raise LlmrunError("this Llama is already busy in this thread (an unfinished stream?): "
                                  "exhaust or close it first, or use another Llama object")
            llm._lock.acquire()
            llm._owner = threading.get_ident()

        def __exit__(self, *exc):
            self.llm._owner = None
            self.llm._lock.release()

    def _exclusive(self):
        return Llama._Exclusive(self)

    def _print_timings(self) -> None:
        t = self.last_timings
        pe, tp = t.get("n_prompt_eval", 0), t.get("t_prompt", 0.0)
        ng, tg = t.get("n_gen", 0), t.get("t_gen", 0.0)
        print(f"llmrun: prompt {t.get('n_prompt', 0)} tokens ({t.get('n_prompt_reused', 0)} reused, "
              f"{pe} evaluated in {tp * 1e3:.0f} ms, {pe / tp if tp > 0 else 0:.1f} tok/s); "
              f"generated {ng} tokens in {tg * 1e3:.0f} ms ({ng / tg if tg > 0 else 0:.1f} tok/s)",
              file=sys.stderr)
