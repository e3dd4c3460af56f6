"""`Llama`'s embedding methods (llama-cpp-python's `embed` / `create_embedding`): the final-normed hidden states
of the engine, pooled and optionally normalized (engine/pooling.py)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import api_args as args
from .errors import LlmrunError
from .generate import PROMPT_CHUNK, check_fits
from .llama_types import CreateEmbeddingResponse


class EmbeddingMethods:
    """Mixed into `Llama` (api.py), whose lock, slot, tokenizer and model these use."""

    def embed(self, input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]], normalize: bool = False,
              truncate: bool = True, return_count: bool = False):
        """Embedding vectors (lists of floats) of one text / token list, or of each of several.

        The final-normed hidden states are pooled as the file's `pooling_type` says (mean when it does not;
        "none" gives one vector per token). `normalize` scales them to unit length; `truncate` cuts inputs
        longer than the context window (else they are an error). `return_count` also returns the number of
        tokens embedded.
        """
        from .engine.pooling import normalize as unit, pool   # numba-free, but only embedding users need it

        single, inputs = _embedding_inputs(input)
        token_lists = [self._embedding_tokens(item, truncate) for item in inputs]
        vectors = []
        with self._exclusive():
            model = self._require_model()
            for tokens in token_lists:
                hidden = self._hidden_states(model, tokens)
                vec = pool(hidden, self.pooling)
                vectors.append((unit(vec) if normalize else vec).astype(np.float32).tolist())
        out = vectors[0] if single else vectors
        return (out, sum(map(len, token_lists))) if return_count else out

    def create_embedding(self, input, model: str | None = None, normalize: bool = False
                         ) -> CreateEmbeddingResponse:
        """OpenAI-shaped embeddings of `input` (a text, a list of texts, or token lists)."""
        vectors, n_tokens = self.embed(input, normalize=normalize, return_count=True)
        if _embedding_inputs(input)[0]:
            vectors = [vectors]
        return {"object": "list",
                "data": [{"object": "embedding", "embedding": v, "index": i} for i, v in enumerate(vectors)],
                "model": model or self._name, "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    def _embedding_tokens(self, item, truncate: bool) -> list[int]:
        tokens = (self.tokenize(item.encode("utf-8", "replace") if isinstance(item, str) else item)
                  if isinstance(item, (str, bytes)) else args.token_ids(item, self.n_vocab(), "input"))
        if not tokens:
            raise LlmrunError("cannot embed an empty input (no tokens)")
        if len(tokens) > self._slot.capacity:
            if not truncate:
                check_fits(len(tokens), self._slot.capacity)
            tokens = tokens[:self._slot.capacity]
        return tokens

    def _hidden_states(self, model, tokens: list[int]):
        try:
            model.reset()
            self._slot.clear()
            parts = [model.forward(tokens[i:i + PROMPT_CHUNK], all_logits=True, hidden=True)
                     for i in range(0, len(tokens), PROMPT_CHUNK)]
        except TypeError:
            self._drop_cache()
            raise LlmrunError("this model cannot produce hidden states for embeddings") from None
        except BaseException:
            self._drop_cache()
            raise
        self._slot.tokens.extend(tokens)     # the cache now holds this input: a later prompt may reuse it
        return np.concatenate([np.asarray(p, dtype=np.float32).reshape(-1, p.shape[-1]) for p in parts])


def _embedding_inputs(value) -> tuple[bool, list]:
    """(single?, items): a text, a list of texts, one token list, or a list of token lists."""
    if isinstance(value, (str, bytes)):
        return True, [value]
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
            return True, [list(value)]
        if all(isinstance(v, (str, bytes)) or (isinstance(v, (list, tuple)) and v and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in v)) for v in value):
            return False, list(value)
    raise LlmrunError("embedding input must be a text, a list of texts, a token list or a list of token lists")
