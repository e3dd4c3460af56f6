"""Token samplers: pick the next token from one row of logits.

The chain follows llama.cpp's default order:

    penalties (repeat / frequency / presence)  ->  top-k  ->  top-p  ->  min-p  ->  temperature  ->  draw

Truncation (top-k/top-p/min-p) happens *before* temperature, as in llama.cpp, so the temperature only reshapes
the probabilities of the surviving candidates. ``temperature <= 0`` means greedy: the arg-max of the penalised
logits (ties go to the lowest id), no random draw at all.

Every random draw comes from a ``numpy.random.Generator``; the same seed and settings give the same tokens.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np

from ..errors import ArgumentTypeError, InvalidArgumentError
from ..gguf.metadata import describe_value
from ..kernels.token_draw import BOUND_SETS, draw_token


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40           # <= 0: off
    top_p: float = 0.95       # >= 1: off
    min_p: float = 0.05       # <= 0: off
    repeat_penalty: float = 1.0   # 1: off
    repeat_last_n: int = 64   # window of previous tokens the three penalties look at (0: off, -1: all)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    def __post_init__(self):
        # Plain Python numbers whatever came in (numpy scalars, "0.5", an int for a float) ...
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                object.__setattr__(self, f.name, type(f.default)(value))
            except (TypeError, ValueError, OverflowError):
                raise ArgumentTypeError(f"{f.name} must be a number, got {describe_value(value)}") from None
        # ... and nonsense caught early with one readable line instead of NaNs later.
        if not np.isfinite(self.temperature):
            raise InvalidArgumentError(f"temperature must be a finite number, got {self.temperature}")
        if not 0.0 <= self.top_p <= 1.0 or not np.isfinite(self.top_p):
            raise InvalidArgumentError(f"top_p must be between 0 and 1, got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0 or not np.isfinite(self.min_p):
            raise InvalidArgumentError(f"min_p must be between 0 and 1, got {self.min_p}")
        if not self.repeat_penalty > 0 or not np.isfinite(self.repeat_penalty):
            raise InvalidArgumentError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")


# --- the individual steps. Candidates are (ids, logits) pairs so steps compose like llama.cpp's chain. ---------

def apply_penalties(logits: np.ndarray, previous: Sequence[int], repeat_penalty: float = 1.0,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                    last_n: int = 64) -> np.ndarray:
    """Return a penalised copy of a full logits row (llama.cpp semantics).

    For each distinct token among the last ``last_n`` previous tokens: a positive logit is divided by
    ``repeat_penalty`` and a negative one multiplied (so the penalty always pushes *down*), then
    ``count * frequency_penalty + presence_penalty`` is subtracted.
    """
    out = np.array(logits, dtype=np.float32, copy=True)
    if last_n == 0 or not len(previous):
        return out
    if repeat_penalty == 1.0 and frequency_penalty == 0.0 and presence_penalty == 0.0:
        return out
    window = previous if last_n < 0 else previous[-last_n:]
    counts = Counter(int(t) for t in window)
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    ids_ok = (ids >= 0) & (ids < out.shape[0])
    ids, n = ids[ids_ok], n[ids_ok]
    v = out[ids]
    v = np.where(v <= 0, v * repeat_penalty, v / repeat_penalty)
    v = v - n * frequency_penalty - presence_penalty
    out[ids] = v
    return out


def top_k(ids: np.ndarray, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k largest logits, returned sorted from most to least likely (equal logits: lower id first)."""
    order = _top_k_order(logits, k)
    return ids[order], logits[order]


def _top_k_order(logits: np.ndarray, k: int) -> np.ndarray:
    """The indices of top_k's result (all of them, sorted, when k <= 0 or k >= len(logits))."""
    if k <= 0 or k >= len(logits):
        order = np.argsort(-logits, kind="stable")
    else:
        # the candidates: every logit at or above a cheap bound on the k-th largest value, then the k-th largest
        # among them (kernels/token_draw.py does the same in one call)
        cand = np.flatnonzero(logits >= _kth_largest_bound(logits, k))
        if cand.size > 4 * k:
            vals = logits[cand]
            cand = cand[vals >= np.partition(vals, vals.size - k)[vals.size - k]]
        elif cand.size < k:   # no bound held (a NaN from a logits processor): as without it
            cand = np.flatnonzero(logits >= np.partition(logits, len(logits) - k)[len(logits) - k])
        order = cand[np.argsort(-logits[cand], kind="stable")][:k]
    return order


def _kth_largest_bound(logits: np.ndarray, k: int):
    """A value at most the k-th largest logit: the smallest of the maxima of C >= k disjoint sets (each maximum
    is a different element, so at least C elements are at or above it). The sets are strided (ids j, j + C,
    ...), so that a vocabulary's runs of related ids do not all land in one: on SmolLM2's 49152 logits it
    leaves ~200-300 candidates at k = 40, in ~40 us."""
    chunks = max(k, BOUND_SETS)
    size = len(logits) // chunks
    if size < 8:   # a small vocabulary: the k-th largest itself
        return np.partition(logits, len(logits) - k)[len(logits) - k]
    return logits[:size * chunks].reshape(size, chunks).max(axis=0).min()


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    p = np.exp(z)
    return p / p.sum()


def top_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus: keep the smallest prefix (of candidates sorted by logit, descending) whose mass reaches p."""
    if p >= 1.0:
        return ids, logits
    cum = np.cumsum(_softmax(logits))
    # first index where the cumulative mass reaches p is the last token kept
    keep = int(np.searchsorted(cum, p, side="left")) + 1
    keep = max(min_keep, min(keep, len(ids)))
    return ids[:keep], logits[:keep]


def min_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Keep tokens whose probability is at least p times the most likely token's (order preserved)."""
    if p <= 0.0 or len(ids) == 0:
        return ids, logits
    # p_i >= p * p_max  <=>  logit_i >= logit_max + log(p)
    mask = logits >= np.max(logits) + np.log(p)
    if mask.sum() < min_keep:
        return ids[:min_keep], logits[:min_keep]
    return ids[mask], logits[mask]


def draw(ids: np.ndarray, logits: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """Sample one id from softmax(logits / temperature)."""
    probs = _softmax(logits / temperature)
    cum = np.cumsum(probs)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    return int(ids[min(i, len(ids) - 1)])


class Sampler:
    """One sampling chain with its own random generator (so parallel Llama objects never share state)."""

    def __init__(self, params: SamplingParams | None = None, seed: int | None = None,
                 rng: np.random.Generator | None = None):
        self.params = params or SamplingParams()
        self.rng = rng if rng is not None else np.random.default_rng(seed)

    def _penalised(self, logits: np.ndarray, previous: Sequence[int]) -> np.ndarray:
        """apply_penalties' result; the row itself (not a copy) when no penalty is on: nothing below writes it."""
        p = self.params
        if p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0:
            return np.asarray(logits, dtype=np.float32)
        return apply_penalties(logits, previous, p.repeat_penalty, p.frequency_penalty, p.presence_penalty,
                               p.repeat_last_n)

    def sample(self, logits: np.ndarray, previous: Sequence[int] = ()) -> int:
        """The chain above on one row of logits, its steps in one kernel (kernels/token_draw.py: the same
        arithmetic as the functions above, which stay as its reference, without a numpy call per step). A NaN
        logit (only a logits processor can make one: the model's are checked) is an error: no step orders it."""
        p = self.params
        row = self._penalised(logits, previous)
        if p.temperature <= 0:
            token = int(np.argmax(row))
            if np.isnan(row[token]):
                raise InvalidArgumentError("the logits to sample from hold NaN (from a logits processor?)")
            return token
        row = np.ascontiguousarray(row, dtype=np.float32).reshape(-1)
        k = min(max(p.top_k, 0), row.size)   # <= 0 off, >= the vocabulary all: an int64 either way
        token = draw_token(row, k, float(p.top_p), float(p.min_p), float(p.temperature), float(self.rng.random()))
        if token < 0:
            raise InvalidArgumentError("the logits to sample from hold NaN (from a logits processor?)")
        return int(token)
