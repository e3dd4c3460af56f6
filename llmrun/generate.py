"""The generation loop: from a prompt to events (token, text piece, finish reason, usage), for one sequence or
for several stepped together.

* `CacheSlot`: one KV-cache sequence of a BatchModel and the tokens it holds, in order. A new prompt only
  evaluates what follows the longest prefix it shares with them (so a chat never re-processes old turns).
* `Generation`: one sequence being generated (a request's state): its prompt, slot, sampler, stop strings,
  token limit, optional TokenMask, and its progress. `cancel()` may be called from any thread.
* `step(model, generations)`: advance every unfinished generation by one token (or one prompt chunk) with
  ONE `model.forward_batch` call, and return the events of that step. A server with continuous batching
  steps its running requests like this, adding and dropping generations between steps.
* `generate(model, *generations)`: step them until all are finished, yielding the events.
* `PerSlotModels`: the BatchModel shape over single-cache engines, one per slot (protocols.py tells why).

One generation in one step: cancelled -> finish "cancelled". Prompt tokens left -> feed the next chunk.
Otherwise pick a token from the last logits (logit bias, logits processors, token mask, then the sampler;
with `logprobs` set, the log-softmax of the raw logits is recorded first, before any of those). An
end-of-generation token finishes with "stop" (it is not counted and has no text). Any other token's text
goes through the StopScanner (text/stops.py, so no partial stop string or split character is ever shown);
a stop string, a stopping criterion, max_tokens or a full slot finish the generation, else the token is fed
to get the next logits.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .errors import ArgumentTypeError, ContextFullError, LlmrunError, ModelError
from .llama_types import CompletionUsage, FinishReason
from .protocols import BatchItem, BatchModel, SequenceModel, TokenizerLike, TokenMask
from .text.sampling import Sampler
from .text.stops import StopScanner

PROMPT_CHUNK = 256   # prompt tokens per forward: bounds memory and lets cancel() act between chunks


def check_fits(n_tokens: int, capacity: int) -> None:
    if n_tokens > capacity:
        raise ContextFullError(f"the prompt has {n_tokens} tokens but the context window holds {capacity} "
                               f"(use a larger n_ctx or a shorter prompt)")


@dataclass
class CacheSlot:
    index: int          # the slot's number in its BatchModel
    capacity: int       # positions it holds
    tokens: list[int] = field(default_factory=list)   # what its KV cache holds, in order

    def clear(self) -> None:
        """Forget the content (after an interrupted forward it is unknown): the next feed starts at 0."""
        self.tokens = []


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of a sampled token under the model's raw logits, and the `top` most likely
    (id, log-probability) pairs at that position, most likely first."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(row: np.ndarray) -> np.ndarray:
    """float32 log-probabilities of one logits row (computed in float64)."""
    z = np.asarray(row, dtype=np.float64)
    z = z - z.max()
    return (z - np.log(np.exp(z).sum())).astype(np.float32)


def token_logprob(raw: np.ndarray, token: int, top_n: int) -> TokenLogprob:
    """`token`'s log-probability under the logits row `raw`, with the `top_n` most likely tokens."""
    logp = log_softmax(raw)
    n = min(max(int(top_n), 0), logp.size)
    top = np.argpartition(-logp, n - 1)[:n] if 0 < n < logp.size else np.arange(n)
    top = top[np.argsort(-logp[top], kind="stable")]
    return TokenLogprob(int(token), float(logp[token]), tuple((int(i), float(logp[i])) for i in top))


@dataclass(frozen=True)
class Event:
    """What one step produced for one generation: a sampled token with the text it released (often "" while
    a stop-string prefix or a split character is held back), or, last, the finish reason and usage (its
    text is whatever was still held)."""
    generation: Generation = field(repr=False)
    token: int | None = None
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: CompletionUsage | None = None
    logprob: TokenLogprob | None = None      # with the token, when the generation records logprobs


class Generation:
    """One sequence being generated; see the module docstring for what a step does with it.

    Bad input (an empty prompt, one larger than the slot, a bad max_tokens) raises here, at construction.
    `timings` fills in as it runs: n_prompt, n_prompt_reused, n_prompt_eval, t_prompt, n_gen, t_gen (seconds).

    Per-token hooks, in the order they apply: `logit_bias` ({token id: added to its logit}),
    `logits_processors` (llama-cpp-python's: `f(ids, logits) -> logits`, ids an int array of the sequence so
    far), `token_mask`. `logprobs` = N records a TokenLogprob (with the top N) for every sampled token.
    `stopping_criteria` (llama-cpp-python's: `f(ids, logits) -> bool`) ends the generation with "stop".
    """

    def __init__(self, prompt: Sequence[int], slot: CacheSlot, tokenizer: TokenizerLike, sampler: Sampler, *,
                 stop: str | Iterable[str] | None = None, max_tokens: int | None = None,
                 token_mask: TokenMask | None = None, logit_bias: Mapping[int, float] | None = None,
                 logits_processors: Sequence[Callable] = (), logprobs: int | None = None,
                 stopping_criteria: Sequence[Callable] = ()):
        self.prompt = [int(t) for t in prompt]
        if not self.prompt:
            raise LlmrunError("the prompt is empty (no tokens)")
        check_fits(len(self.prompt), slot.capacity)
        self.slot, self.tokenizer, self.sampler, self.token_mask = slot, tokenizer, sampler, token_mask
        self.max_tokens = _token_limit(max_tokens)
        self.logit_bias = _bias_arrays(logit_bias)
        self.logits_processors = list(logits_processors)
        self.stopping_criteria = list(stopping_criteria)
        self.logprobs = None if logprobs is None else int(logprobs)
        self.scanner = StopScanner(stop)
        self.generated: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.usage: CompletionUsage | None = None
        self.timings: dict[str, float] = {"n_gen": 0}
        self._history = list(self.prompt)    # what the repetition penalties look at
        self._cancelled = threading.Event()
        self._n_prompt_fed: int | None = None   # prompt tokens in the slot; None before the first step
        self._logits: np.ndarray | None = None
        self._t_start: float | None = None
        self._t_decode: float | None = None

    def cancel(self) -> None:
        """Finish with "cancelled" at the next step (thread-safe)."""
        self._cancelled.set()

    def close(self) -> None:
        """Stop without another step (the consumer went away, or a step raised): timings up to now."""
        if self.finish_reason is None:
            self._stop_clock()

    @property
    def prompt_done(self) -> bool:
        """The whole prompt is in the slot: each further step decodes one token."""
        return self._n_prompt_fed is not None and self._n_prompt_fed >= len(self.prompt)

    # ---- one step (called by step()) ------------------------------------------------------------------------
    def _advance(self, events: list[Event], kept=None, prompt_chunk: int = PROMPT_CHUNK) -> list[int] | None:
        """This generation's part of a step: the tokens to feed now, or None when it has finished. kept(n): how
        much of a reusable prefix of n cached tokens the model can continue from (see _kept_prefix)."""
        if self._t_start is None:
            self._t_start = time.perf_counter()
        if self._cancelled.is_set():
            return self._finish("cancelled", events)
        if self._n_prompt_fed is None:
            self._reuse_prefix(kept)
        if self._n_prompt_fed < len(self.prompt):
            return self.prompt[self._n_prompt_fed:self._n_prompt_fed + prompt_chunk]
        token, logprob = self._pick()
        if token in self.tokenizer.eog_ids:
            return self._finish("stop", events)
        self.generated.append(token)
        self._history.append(token)
        self.timings["n_gen"] = len(self.generated)
        events.append(Event(self, token, self.scanner.push(self.tokenizer.token_to_piece(token, special=False)),
                            logprob=logprob))
        if self.scanner.stopped or self._criteria_met():
            return self._finish("stop", events)
        if self.max_tokens is not None and len(self.generated) >= self.max_tokens:
            return self._finish("length", events)
        if len(self.slot.tokens) + 1 > self.slot.capacity:
            return self._finish("length", events)    # no room to evaluate this token and predict another
        return [token]

    def _take(self, tokens: list[int], logits: np.ndarray) -> None:
        """`tokens` were evaluated in the slot; `logits` follow the last of them."""
        self.slot.tokens.extend(tokens)
        self._logits = logits
        if self._n_prompt_fed < len(self.prompt):
            self._n_prompt_fed += len(tokens)
            if self._n_prompt_fed == len(self.prompt):
                self._t_decode = time.perf_counter()
                self.timings["t_prompt"] = self._t_decode - self._t_start

    def _reuse_prefix(self, kept=None) -> None:
        cached, n = self.slot.tokens, 0
        for a, b in zip(cached, self.prompt):
            if a != b:
                break
            n += 1
        n = min(n, len(self.prompt) - 1)   # the last prompt token is evaluated again: its logits are needed
        if kept is not None and 0 < n < len(cached):
            n = kept(n)                    # a sliding-window cache may have lost what position n needs
        del cached[n:]
        self._n_prompt_fed = n
        self.timings.update(n_prompt=len(self.prompt), n_prompt_eval=len(self.prompt) - n, n_prompt_reused=n)

    def _pick(self) -> tuple[int, TokenLogprob | None]:
        raw = np.asarray(self._logits, dtype=np.float32).reshape(-1)
        row = raw
        if self.logit_bias is not None:
            ids, bias = self.logit_bias
            if ids.size and ids.max() >= row.size:
                raise LlmrunError(f"logit_bias names token {int(ids.max())}, outside the {row.size} logits")
            row = row.copy()
            row[ids] += bias
        for processor in self.logits_processors:
            row = np.asarray(processor(np.asarray(self._history, dtype=np.intc), row.copy()),
                             dtype=np.float32).reshape(-1)
            if row.shape != raw.shape:
                raise LlmrunError(f"a logits processor returned {row.size} logits for {raw.size}")
        if self.token_mask is not None:
            row = _masked(row, self.token_mask.allowed())
        token = self.sampler.sample(row, self._history)
        if self.token_mask is not None:
            self.token_mask.accept(token)
        return token, (token_logprob(raw, token, self.logprobs) if self.logprobs is not None else None)

    def _criteria_met(self) -> bool:
        if not self.stopping_criteria:
            return False
        ids = np.asarray(self._history, dtype=np.intc)
        return any(bool(c(ids, self._logits)) for c in self.stopping_criteria)

    def _finish(self, reason: FinishReason, events: list[Event]) -> None:
        self.finish_reason = reason
        n_prompt, n_gen = len(self.prompt), len(self.generated)
        self.usage = {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}
        self._stop_clock()
        events.append(Event(self, text=self.scanner.flush(), finish_reason=reason, usage=self.usage))
        return None

    def _stop_clock(self) -> None:
        now = time.perf_counter()
        if self._t_decode is None:            # the prompt was never finished
            self._t_decode = now
            self.timings["t_prompt"] = now - (self._t_start if self._t_start is not None else now)
        self.timings.update(t_gen=now - self._t_decode, n_gen=len(self.generated))


def _token_limit(max_tokens) -> int | None:
    """None or <= 0: no limit (until end of generation or the slot is full)."""
    if max_tokens is None:
        return None
    try:
        n = int(max_tokens)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"max_tokens must be an integer, got {max_tokens!r:.40}") from None
    return n if n > 0 else None


def _bias_arrays(logit_bias) -> tuple[np.ndarray, np.ndarray] | None:
    """{token: bias} (keys may be numeric strings, as JSON gives them) -> (ids, float32 biases)."""
    if not logit_bias:
        return None
    if not isinstance(logit_bias, Mapping):
        raise LlmrunError(f"logit_bias must be a dict of token id -> bias (got {type(logit_bias).__name__})")
    ids, values = [], []
    for key, value in logit_bias.items():
        try:
            tid, bias = int(key), float(value)
        except (TypeError, ValueError):
            raise LlmrunError(f"logit_bias entry {key!r}: {value!r} is not token id -> number") from None
        if tid < 0 or not np.isfinite(bias):
            raise LlmrunError(f"logit_bias entry {key!r}: {value!r} needs a token id >= 0 and a finite bias")
        ids.append(tid)
        values.append(bias)
    return np.array(ids, dtype=np.int64), np.array(values, dtype=np.float32)


def _masked(row: np.ndarray, allowed) -> np.ndarray:
    if allowed is None:
        return row
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.shape != row.shape:
        raise LlmrunError(f"the token mask has shape {allowed.shape} for {row.size} logits")
    if not allowed.any():
        raise LlmrunError("the token mask allows no token")
    return np.where(allowed, row, np.float32(-np.inf))


def step(model: BatchModel, generations: Iterable[Generation],
         prompt_chunk: int = PROMPT_CHUNK) -> list[Event]:
    """Advance every unfinished generation by one token (or one prompt chunk of at most `prompt_chunk` tokens)
    with ONE forward_batch call. A server keeps chunks small while other generations decode, so that a long
    prompt does not hold up their tokens.

    If the forward raises, the slots of that step are cleared and the error propagates; those generations
    cannot continue.
    """
    active = [g for g in generations if g.finish_reason is None]
    if len({g.slot.index for g in active}) != len(active):
        raise LlmrunError("two unfinished generations share one KV-cache slot")
    events: list[Event] = []
    fed: list[tuple[Generation, list[int]]] = []
    for gen in active:
        tokens = gen._advance(events, lambda n, slot=gen.slot.index: _kept_prefix(model, slot, n),
                              max(1, int(prompt_chunk)))
        if tokens:
            fed.append((gen, tokens))
    if fed:
        batch = [BatchItem(gen.slot.index, len(gen.slot.tokens), tokens) for gen, tokens in fed]
        try:
            rows = model.forward_batch(batch)
        except BaseException:
            for gen, _ in fed:
                gen.slot.clear()
            raise
        for (gen, tokens), row in zip(fed, rows):
            gen._take(tokens, row)
    return events


def _kept_prefix(model, slot: int, n: int) -> int:
    """How many of a slot's first n cached positions the next forward can continue from: n, unless the model
    says (its optional `kept_prefix(slot, n)`) that a sliding-window ring has overwritten what position n
    needs; then 0, and the prompt is evaluated from the start."""
    kept_prefix = getattr(model, "kept_prefix", None)
    return n if kept_prefix is None else int(kept_prefix(slot, n))


def generate(model: BatchModel, *generations: Generation) -> Iterator[Event]:
    """Step `generations` together until every one has finished, yielding the events as they come."""
    while any(g.finish_reason is None for g in generations):
        yield from step(model, generations)


class PerSlotModels:
    """A BatchModel made of single-cache engines, slot i being models[i]; a step runs its items one after the
    other. Today's engine keeps one KV cache per LlamaModel, so this is how sequences step together now; one
    batched graph over many slots is the server issue's work, behind the same forward_batch."""

    def __init__(self, models: Sequence[SequenceModel]):
        if not models:
            raise LlmrunError("PerSlotModels needs at least one model")
        self.models = list(models)
        self.n_slots = len(self.models)
        self.n_ctx = min(m.n_ctx for m in self.models)

    def kept_prefix(self, slot: int, n: int) -> int:
        """See _kept_prefix: what slot's engine can keep of its first n positions (n or 0)."""
        kept = getattr(self.models[slot], "kept_prefix", None)
        return n if kept is None else kept(n)

    def forward_batch(self, batch: Sequence[BatchItem]) -> list[np.ndarray]:
        rows = []
        for item in batch:
            if not 0 <= item.slot < self.n_slots:
                raise ModelError(f"no KV-cache slot {item.slot} (there are {self.n_slots})")
            model = self.models[item.slot]
            if item.pos > model.n_past:
                raise ModelError(f"slot {item.slot} holds {model.n_past} positions, cannot continue at {item.pos}")
            if item.pos < model.n_past:
                model.truncate(item.pos)
            rows.append(model.forward(item.tokens))
        return rows
