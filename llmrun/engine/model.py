"""The one graph: the LLaMA block with the pieces its relatives add, read from the file's Arch (archs.py).

Per layer (HF LlamaDecoderLayer semantics; the optional pieces in brackets, each an Arch field):
  h = rmsnorm(x) ; qkv = h Wqkv [+ bias] ; [rmsnorm each Q and K head] ; rope(q, k) (NORM or NEOX pairs,
  possibly on the first n_rot dimensions only) ; cache k, v (a ring buffer on sliding-window layers)
  a = attention(q * scale, K, V) [window] [soft-cap] ; x += [rmsnorm](a Wo)
  h = rmsnorm(x) ; x += [rmsnorm]((act(h Wgate) * h Wup) Wdown)   act = silu | gelu_tanh
Input embeddings may be scaled by sqrt(n_embd), output logits soft-capped.
The weights stay quantized (kernels/repack.py tiles); only the token_embd rows of the current tokens
are ever turned into float32.
"""
from __future__ import annotations

import math
from typing import Sequence

import numba
import numpy as np

from ..errors import ContextFullError, ModelError
from ..kernels import ops, warmup
from ..kernels.kv_formats import take
from ..kernels.qmatmul import dequantize_rows, matmul, matvec, matvec_batch
from ..runtime import free_threads, on_compute_thread
from .hparams import HParams, LlamaHParams  # noqa: F401  (LlamaHParams: the older name)
from .kv_cache import KVCache, LayerCache, layer_capacity, new_k, new_v
from .load_checks import check_logits
from .model_loading import Layer, ModelLoading
from .rope import Rope
from .weights import MatrixGroup

ACTIVATIONS = {"silu": ops.swiglu, "gelu_tanh": ops.geglu}


def _matmul(parts: MatrixGroup, X: np.ndarray) -> np.ndarray:
    Y = matmul(parts[0], X) if len(parts) == 1 else np.concatenate([matmul(p, X) for p in parts], axis=1)
    if parts.lora is not None:
        parts.lora.add_to(X, Y)
    return Y


def _add_matmul(parts: MatrixGroup, X: np.ndarray, out: np.ndarray) -> None:
    """out += X @ W.T; for one token straight inside the kernel (no temporary)."""
    if X.shape[0] == 1 and len(parts) == 1:
        matvec(parts[0], X[0], out[0], accumulate=True)
        if parts.lora is not None:
            parts.lora.add_to(X, out)
    else:
        out += _matmul(parts, X)


def _matmul_rows(parts: MatrixGroup, X: np.ndarray, groups) -> np.ndarray:
    """X @ W.T over row groups [(r0, r1, decode)]: the decode rows (one token of each of several sequences)
    through matvec_batch, each other group (one sequence's chunk) through _matmul, so that every row gets
    exactly the numbers a forward() of its own sequence would give."""
    if len(groups) == 1 and not groups[0][2]:
        return _matmul(parts, X)
    Y = np.empty((X.shape[0], sum(p.n_rows for p in parts)), np.float32)
    for r0, r1, decode in groups:
        if decode:
            if len(parts) == 1:   # straight into Y (a copy of the head's rows cost ~0.1 ms a step)
                matvec_batch(parts[0], X[r0:r1], Y[r0:r1])
            else:
                c = 0
                for p in parts:
                    Y[r0:r1, c:c + p.n_rows] = matvec_batch(p, X[r0:r1])
                    c += p.n_rows
            _lora_rows(parts, X, Y, r0, r1)
        else:
            Y[r0:r1] = _matmul(parts, X[r0:r1])
    return Y


def _lora_rows(parts: MatrixGroup, X: np.ndarray, out: np.ndarray, r0: int, r1: int) -> None:
    """The adapters' side path for decode rows one at a time: as each sequence's own forward() adds it."""
    if parts.lora is not None:
        for i in range(r0, r1):
            parts.lora.add_to(X[i:i + 1], out[i:i + 1])


def _add_matmul_rows(parts: MatrixGroup, X: np.ndarray, out: np.ndarray, groups) -> None:
    """out += X @ W.T over row groups, as _matmul_rows."""
    for r0, r1, decode in groups:
        if not decode:
            _add_matmul(parts, X[r0:r1], out[r0:r1])
        elif len(parts) == 1:
            matvec_batch(parts[0], X[r0:r1], out[r0:r1], accumulate=True)
            _lora_rows(parts, X, out, r0, r1)
        else:
            out[r0:r1] += _matmul_rows(parts, X[r0:r1], [(0, r1 - r0, True)])


class LlamaModel(ModelLoading):
    """A loaded model of any architecture in archs.py with its KV cache: `forward` appends tokens and returns
    their logits, `truncate` drops cached positions from the end, `reset` empties the cache. `load` (building it
    from a file) is model_loading.py's."""

    def __init__(self, hparams: HParams, n_ctx: int, n_threads: int | None):
        self.hparams = hparams
        self.n_ctx = int(n_ctx)
        self.n_threads = n_threads
        self.kv_types = ("f32", "f32")      # storage of K and V (kernels/kv_formats.py); load() sets them
        self.cache: KVCache | None = None   # the sequence forward() extends (its layers' caches)
        self.layers: list[Layer] = []
        self.ropes: list[Rope] = []
        self.load_seconds = 0.0
        self.weights_nbytes = 0
        self.kv_nbytes = 0
        self.embd_lora = None   # the active adapters' token_embd side path (engine/adapters.py)
        self.families: set[str] = set()   # repack families of the matrices, and their ggml type names
        self.type_names = ""

    # ------------------------------------------------------------------------------------- weights
    def matrix_groups(self) -> list[MatrixGroup]:
        """Every product a LoRA adapter may sit beside (token_embd's lookup is `embd_lora`)."""
        return [self.output] + [g for L in self.layers for g in (L.qkv, L.out, L.gate_up, L.down)]

    # ------------------------------------------------------------------------------------- running
    def new_cache(self) -> KVCache:
        """An empty KV cache for one more sequence (zeros: pages are only committed as the context fills)."""
        hp = self.hparams
        return KVCache([LayerCache(L.n_head_kv, hp.head_dim, hp.v_head_dim, self.n_ctx, L.cache.window,
                                   types=self.kv_types)
                        for L in self.layers])

    def new_caches(self, n: int) -> list[KVCache]:
        """n empty KV caches that are slices of one array per layer (forward_batch runs the decode attention
        of such caches in one launch)."""
        warmup.start(warmup.units_for(self.families, self.kv_types, batched=True),
                     f"{self.type_names}, batched").wait()
        hp = self.hparams
        caps = [layer_capacity(self.n_ctx, L.cache.window) for L in self.layers]
        kp = [new_k((n,), L.n_head_kv, hp.head_dim, c, self.kv_types[0]) for L, c in zip(self.layers, caps)]
        vp = [new_v((n,), L.n_head_kv, hp.v_head_dim, c, self.kv_types[1]) for L, c in zip(self.layers, caps)]
        pool = (kp, vp)
        return [KVCache([LayerCache(L.n_head_kv, hp.head_dim, hp.v_head_dim, self.n_ctx, L.cache.window,
                                    arrays=(take(kp[il], i), take(vp[il], i)), types=self.kv_types)
                         for il, L in enumerate(self.layers)],
                        pool=pool, slot=i) for i in range(n)]

    @property
    def n_past(self) -> int:
        return self.cache.n_past if self.cache is not None else 0

    def kept_prefix(self, n: int) -> int:
        """How many of the first n cached positions a forward can continue from: n, or 0 when a sliding-window
        ring no longer holds what position n needs (nothing changes; truncate does the same check)."""
        return self.cache.kept_prefix(n)

    def truncate(self, n: int) -> int:
        """Keep the first n cached positions of the model's own cache (later ones are overwritten by the next
        forward). Returns how many are kept: n, or 0 when a sliding-window ring no longer holds what position
        n needs (the cache then starts over and the caller evaluates the prefix again)."""
        return self.cache.truncate(n)

    def reset(self) -> None:
        self.cache.reset()

    def forward(self, tokens: Sequence[int], all_logits: bool = False, hidden: bool = False) -> np.ndarray:
        """Logits after the last token ([n_vocab]), or after each ([T, n_vocab]) with all_logits. hidden=True
        returns the final-normed hidden states instead ([T, n_embd], or [n_embd]): what embeddings pool."""
        ids = self._token_ids(tokens, self.cache)
        T = int(ids.size)
        step = self._max_batch or T
        outs = [self._forward([self.cache], [ids[i:i + step]],
                              "all" if all_logits else "last" if i + step >= T else None, hidden)
                for i in range(0, T, step)]
        if not all_logits:
            return outs[-1][0]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def forward_batch(self, caches: Sequence[KVCache], tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """One forward pass for several sequences, each extending its own cache by its own tokens (one
        token for a decode step, several for a chunk of prompt): float32 [len(caches), n_vocab], the logits
        after each sequence's last token. Each row equals what forward() on that cache alone returns: the
        matrix products share one pass over the weights, rope/attention run per sequence at its position."""
        if len(caches) != len(tokens) or not caches:
            raise ModelError("forward_batch() needs one token list per cache, and at least one")
        if len({id(c) for c in caches}) != len(caches):
            raise ModelError("forward_batch() got the same cache twice")
        seqs = [self._token_ids(t, c) for c, t in zip(caches, tokens)]
        if self._max_batch and max(s.size for s in seqs) > self._max_batch:
            raise ModelError(f"forward_batch() takes at most {self._max_batch} tokens per sequence on this model "
                             f"(its sliding-window rings)")
        return self._forward(list(caches), seqs, "last", False)

    def _token_ids(self, tokens, cache: KVCache) -> np.ndarray:
        hp = self.hparams
        ids = np.asarray(list(tokens) if not isinstance(tokens, np.ndarray) else tokens, dtype=np.int64).reshape(-1)
        T = int(ids.size)
        if T == 0:
            raise ModelError("forward() needs at least one token")
        if cache.n_past + T > self.n_ctx:
            raise ContextFullError(f"context full: {cache.n_past} cached + {T} new tokens > n_ctx {self.n_ctx}")
        if ids.min() < 0 or ids.max() >= hp.n_vocab:
            bad = int(ids[(ids < 0) | (ids >= hp.n_vocab)][0])
            raise ModelError(f"token id {bad} is outside the vocabulary (0..{hp.n_vocab - 1})")
        return ids

    def _forward(self, caches: list[KVCache], seqs: list[np.ndarray], logits: str | None,
                 hidden: bool = False) -> np.ndarray | None:
        """Each sequence's tokens (at most _max_batch each) after its cache's; logits (or final-normed hidden
        states) for "all" rows (one sequence), each sequence's "last" row, or None."""
        return on_compute_thread(self._forward_here, caches, seqs, logits, hidden)

    def _forward_here(self, caches: list[KVCache], seqs: list[np.ndarray], logits: str | None,
                      hidden: bool) -> np.ndarray | None:
        hp = self.hparams
        self._use_free_threads()
        # Rows: the one-token sequences first (decode, batched), then each longer chunk.
        order = sorted(range(len(seqs)), key=lambda i: seqs[i].size > 1)
        spans, r = [], 0                      # (row0, row1, cache, pos0) per sequence, in row order
        for i in order:
            spans.append((r, r + seqs[i].size, caches[i], caches[i].n_past))
            r += seqs[i].size
        n_dec = sum(1 for i in order if seqs[i].size == 1)
        groups = ([(0, n_dec, True)] if n_dec > 1 or (n_dec == 1 and len(seqs) > 1) else
                  [(0, 1, False)] if n_dec == 1 else [])
        groups += [(r0, r1, False) for r0, r1, _, _ in spans[n_dec:]]
        ids = np.concatenate([seqs[i] for i in order])
        T = int(ids.size)
        x = dequantize_rows(self.tok_embd, ids)
        if self.embd_lora is not None:   # per sequence, as its own forward() adds it
            for r0, r1, _, _ in spans:
                self.embd_lora.add_rows(ids[r0:r1], x[r0:r1])
        if hp.arch.embed_scale_sqrt:
            x *= np.float32(math.sqrt(hp.n_embd))
        h = np.empty_like(x)
        eps = np.float32(hp.rms_eps)
        scale = np.float32(hp.attn_scale)
        softcap = np.float32(hp.attn_softcap)
        neox = hp.arch.rope == "neox"
        activation = ACTIVATIONS[hp.arch.activation]
        hd, vd = hp.head_dim, hp.v_head_dim
        # The decode rows of caches sharing one pool: their rope, cache writes and attention are one launch per
        # layer (a call per row cost ~5 us of dispatch and glue, 120 per step for 4 rows).
        pool = spans[0][2].pool if n_dec > 1 else None
        pooled = pool is not None and all(c.pool is pool for _, _, c, _ in spans[:n_dec])
        n_pool = n_dec if pooled else 0
        if pooled:
            slots = np.array([c.slot for _, _, c, _ in spans[:n_dec]], np.int64)
            positions = np.array([p for _, _, _, p in spans[:n_dec]], np.int64)
            pool_tables = [rope.tables_at(positions) for rope in self.ropes]
        tables = [[rope.tables(pos0, r1 - r0) for rope in self.ropes] for r0, r1, _, pos0 in spans[n_pool:]]
        for il, L in enumerate(self.layers):
            if il and T > n_dec:   # a prompt chunk: its layers take milliseconds each (decode checks per call)
                self._use_free_threads()
            ops.rmsnorm(x, L.attn_norm, eps, h)
            qkv = _matmul_rows(L.qkv, h, groups)
            if L.qkv_bias is not None:
                qkv += L.qkv_bias
            if L.q_norm is not None:
                ops.head_rmsnorm(qkv, 0, L.n_head, L.q_norm, eps)
                ops.head_rmsnorm(qkv, L.n_head * hd, L.n_head_kv, L.k_norm, eps)
            att = np.empty((T, L.n_head * vd), np.float32)
            window = L.cache.window
            if pooled:
                kp, vp = pool[0][il], pool[1][il]
                cos, sin = pool_tables[L.rope]
                ops.attention_slots(qkv[:n_dec], cos, sin, kp, vp, slots, positions, L.n_head, hd, vd, neox, scale,
                                    att[:n_dec], window, softcap)
            for (r0, r1, cache, pos0), span_tables in zip(spans[n_pool:], tables):
                lc = cache.layers[il]
                cos, sin = span_tables[L.rope]
                q = np.empty((r1 - r0, L.n_head, hd), np.float32)
                ops.rope_store(qkv[r0:r1], cos, sin, q, lc.k, lc.v, pos0, L.n_head, L.n_head_kv, hd, vd, neox)
                # one kernel for any number of queries: prefill gets decode's bits (ops.py); window and softcap
                # always passed: one compiled signature (kernels/warmup.py)
                ops.attention(q, lc.k, lc.v, pos0, scale, att[r0:r1], window, softcap)
            self._residual(L.out, att, L.post_attn_norm, x, eps, groups)
            ops.rmsnorm(x, L.ffn_norm, eps, h)
            gu = _matmul_rows(L.gate_up, h, groups)
            a = np.empty((T, L.n_ff), np.float32)
            activation(gu, L.n_ff, a)
            self._residual(L.down, a, L.post_ffn_norm, x, eps, groups)
        for r0, r1, cache, pos0 in spans:
            cache.n_past = pos0 + (r1 - r0)
            for lc in cache.layers:
                if lc.ring:   # older slots may now hold newer positions
                    lc.wrote(cache.n_past)
        if logits is None:
            return None
        if logits == "all":
            out_rows, out_groups = x, groups
        else:   # only each sequence's last position; one row per sequence, as forward() computes it
            out_rows = x[[r1 - 1 for _, r1, _, _ in spans]]
            out_groups = [(0, len(spans), True)] if len(spans) > 1 else [(0, 1, False)]
        hn = np.empty_like(out_rows)
        ops.rmsnorm(out_rows, self.output_norm, eps, hn)
        if hidden:
            out = hn
        else:
            out = _matmul_rows(self.output, hn, out_groups)
            if hp.final_softcap:
                cap = np.float32(hp.final_softcap)
                out = np.tanh(out / cap) * cap
            out = check_logits(out)
        if logits == "all":
            return out
        if order == sorted(order):
            return out
        back = np.empty_like(out)
        back[order] = out                     # rows back in the callers' order
        return back

    def _use_free_threads(self) -> None:
        """numba's thread count for the next kernels: set per call, as it is per OS thread and other models may
        have changed it, and again per layer of a prompt chunk, as the cores other processes keep busy are not ours
        (runtime.free_threads) and a prefill outlasts the moment it started in (~4 us a call: per layer of
        every decode step it would cost ~1 % of a small model's token)."""
        numba.set_num_threads(free_threads(min(int(self.n_threads or numba.config.NUMBA_NUM_THREADS),
                                               numba.config.NUMBA_NUM_THREADS)))

    @staticmethod
    def _residual(w: MatrixGroup, a: np.ndarray, post_norm: np.ndarray | None, x: np.ndarray, eps, groups) -> None:
        """x += a W^T, or x += rmsnorm(a W^T) with a post-norm (gemma2/3), over row groups (_matmul_rows)."""
        if post_norm is None:
            _add_matmul_rows(w, a, x, groups)
            return
        y = _matmul_rows(w, a, groups)
        ops.rmsnorm(y, post_norm, eps, y)
        x += y


Model = LlamaModel
