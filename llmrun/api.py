"""`llmrun.Llama`: a llama-cpp-python-shaped Python API over the engine, the tokenizer and the samplers.

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
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .errors import ContextFullError, LlmrunError
from .text.stops import StopScanner
from .text.sampling import Sampler, SamplingParams

_PROMPT_CHUNK = 256   # prompt tokens per forward call: bounds memory and lets cancel() act between chunks


def _collect(run) -> tuple[str, str, dict]:
    parts, finish, usage = [], None, None
    for text, f, u in run:
        if f is None:
            parts.append(text)
        else:
            finish, usage = f, u
    return "".join(parts), finish, usage


class Llama:
    """A GGUF model ready to tokenize, evaluate and generate.

    ``llm = Llama("model.gguf", n_ctx=4096, n_threads=None, seed=None, vocab_only=False, verbose=False)``

    ``n_ctx=0`` uses the model's training context. ``seed`` seeds this object's random generator (calls with
    their own ``seed=`` use a fresh generator from that seed, so the same seed and settings give the same
    output). ``vocab_only=True`` loads only the tokenizer. See the module docstring for cache reuse, cancel
    and threading rules.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int | None = None, vocab_only: bool = False, verbose: bool = False):
        from .gguf import GGUFReader
        from .text.tokenizer import Tokenizer

        self.model_path = str(model_path)
        reader = GGUFReader(model_path)
        try:
            tokenizer = Tokenizer.from_metadata(reader.metadata)
            if n_ctx is None or n_ctx <= 0:
                arch = reader.get("general.architecture", "llama")
                n_ctx = int(reader.get(f"{arch}.context_length", 4096))
            model = None
            if not vocab_only:
                from .engine.model import LlamaModel
                model = LlamaModel.load(reader, n_ctx=n_ctx, n_threads=n_threads)
        except BaseException:
            reader.close()
            raise
        self._reader = reader   # stays open: the model's weights are views into its mmap
        self._setup(tokenizer, model, n_ctx, seed, verbose, os.path.basename(self.model_path))
        if verbose and model is not None:
            print(f"llmrun: loaded {self._name} in {model.load_seconds:.2f} s: weights "
                  f"{model.weights_nbytes / 2**20:.0f} MiB, KV cache {model.kv_nbytes / 2**20:.0f} MiB "
                  f"for {n_ctx} tokens", file=sys.stderr)

    @classmethod
    def from_parts(cls, tokenizer, model, *, n_ctx: int | None = None, seed: int | None = None,
                   name: str = "model", verbose: bool = False) -> "Llama":
        """A Llama over an already-built tokenizer and model (any objects with their interfaces)."""
        self = cls.__new__(cls)
        self.model_path = name
        self._reader = None
        self._setup(tokenizer, model, n_ctx if n_ctx is not None else getattr(model, "n_ctx", 0),
                    seed, verbose, name)
        return self

    def _setup(self, tokenizer, model, n_ctx, seed, verbose, name):
        self.tokenizer = tokenizer
        self._model = model
        self._n_ctx = int(n_ctx)
        self._rng = np.random.default_rng(seed)
        self.verbose = verbose
        self._name = name
        self._cached: list[int] = []          # tokens whose K/V sit in the model's cache, in order
        self._lock = threading.Lock()
        self._owner: int | None = None        # thread id holding the lock (to refuse same-thread re-entry)
        self._cancel: threading.Event | None = None
        # What the last prompt/generation cost; the chat command prints it, tests read it.
        self.last_timings: dict[str, float] = {}

    # ---- small queries ---------------------------------------------------------------------------------
    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return int(self.tokenizer.n_vocab)

    def token_bos(self) -> int:
        return int(self.tokenizer.bos_id) if self.tokenizer.bos_id is not None else -1

    def token_eos(self) -> int:
        return int(self.tokenizer.eos_id) if self.tokenizer.eos_id is not None else -1

    @property
    def n_cached(self) -> int:
        """Tokens currently held in the KV cache (reused by the next prompt sharing that prefix)."""
        return len(self._cached)

    def close(self) -> None:
        """Drop the weights and the file mapping (waits for a running generation on another thread)."""
        with self._exclusive():
            self._model = None
            self._cached = []
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
        self._check_fits(len(tokens))
        with self._exclusive():
            model = self._require_model()
            try:
                model.reset()
                self._cached = []
                out = np.asarray(model.forward(tokens, all_logits=True), dtype=np.float32)
                self._cached = list(tokens)
            except BaseException:
                self._drop_cache()
                raise
        return out.reshape(len(tokens), -1)

    def cancel(self) -> None:
        """Stop the generation running right now (thread-safe). It ends with finish_reason "cancelled"."""
        ev = self._cancel
        if ev is not None:
            ev.set()

    # ---- completions -----------------------------------------------------------------------------------
    def create_completion(self, prompt: str | bytes | Sequence[int], max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                          repeat_penalty: float = 1.0, stop: str | Sequence[str] | None = None,
                          seed: int | None = None, stream: bool = False, *, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, repeat_last_n: int = 64):
        """OpenAI-shaped text completion (dict), or an iterator of chunks with stream=True.

        `max_tokens` None or <= 0 means "until end of generation or the context is full".
        """
        tokens = self._prompt_tokens(prompt)
        sampler = self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, frequency_penalty,
                                presence_penalty, repeat_last_n, seed)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        run = self._run(tokens, sampler, max_tokens, stop)

        def chunk(text, finish):
            return {"id": cid, "object": "text_completion", "created": created, "model": self._name,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if stream:
            def chunks():
                for text, finish, _ in run:
                    yield chunk(text if finish is None else "", finish)
            return chunks()

        text, finish, usage = _collect(run)
        out = chunk(text, finish)
        out["usage"] = usage
        return out

    __call__ = create_completion

    def create_chat_completion(self, messages: Sequence[Mapping[str, Any]], max_tokens: int | None = None,
                               temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40,
                               min_p: float = 0.05, repeat_penalty: float = 1.0,
                               stop: str | Sequence[str] | None = None, seed: int | None = None,
                               stream: bool = False, *, frequency_penalty: float = 0.0,
                               presence_penalty: float = 0.0, repeat_last_n: int = 64):
        """OpenAI-shaped chat completion using the model's chat template (ChatML if the file has none)."""
        tokens = self.chat_tokens(messages)
        sampler = self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, frequency_penalty,
                                presence_penalty, repeat_last_n, seed)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        run = self._run(tokens, sampler, max_tokens, stop)

        if stream:
            def chunks():
                def chunk(delta, finish):
                    return {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": self._name,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                yield chunk({"role": "assistant"}, None)
                for text, finish, _ in run:
                    yield chunk({"content": text} if finish is None else {}, finish)
            return chunks()

        text, finish, usage = _collect(run)
        return {"id": cid, "object": "chat.completion", "created": created, "model": self._name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage}

    def chat_tokens(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt tokens for a conversation (template rendered, special tokens parsed)."""
        from .text.chat_template import render_chat

        tok = self.tokenizer
        text = render_chat(messages, getattr(tok, "chat_template", None),
                           add_generation_prompt=add_generation_prompt,
                           bos_token=self._piece(tok.bos_id), eos_token=self._piece(tok.eos_id))
        ids = list(tok.encode(text, add_bos=False, special=True))
        # Templates usually write {{ bos_token }} themselves; add it only when the model wants one and the
        # template did not (never two).
        if getattr(tok, "add_bos", False) and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
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

    def _sampler(self, temperature, top_k, top_p, min_p, repeat_penalty, frequency_penalty, presence_penalty,
                 repeat_last_n, seed) -> Sampler:
        params = SamplingParams(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                                min_p=float(min_p), repeat_penalty=float(repeat_penalty),
                                repeat_last_n=int(repeat_last_n), frequency_penalty=float(frequency_penalty),
                                presence_penalty=float(presence_penalty))
        # A call's own seed restarts the randomness; otherwise this Llama's generator continues.
        return Sampler(params, rng=np.random.default_rng(seed) if seed is not None else self._rng)

    def _require_model(self):
        if self._model is None:
            raise LlmrunError(f"{self.model_path}: loaded with vocab_only=True (or closed): no weights to evaluate")
        return self._model

    def _check_fits(self, n: int) -> None:
        if n > self._n_ctx:
            raise ContextFullError(f"the prompt has {n} tokens but the context window holds {self._n_ctx} "
                                   f"(use a larger n_ctx or a shorter prompt)")

    def _drop_cache(self) -> None:
        # After an interrupted forward the cache content is unknown: start clean next time.
        self._cached = []
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

    def _ingest(self, tokens: list[int], cancel: threading.Event) -> np.ndarray | None:
        """Bring the cache to `tokens` reusing the common prefix; logits after the last token (None if cancelled)."""
        model = self._require_model()
        n = 0
        for a, b in zip(self._cached, tokens):
            if a != b:
                break
            n += 1
        if n == len(tokens):
            n -= 1                       # the last token must be evaluated again to get its logits
        try:
            if n < model.n_past:
                kept = model.truncate(n)
                if isinstance(kept, int) and kept < n:
                    n = kept             # a sliding-window cache could not keep that prefix: evaluate it again
            self._cached = self._cached[:n]
            logits = None
            for i in range(n, len(tokens), _PROMPT_CHUNK):
                if cancel.is_set():
                    return None
                part = tokens[i:i + _PROMPT_CHUNK]
                logits = model.forward(part)
                self._cached.extend(part)
        except BaseException:
            self._drop_cache()
            raise
        self.last_timings.update(n_prompt=len(tokens), n_prompt_eval=len(tokens) - n, n_prompt_reused=n)
        return logits

    def _run(self, tokens: list[int], sampler: Sampler, max_tokens: int | None, stop) -> Iterator[tuple]:
        """The token loop. Yields (text, None, None) per piece of safe text, then ("", finish_reason, usage).

        A generator: the lock is taken at the first next() and released when it ends or is closed.
        """
        if not tokens:
            raise LlmrunError("the prompt is empty (no tokens)")
        self._require_model()
        self._check_fits(len(tokens))
        limit = max_tokens if max_tokens is not None and max_tokens > 0 else None
        eog = frozenset(int(t) for t in getattr(self.tokenizer, "eog_ids", ()) or ())
        if not eog and self.tokenizer.eos_id is not None:
            eog = frozenset([int(self.tokenizer.eos_id)])

        def loop():
            with self._exclusive():
                cancel = threading.Event()
                self._cancel = cancel
                try:
                    yield from self._loop(tokens, sampler, limit, stop, eog, cancel)
                finally:
                    self._cancel = None
        return loop()

    def _loop(self, tokens, sampler, limit, stop, eog, cancel):
        model = self._model
        self.last_timings = {"n_gen": 0}
        t0 = time.perf_counter()
        logits = self._ingest(tokens, cancel)
        t1 = time.perf_counter()
        self.last_timings["t_prompt"] = t1 - t0
        scanner = StopScanner(stop)
        history = list(tokens)
        n_gen, finish = 0, None
        try:
            while finish is None:
                if cancel.is_set() or logits is None:
                    finish = "cancelled"
                    break
                tok = sampler.sample(np.asarray(logits, dtype=np.float32).reshape(-1), history)
                if tok in eog:
                    finish = "stop"
                    break
                n_gen += 1
                self.last_timings["n_gen"] = n_gen
                history.append(tok)
                text = scanner.push(self.tokenizer.token_to_piece(tok, special=False))
                if text:
                    yield text, None, None
                if scanner.stopped:
                    finish = "stop"
                elif limit is not None and n_gen >= limit:
                    finish = "length"
                elif len(self._cached) + 1 > self._n_ctx:
                    finish = "length"      # no room to evaluate this token and predict another
                else:
                    try:
                        logits = model.forward([tok])
                    except BaseException:
                        self._drop_cache()
                        raise
                    self._cached.append(tok)
            tail = scanner.flush()
            if tail:
                yield tail, None, None
        finally:
            t2 = time.perf_counter()
            self.last_timings.update(t_gen=t2 - t1, n_gen=n_gen)
            if self.verbose:
                self._print_timings()
        usage = {"prompt_tokens": len(tokens), "completion_tokens": n_gen, "total_tokens": len(tokens) + n_gen}
        yield "", finish, usage

    def _print_timings(self) -> None:
        t = self.last_timings
        pe, tp = t.get("n_prompt_eval", 0), t.get("t_prompt", 0.0)
        ng, tg = t.get("n_gen", 0), t.get("t_gen", 0.0)
        print(f"llmrun: prompt {t.get('n_prompt', 0)} tokens ({t.get('n_prompt_reused', 0)} reused, "
              f"{pe} evaluated in {tp * 1e3:.0f} ms, {pe / tp if tp > 0 else 0:.1f} tok/s); "
              f"generated {ng} tokens in {tg * 1e3:.0f} ms ({ng / tg if tg > 0 else 0:.1f} tok/s)",
              file=sys.stderr)
