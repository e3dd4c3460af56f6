"""`llmrun.Llama`: a llama-cpp-python-shaped Python API. It loads a GGUF file, runs the generation loop
(generate.py) and shapes its events into OpenAI dicts (llama_types.py). The methods are grouped by concern: this
module holds loading, tokens, evaluation, adapters and the lock; the completions are api_completions.py's, their
generation plumbing api_generation.py's, embeddings api_embeddings.py's.

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
from typing import Any, Mapping, Sequence

import numpy as np

from . import api_args as args
from .api_completions import CompletionMethods
from .api_embeddings import EmbeddingMethods
from .api_generation import GenerationMethods
from .errors import ArgumentTypeError, LlmrunError
from .generate import CacheSlot, Generation, check_fits
from .gguf import GGUFReader
from .llama_compat import check_constructor_keywords
from .protocols import SequenceModel, TokenizerLike
from .safe_text import printable
from .text.chat_template import check_messages, encode_chat
from .text.tokenizer import Tokenizer
from .text.tool_calls import check_tools, describe_tools


class Llama(CompletionMethods, GenerationMethods, EmbeddingMethods):
    """A GGUF model ready to tokenize, evaluate and generate.

    ``llm = Llama("model.gguf", n_ctx=4096, n_threads=None, seed=None, vocab_only=False, verbose=False)``

    ``n_ctx=0`` uses the model's training context. ``seed`` seeds this object's random generator (calls with
    their own ``seed=`` use a fresh generator from that seed, so the same seed and settings give the same
    output; -1 means random, as in llama-cpp-python). ``vocab_only=True`` loads only the tokenizer.

    ``chat_format`` (a name from text/chat_formats.py, e.g. "chatml", "llama-3") or ``chat_template`` (Jinja
    text) replace the file's chat template. ``embedding=True`` is accepted (embeddings always work here);
    ``pooling_type`` (llama.cpp's enum or "mean"/"cls"/"last"/"none") overrides the file's pooling.
    ``type_k`` / ``type_v``: how the KV cache stores K and V, "f32", "f16" (the default: half the memory of f32,
    mean KL to float32 ~1e-6 on real models) or "q8_0" (a quarter; ~1e-3), or ggml's type numbers 0, 1, 8 as
    llama-cpp-python passes them (kernels/kv_formats.py). llama-cpp-python's GPU / batching / mmap keywords are accepted and ignored (a note under ``verbose``).
    See the module docstring for cache reuse, cancel and threading rules. Arguments of the wrong type raise
    ArgumentTypeError (a TypeError), impossible values InvalidArgumentError (a ValueError); both are
    LlmrunErrors.
    """

    def __init__(self, model_path: str | os.PathLike, *, n_ctx: int = 4096, n_threads: int | None = None,
                 seed: int | None = None, vocab_only: bool = False, verbose: bool = False,
                 lora_path: str | os.PathLike | None = None, lora_scale: float = 1.0, embedding: bool = False,
                 pooling_type: int | str | None = -1, chat_format: str | None = None,
                 chat_template: str | None = None, type_k: int | str | None = None,
                 type_v: int | str | None = None, **kwargs):
        notes = check_constructor_keywords(kwargs)
        self.model_path = args.path(model_path, "model_path")
        n_ctx = args.optional_integer(n_ctx, "n_ctx", lo=0, hi=1 << 32)
        n_threads = args.optional_integer(n_threads, "n_threads", lo=1)
        seed = args.seed(seed)
        vocab_only, verbose = args.flag(vocab_only, "vocab_only"), args.flag(verbose, "verbose")
        reader = GGUFReader(self.model_path)
        try:
            tokenizer = Tokenizer.from_metadata(reader.metadata)
            arch = reader.get("general.architecture", "llama")
            if n_ctx is None or n_ctx <= 0:
                n_ctx = reader.typed.get_int(f"{arch}.context_length", 4096, lo=1, hi=1 << 32)
            model = None
            if not vocab_only:
                from .engine.model import LlamaModel   # here: vocab_only never imports numba and the kernels
                model = LlamaModel.load(reader, n_ctx=n_ctx, n_threads=n_threads, type_k=type_k,
                                        type_v=type_v)
        except BaseException:
            reader.close()
            raise
        self._reader = reader   # stays open: the model's weights are views into its mmap
        self._setup(tokenizer, model, n_ctx, seed, verbose, os.path.basename(self.model_path))
        try:
            self._configure(embedding, pooling_type, reader.get(f"{arch}.pooling_type"), chat_format,
                            chat_template)
        except BaseException:
            self.close()
            raise
        if verbose:
            for note in notes:
                print(f"llmrun: {note}", file=sys.stderr)
        self.lora_path, self.lora_scale = lora_path, lora_scale   # llama-cpp-python's attributes
        if lora_path is not None:
            try:
                self.set_lora([(lora_path, lora_scale)])
            except BaseException:
                self.close()
                raise
        if verbose and model is not None:
            print(f"llmrun: loaded {printable(self._name)} in {model.load_seconds:.2f} s: weights "
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
        self._configure(False, -1, None, None, None)
        return self

    def _setup(self, tokenizer: TokenizerLike, model: SequenceModel | None, n_ctx: int, seed, verbose, name):
        self.tokenizer = tokenizer
        self._model = model
        self._slot = CacheSlot(0, int(n_ctx))    # the model's one KV cache and the tokens in it
        self._rng = np.random.default_rng(args.seed(seed))
        self.verbose = verbose
        self._name = name
        self._lock = threading.Lock()
        self._owner: int | None = None        # thread id holding the lock (to refuse same-thread re-entry)
        self._running: Generation | None = None
        # What the last prompt/generation cost; the chat command prints it, tests read it.
        self.last_timings: dict[str, float] = {}
        self._adapter_cache = None                    # engine.adapters.AdapterCache, made on first set_lora
        self.lora: list[tuple[str, float]] = []       # the active adapters, as given to set_lora

    def _configure(self, embedding, pooling_type, file_pooling, chat_format, chat_template) -> None:
        from .engine.pooling import pooling_name
        from .text.chat_formats import chat_format_template

        self.embedding = bool(embedding)
        given = pooling_type not in (None, -1)
        self.pooling = pooling_name(pooling_type if given else file_pooling)
        if chat_template is not None and chat_format is not None:
            raise LlmrunError("give chat_format or chat_template, not both")
        if chat_template is not None:
            if not isinstance(chat_template, str) or not chat_template.strip():
                raise LlmrunError("chat_template must be a non-empty Jinja template string")
            self.chat_template = chat_template
        elif chat_format is not None:
            self.chat_template = chat_format_template(chat_format)
        else:
            self.chat_template = self.tokenizer.chat_template   # None: ChatML

    # ---- small queries ---------------------------------------------------------------------------------
    def n_ctx(self) -> int:
        return self._slot.capacity

    def n_vocab(self) -> int:
        return int(self.tokenizer.n_vocab)

    def token_bos(self) -> int:
        return int(self.tokenizer.bos_id) if self.tokenizer.bos_id is not None else -1

    def token_eos(self) -> int:
        return int(self.tokenizer.eos_id) if self.tokenizer.eos_id is not None else -1

    def n_embd(self) -> int:
        return int(self._require_model().hparams.n_embd)

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
        text = args.text(text, "text")
        add_bos, special = args.flag(add_bos, "add_bos"), args.flag(special, "special")
        return list(self.tokenizer.encode(text, add_bos=None if add_bos else False, special=special))

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        tokens = args.token_ids(tokens, self.n_vocab())
        return bytes(self.tokenizer.decode(tokens, special=args.flag(special, "special")))

    # ---- evaluation ------------------------------------------------------------------------------------
    def eval_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 [len(tokens), n_vocab]: logits after each token of a fresh sequence starting at position 0."""
        tokens = args.token_ids(tokens, self.n_vocab())
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
            raise ArgumentTypeError("set_lora takes a list of (path, scale) pairs ([] for the base model)")
        items = []
        for item in adapters:
            if not (isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2):
                raise ArgumentTypeError(f"set_lora: {str(item)[:80]} is not a (path, scale) pair")
            path, scale = item
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                raise ArgumentTypeError(f"set_lora: the scale of {str(path)[:80]} is not a number "
                                        f"(got {args.describe_value(scale)})") from None
            if not np.isfinite(scale):
                raise LlmrunError(f"set_lora: scale of {path} must be finite, got {scale}")
            items.append((args.path(path, "set_lora path"), scale))
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

    # ---- chat prompts ----------------------------------------------------------------------------------
    def chat_tokens(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None, *, special_in_content: bool = False,
                    **template_vars: Any) -> list[int]:
        """The prompt tokens for a conversation (template rendered as transformers does). Only the template's
        own text is parsed for special tokens: message contents, tool definitions and other caller-given
        strings stay text, so a message cannot forge a turn (special_in_content=True parses them too, the
        old behaviour, for fully trusted input). `tools` (OpenAI's shape) and other keywords are template
        variables."""
        tok = self.tokenizer
        messages = check_messages(messages)
        if tools and "tools" not in (self.chat_template if isinstance(self.chat_template, str) else ""):
            messages = describe_tools(messages, check_tools(tools))   # the template would not show them
        ids = encode_chat(tok, messages, self.chat_template,
                          special_in_content=args.flag(special_in_content, "special_in_content"),
                          add_generation_prompt=args.flag(add_generation_prompt, "add_generation_prompt"),
                          bos_token=self._piece(tok.bos_id), eos_token=self._piece(tok.eos_id), tools=tools,
                          **template_vars)
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
