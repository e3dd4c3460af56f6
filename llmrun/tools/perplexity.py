"""Perplexity over a text, computed the way llama.cpp's `llama-perplexity` does.

The token stream is cut into non-overlapping windows of n_ctx tokens (a trailing partial window is dropped);
each window is evaluated from an empty cache, its first token replaced by BOS when the model adds BOS
(`tokenizer.ggml.add_bos_token`, as llama.cpp does), and only the second half of each window is scored so
every scored token sees at least n_ctx/2 tokens of context. PPL = exp(mean NLL); the ± is the standard error
of the mean NLL propagated through exp (llama.cpp's estimate). Needs at least 2*n_ctx tokens, as llama.cpp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..errors import LlmrunError

_SCORE_BATCH = 256   # rows of logits held at once while scoring (bounds memory: rows * n_vocab floats)


@dataclass
class PerplexityResult:
    ppl: float
    err: float           # ± (standard error, in PPL units)
    n_chunks: int
    n_scored: int        # tokens whose probability was scored
    n_tokens: int        # tokens in the text


def _nll_rows(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row, in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(len(targets)), np.asarray(targets)]


def perplexity(model, tokens: Sequence[int], n_ctx: int, bos_id: int | None = None,
               progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    """`model` follows the LlamaModel contract (forward/reset) with a cache of at least n_ctx tokens."""
    tokens = [int(t) for t in tokens]
    if n_ctx < 4:
        raise LlmrunError(f"perplexity needs a context of at least 4 tokens, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise LlmrunError(f"the text has {len(tokens)} tokens; perplexity with a context of {n_ctx} needs at "
                          f"least {2 * n_ctx} (use a longer text or a smaller --ctx)")
    n_chunks = len(tokens) // n_ctx
    first = n_ctx // 2
    nll_sum = nll2_sum = 0.0
    count = 0
    for c in range(n_chunks):
        window = tokens[c * n_ctx:(c + 1) * n_ctx]
        if bos_id is not None:
            window[0] = bos_id
        model.reset()
        # The first half only builds context: no logits needed.
        model.forward(window[:first])
        # Score positions first..n_ctx-2 (each predicts the next token), in slices to bound memory.
        for s in range(first, n_ctx - 1, _SCORE_BATCH):
            e = min(s + _SCORE_BATCH, n_ctx - 1)
            logits = np.asarray(model.forward(window[s:e], all_logits=True)).reshape(e - s, -1)
            nll = _nll_rows(logits, window[s + 1:e + 1])
            nll_sum += float(nll.sum())
            nll2_sum += float((nll * nll).sum())
            count += e - s
        # The last window token is never a prediction source, so it is not evaluated at all.
        if progress is not None:
            progress(c + 1, n_chunks, math.exp(nll_sum / count))
    model.reset()
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    ppl = math.exp(mean)
    err = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return PerplexityResult(ppl=ppl, err=err, n_chunks=n_chunks, n_scored=count, n_tokens=len(tokens))


def perplexity_of_file(model_path, text_path, n_ctx: int = 512, n_threads: int | None = None,
                       progress: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    from ..gguf import GGUFReader
    from ..engine.model import LlamaModel
    from ..text.tokenizer import Tokenizer

    try:
        with open(text_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise LlmrunError(f"{text_path}: cannot read ({e.strerror or e})") from None
    with GGUFReader(model_path) as reader:
        tok = Tokenizer.from_metadata(reader.metadata)
        # Like llama.cpp: BOS (if the model wants it), no parsing of special-token text in the data.
        tokens = tok.encode(data, add_bos=None, special=False)
        if len(tokens) < 2 * n_ctx:   # fail before paying for the weights
            return perplexity(None, tokens, n_ctx)
        model = LlamaModel.load(reader, n_ctx=n_ctx, n_threads=n_threads)
        return perplexity(model, tokens, n_ctx, bos_id=tok.bos_id if tok.add_bos else None, progress=progress)
