"""The LLaMA graph: weights from a GGUF file, float32 KV cache, batched prefill and incremental decode.

Per layer (HF LlamaDecoderLayer semantics on GGUF's permuted Q/K, ggml NORM rope):
  h = rmsnorm(x) ; q,k,v = h Wq, h Wk, h Wv (one fused product) ; rope(q, k) ; cache k, v
  x += attention(q, K, V) Wo ; h = rmsnorm(x) ; x += (silu(h Wgate) * h Wup) Wdown
The weights stay quantized (kernels/repack.py tiles); only the token_embd rows of the current tokens
are ever turned into float32.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import numba
import numpy as np

from ..errors import ContextFullError, ModelError
from ..kernels import ops
from ..kernels.qmatmul import dequantize_rows, matmul, matvec, matvec_batch
from ..kernels.repack import PackedMatrix, pack_matrix
from ..runtime import drop_file_pages, fixed_mmap_threshold, trim_heap
from ..tensors import tensor_to_float32
from .load_checks import check_context, check_hparams, check_logits, check_matrix, check_vector

ARCH = "llama"
BLAS_ATTENTION_TOKENS = 16   # prefill chunks from this size use the BLAS attention path


@dataclass
class LlamaHParams:
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int           # key_length: width of one Q/K head
    n_ff: int
    rms_eps: float
    rope_base: float
    v_head_dim: int = 0     # value_length (defaults to head_dim)
    n_rot: int = 0
    n_ctx_train: int = 0
    rope_scaling: str = "none"       # none | linear | yarn
    rope_freq_scale: float = 1.0     # 1 / rope.scaling.factor
    rope_orig_ctx: int = 0           # YaRN: original training context
    yarn_ext_factor: float = 0.0
    yarn_attn_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    tied_embeddings: bool = False
    # per-layer values (equal to the scalars above unless the file stores per-layer arrays)
    n_head_per_layer: list[int] = field(default_factory=list)
    n_head_kv_per_layer: list[int] = field(default_factory=list)
    n_ff_per_layer: list[int] = field(default_factory=list)


def _meta(reader, key, default=None, required=False):
    val = reader.metadata.get(key, None)
    if val is None:
        if required:
            raise ModelError(f"{reader.path}: missing metadata key {key}")
        return default
    return val


def _per_layer(reader, key, n_layer, default=None, required=False) -> list[int]:
    """A u32 key or a per-layer array (llama.cpp's key-or-array hparams)."""
    val = _meta(reader, key, default, required)
    if isinstance(val, (list, np.ndarray)):
        vals = [int(v) for v in val]
        if len(vals) != n_layer:
            raise ModelError(f"{reader.path}: {key} has {len(vals)} entries for {n_layer} layers")
        return vals
    return [int(val)] * n_layer


def read_hparams(reader) -> LlamaHParams:
    """The model's hyper-parameters from the GGUF metadata, and its vocabulary size from the token_embd rows
    (what the graph indexes; ModelError when anything is missing or inconsistent)."""
    arch = reader.get_str("general.architecture", None)
    if arch != ARCH:
        raise ModelError(f"{reader.path}: architecture {arch!r:.80} is not supported (only 'llama')")
    check_hparams(reader, ARCH)
    p = ARCH + "."
    n_embd = int(_meta(reader, p + "embedding_length", required=True))
    n_layer = int(_meta(reader, p + "block_count", required=True))
    heads = _per_layer(reader, p + "attention.head_count", n_layer, required=True)
    heads_kv = _per_layer(reader, p + "attention.head_count_kv", n_layer, default=None) \
        if p + "attention.head_count_kv" in reader.metadata else list(heads)
    n_ffs = _per_layer(reader, p + "feed_forward_length", n_layer, required=True)
    if n_layer <= 0 or n_embd <= 0 or min(heads) <= 0 or min(n_ffs) <= 0:
        raise ModelError(f"{reader.path}: invalid model dimensions")
    for h, hk in zip(heads, heads_kv):
        if hk <= 0 or h % hk:
            raise ModelError(f"{reader.path}: head_count {h} is not a multiple of head_count_kv {hk}")
    head_dim = int(_meta(reader, p + "attention.key_length", n_embd // heads[0]))
    v_head_dim = int(_meta(reader, p + "attention.value_length", head_dim))
    n_rot = int(_meta(reader, p + "rope.dimension_count", head_dim))
    if n_rot != head_dim:
        raise ModelError(f"{reader.path}: rope.dimension_count {n_rot} must equal the head size {head_dim}")
    if head_dim % 2:
        raise ModelError(f"{reader.path}: odd head size {head_dim}")
    eps = float(_meta(reader, p + "attention.layer_norm_rms_epsilon", required=True))
    n_ctx_train = int(_meta(reader, p + "context_length", 0))

    scaling = str(_meta(reader, p + "rope.scaling.type", "linear"))
    factor = float(_meta(reader, p + "rope.scaling.factor", 0.0) or 0.0)
    if factor == 0.0:  # older files: rope.scale_linear
        factor = float(_meta(reader, p + "rope.scale_linear", 0.0) or 0.0)
    if scaling not in ("none", "linear", "yarn"):
        raise ModelError(f"{reader.path}: rope scaling type {scaling!r} is not supported")
    freq_scale = 1.0 / factor if factor > 0 and scaling != "none" else 1.0
    if freq_scale == 1.0 and scaling == "linear":
        scaling = "none"
    emb_ti = reader.tensors.get("token_embd.weight")
    if emb_ti is None:
        raise ModelError(f"{reader.path}: missing tensor token_embd.weight")
    hp = LlamaHParams(
        n_vocab=int(emb_ti.shape[0]), n_embd=n_embd, n_layer=n_layer, n_head=heads[0], n_head_kv=heads_kv[0],
        head_dim=head_dim, n_ff=n_ffs[0], rms_eps=eps,
        rope_base=float(_meta(reader, p + "rope.freq_base", 10000.0)), v_head_dim=v_head_dim,
        n_rot=n_rot, n_ctx_train=n_ctx_train, rope_scaling=scaling, rope_freq_scale=freq_scale,
        rope_orig_ctx=int(_meta(reader, p + "rope.scaling.original_context_length", n_ctx_train)),
        n_head_per_layer=heads, n_head_kv_per_layer=heads_kv, n_ff_per_layer=n_ffs)
    if scaling == "yarn":
        hp.yarn_ext_factor = float(_meta(reader, p + "rope.scaling.yarn_ext_factor", 1.0))
        hp.yarn_attn_factor = float(_meta(reader, p + "rope.scaling.attn_factor", 1.0))
        hp.yarn_beta_fast = float(_meta(reader, p + "rope.scaling.yarn_beta_fast", 32.0))
        hp.yarn_beta_slow = float(_meta(reader, p + "rope.scaling.yarn_beta_slow", 1.0))
    return hp


class _Weights:
    """Fetches tensors by name, checking presence, shape and type with one-line ModelErrors."""

    def __init__(self, reader):
        self.reader = reader
        self.used: set[str] = set()

    def info(self, name, shape):
        ti = self.reader.tensors.get(name)
        if ti is None:
            raise ModelError(f"{self.reader.path}: missing tensor {name}")
        if tuple(ti.shape) != tuple(shape):
            raise ModelError(f"{self.reader.path}: tensor {name} has shape {list(ti.shape)}, "
                             f"expected {list(shape)}")
        self.used.add(name)
        return ti

    def vector(self, name, n, positive: bool = False) -> np.ndarray:
        ti = self.info(name, (n,))
        try:
            v = np.array(tensor_to_float32(ti), dtype=np.float32).reshape(n)
        except Exception as e:  # an unsupported type for a 1-D tensor
            raise ModelError(f"{self.reader.path}: cannot read tensor {name}: {e}") from None
        check_vector(self.reader.path, name, v, positive)
        return v

    def matrix(self, names_shapes) -> "MatrixGroup":
        """Pack one or more matrices that multiply the same input; consecutive tensors of the same
        type are fused into one PackedMatrix (one kernel call for e.g. Q, K and V)."""
        infos = [self.info(n, s) for n, s in names_shapes]
        tensors, col = [], 0
        for n, (rows, cols) in names_shapes:
            tensors.append((n, col, rows, cols))
            col += rows
        groups: list[list] = []
        for ti in infos:
            if groups and groups[-1][0].ggml_type == ti.ggml_type:
                groups[-1].append(ti)
            else:
                groups.append([ti])
        packed = []
        for g in groups:
            raw = g[0].data if len(g) == 1 else np.concatenate([ti.data for ti in g], axis=0)
            try:
                packed.append(pack_matrix(raw, int(g[0].ggml_type), g[0].shape[-1]))
            except ModelError as e:
                raise ModelError(f"{self.reader.path}: tensor {g[0].name} ({g[0].ggml_type.name.lower()}): {e}") \
                    from None
            check_matrix(self.reader.path, "/".join(ti.name for ti in g), packed[-1])
            del raw
            for ti in g:
                if isinstance(ti.data, np.ndarray) and not ti.data.flags.owndata:   # a view into the mmap
                    drop_file_pages(ti.data)   # its repacked copy is what the kernels read
        return MatrixGroup(packed, tensors)


class MatrixGroup(list):
    """The PackedMatrix parts of one product, their outputs side by side, and the GGUF tensors they hold:
    `tensors` = [(name, first output column, rows, cols)]. `lora` is the active adapters' low-rank side path
    beside this product (engine/adapters.py), None without adapters."""

    def __init__(self, parts, tensors):
        super().__init__(parts)
        self.tensors = tensors
        self.lora = None


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


class KVCache:
    """One sequence's keys and values for every layer (float32) and how many positions they hold.
    A model has one of its own (forward); more come from LlamaModel.new_cache() (forward_batch)."""

    def __init__(self, k: list[np.ndarray], v: list[np.ndarray], pool: tuple | None = None, slot: int = 0):
        self.k = k            # per layer [n_head_kv, head_dim, n_ctx] (transposed, see ops.attention)
        self.v = v            # per layer [n_head_kv, n_ctx, v_head_dim]
        self.n_ctx = int(k[0].shape[2]) if k else 0
        self.n_past = 0
        # Caches made together by new_caches() are slices of one array per layer (pool = (K pools, V pools)),
        # so the decode attention of all of them is one kernel launch (ops.attention_slots).
        self.pool = pool
        self.slot = slot

    def truncate(self, n: int) -> None:
        """Keep the first n positions (later ones are overwritten by the next forward)."""
        if not 0 <= n <= self.n_past:
            raise ModelError(f"cannot truncate the cache to {n} tokens: it holds {self.n_past}")
        self.n_past = int(n)

    def reset(self) -> None:
        self.truncate(0)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


@dataclass
class _Layer:
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    qkv: MatrixGroup
    out: MatrixGroup
    gate_up: MatrixGroup
    down: MatrixGroup
    n_head: int
    n_head_kv: int
    n_ff: int


class LlamaModel:
    """A loaded LLaMA model with its KV cache: `forward` appends tokens and returns their logits, `truncate`
    drops cached positions from the end, `reset` empties the cache."""

    def __init__(self, hparams: LlamaHParams, n_ctx: int, n_threads: int | None):
        self.hparams = hparams
        self.n_ctx = int(n_ctx)
        self.n_threads = n_threads
        self.cache: KVCache | None = None   # the sequence forward() extends
        self.layers: list[_Layer] = []
        self.load_seconds = 0.0
        self.weights_nbytes = 0
        self.kv_nbytes = 0
        self.embd_lora = None   # the active adapters' token_embd side path (engine/adapters.py)

    # ------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, reader, n_ctx: int = 4096, n_threads: int | None = None) -> "LlamaModel":
        t0 = time.perf_counter()
        if n_ctx <= 0:
            raise ModelError(f"{reader.path}: context size must be positive, got {n_ctx}")
        if n_threads is not None and int(n_threads) < 1:
            raise ModelError(f"thread count must be at least 1, got {n_threads}")
        hp = read_hparams(reader)
        check_context(reader.path, n_ctx,
                      sum(nkv * (hp.head_dim + hp.v_head_dim) for nkv in hp.n_head_kv_per_layer))
        fixed_mmap_threshold()   # glibc settings for the load's large temporaries: runtime.py
        w = _Weights(reader)
        E = hp.n_embd
        self = cls(hp, n_ctx, n_threads)
        self.tok_embd = w.matrix([("token_embd.weight", (hp.n_vocab, E))])[0]
        if "output.weight" in reader.tensors:
            self.output = w.matrix([("output.weight", (hp.n_vocab, E))])
        else:
            hp.tied_embeddings = True
            # the output product of tied embeddings is still "output.weight" to adapters (PEFT's lm_head)
            self.output = MatrixGroup([self.tok_embd], [("output.weight", 0, hp.n_vocab, E)])
        self.output_norm = w.vector("output_norm.weight", E)
        for il in range(hp.n_layer):
            b = f"blk.{il}."
            nh, nkv, nff = hp.n_head_per_layer[il], hp.n_head_kv_per_layer[il], hp.n_ff_per_layer[il]
            qd, kd, vd = nh * hp.head_dim, nkv * hp.head_dim, nkv * hp.v_head_dim
            layer = _Layer(
                attn_norm=w.vector(b + "attn_norm.weight", E),
                ffn_norm=w.vector(b + "ffn_norm.weight", E),
                qkv=w.matrix([(b + "attn_q.weight", (qd, E)), (b + "attn_k.weight", (kd, E)),
                              (b + "attn_v.weight", (vd, E))]),
                out=w.matrix([(b + "attn_output.weight", (E, nh * hp.v_head_dim))]),
                gate_up=w.matrix([(b + "ffn_gate.weight", (nff, E)), (b + "ffn_up.weight", (nff, E))]),
                down=w.matrix([(b + "ffn_down.weight", (E, nff))]),
                n_head=nh, n_head_kv=nkv, n_ff=nff)
            self.layers.append(layer)
        self._rope_setup(reader, w)
        extra = [n for n in reader.tensors if n not in w.used and n != "rope_freqs.weight"]
        if extra:
            raise ModelError(f"{reader.path}: unsupported tensor {extra[0]}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        mats = [self.tok_embd] + ([] if hp.tied_embeddings else self.output)
        for layer in self.layers:
            mats += layer.qkv + layer.out + layer.gate_up + layer.down
        self.weights_nbytes = sum(p.nbytes for p in mats)   # repacked weights held in memory
        self.cache = self.new_cache()
        self.kv_nbytes = self.cache.nbytes   # reserved (committed as used)
        trim_heap()
        self.load_seconds = time.perf_counter() - t0
        return self

    def matrix_groups(self) -> list[MatrixGroup]:
        """Every product a LoRA adapter may sit beside (token_embd's lookup is `embd_lora`)."""
        return [self.output] + [g for L in self.layers for g in (L.qkv, L.out, L.gate_up, L.down)]

    def _rope_setup(self, reader, w: _Weights) -> None:
        """Per-dimension rotation speeds: theta_i = pos * base^(-2i/n_rot) / rope_freqs_i (ggml NORM)."""
        hp = self.hparams
        half = hp.n_rot // 2
        inv = hp.rope_base ** (-2.0 * np.arange(half, dtype=np.float64) / hp.n_rot)
        if "rope_freqs.weight" in reader.tensors:
            inv = inv / w.vector("rope_freqs.weight", half, positive=True).astype(np.float64)
        self._inv_freq = inv
        self._yarn_mix = None
        self._rope_mscale = 1.0
        if hp.rope_scaling == "yarn":
            # ggml's rope_yarn: blend interpolated and extrapolated angles per dimension with a linear
            # ramp between the "correction dims", and scale cos/sin (hence q and k) by mscale.
            def corr_dim(n_rot_turns):
                return hp.n_rot * math.log(hp.rope_orig_ctx / (n_rot_turns * 2 * math.pi)) / \
                    (2 * math.log(hp.rope_base))
            low = max(0.0, math.floor(corr_dim(hp.yarn_beta_fast)))
            high = min(hp.n_rot - 1.0, math.ceil(corr_dim(hp.yarn_beta_slow)))
            y = (np.arange(half, dtype=np.float64) - low) / max(0.001, high - low)
            ramp = 1.0 - np.clip(y, 0.0, 1.0)
            self._yarn_mix = ramp * hp.yarn_ext_factor
            mscale = hp.yarn_attn_factor
            if hp.yarn_ext_factor != 0.0:
                mscale *= 1.0 + 0.1 * math.log(1.0 / hp.rope_freq_scale)
            self._rope_mscale = mscale

    def _rope_tables(self, pos0: int, T: int):
        hp = self.hparams
        pos = np.arange(pos0, pos0 + T, dtype=np.float64)[:, None]
        extrap = pos * self._inv_freq[None, :]
        interp = extrap * hp.rope_freq_scale
        theta = interp if self._yarn_mix is None else interp * (1 - self._yarn_mix) + extrap * self._yarn_mix
        c = (np.cos(theta) * self._rope_mscale).astype(np.float32)
        s = (np.sin(theta) * self._rope_mscale).astype(np.float32)
        return c, s

    # ------------------------------------------------------------------------------------- running
    def new_cache(self) -> KVCache:
        """An empty KV cache of n_ctx positions for one more sequence (zeros: pages are only committed as
        the context fills)."""
        hp = self.hparams
        return KVCache([np.zeros((L.n_head_kv, hp.head_dim, self.n_ctx), np.float32) for L in self.layers],
                       [np.zeros((L.n_head_kv, self.n_ctx, hp.v_head_dim), np.float32) for L in self.layers])

    def new_caches(self, n: int) -> list[KVCache]:
        """n empty KV caches that are slices of one array per layer (forward_batch runs the decode attention
        of such caches in one launch)."""
        hp = self.hparams
        kp = [np.zeros((n, L.n_head_kv, hp.head_dim, self.n_ctx), np.float32) for L in self.layers]
        vp = [np.zeros((n, L.n_head_kv, self.n_ctx, hp.v_head_dim), np.float32) for L in self.layers]
        pool = (kp, vp)
        return [KVCache([a[i] for a in kp], [a[i] for a in vp], pool=pool, slot=i) for i in range(n)]

    @property
    def n_past(self) -> int:
        return self.cache.n_past

    def truncate(self, n: int) -> None:
        """Keep the first n cached positions of the model's own cache."""
        self.cache.truncate(n)

    def reset(self) -> None:
        self.cache.reset()

    def forward(self, tokens: Sequence[int], all_logits: bool = False, hidden: bool = False) -> np.ndarray:
        """Extend the model's own cache by `tokens`: logits after the last one ([n_vocab]), or after each
        ([T, n_vocab]) with all_logits. hidden=True returns the final-normed hidden states instead ([T, n_embd],
        or [n_embd]): what embeddings pool."""
        out = self._forward([self.cache], [tokens], all_logits, hidden)
        return out if all_logits else out[0]

    def forward_batch(self, caches: Sequence[KVCache], tokens: Sequence[Sequence[int]]) -> np.ndarray:
        """One forward pass for several sequences, each extending its own cache by its own tokens (one
        token for a decode step, several for a chunk of prompt): float32 [len(caches), n_vocab], the logits
        after each sequence's last token. Each row equals what forward() on that cache alone returns: the
        matrix products share one pass over the weights, rope/attention run per sequence at its position."""
        if len(caches) != len(tokens) or not caches:
            raise ModelError("forward_batch() needs one token list per cache, and at least one")
        if len({id(c) for c in caches}) != len(caches):
            raise ModelError("forward_batch() got the same cache twice")
        return self._forward(list(caches), list(tokens), False)

    def _forward(self, caches: list[KVCache], tokens: list, all_logits: bool, hidden: bool = False) -> np.ndarray:
        hp = self.hparams
        seqs = [np.asarray(list(t) if not isinstance(t, np.ndarray) else t, dtype=np.int64).reshape(-1)
                for t in tokens]
        for c, ids in zip(caches, seqs):
            T = int(ids.size)
            if T == 0:
                raise ModelError("forward() needs at least one token")
            if c.n_past + T > self.n_ctx:
                raise ContextFullError(f"context full: {c.n_past} cached + {T} new tokens > n_ctx {self.n_ctx}")
            if ids.min() < 0 or ids.max() >= hp.n_vocab:
                bad = int(ids[(ids < 0) | (ids >= hp.n_vocab)][0])
                raise ModelError(f"token id {bad} is outside the vocabulary (0..{hp.n_vocab - 1})")
        # per call: numba's thread count is per OS thread and other models may have changed it
        numba.set_num_threads(min(int(self.n_threads or numba.config.NUMBA_NUM_THREADS),
                                  numba.config.NUMBA_NUM_THREADS))

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
        ropes = [self._rope_tables(pos0, r1 - r0) for r0, r1, _, pos0 in spans]
        h = np.empty_like(x)
        eps = np.float32(hp.rms_eps)
        scale = np.float32(1.0 / math.sqrt(hp.head_dim))
        # The decode rows of caches sharing one pool: their attention is one launch per layer.
        pool = spans[0][2].pool if n_dec > 1 else None
        pooled = pool is not None and all(c.pool is pool for _, _, c, _ in spans[:n_dec])
        if pooled:
            slots = np.array([c.slot for _, _, c, _ in spans[:n_dec]], np.int64)
            positions = np.array([p for _, _, _, p in spans[:n_dec]], np.int64)
        for il, L in enumerate(self.layers):
            ops.rmsnorm(x, L.attn_norm, eps, h)
            qkv = _matmul_rows(L.qkv, h, groups)
            att = np.empty((T, L.n_head * hp.v_head_dim), np.float32)
            if pooled:
                q_dec = np.empty((n_dec, L.n_head, hp.head_dim), np.float32)
            for i, ((r0, r1, cache, pos0), (cos, sin)) in enumerate(zip(spans, ropes)):
                k_cache, v_cache = cache.k[il], cache.v[il]
                in_pool = pooled and i < n_dec
                q = q_dec[i:i + 1] if in_pool else np.empty((r1 - r0, L.n_head, hp.head_dim), np.float32)
                ops.rope_store(qkv[r0:r1], cos, sin, q, k_cache, v_cache, pos0, L.n_head, L.n_head_kv,
                               hp.head_dim, hp.v_head_dim)
                if in_pool:
                    continue
                if r1 - r0 >= BLAS_ATTENTION_TOKENS:
                    ops.attention_blas(q, k_cache, v_cache, pos0, scale, att[r0:r1])
                else:
                    ops.attention(q, k_cache, v_cache, pos0, scale, att[r0:r1])
            if pooled:
                ops.attention_slots(q_dec, pool[0][il], pool[1][il], slots, positions, scale, att[:n_dec])
            _add_matmul_rows(L.out, att, x, groups)
            ops.rmsnorm(x, L.ffn_norm, eps, h)
            gu = _matmul_rows(L.gate_up, h, groups)
            a = np.empty((T, L.n_ff), np.float32)
            ops.swiglu(gu, L.n_ff, a)
            _add_matmul_rows(L.down, a, x, groups)
        for r0, r1, cache, pos0 in spans:
            cache.n_past = pos0 + (r1 - r0)
        if all_logits:
            out_rows, out_groups = x, groups
        else:   # only each sequence's last position; one row per sequence, as forward() computes it
            out_rows = x[[r1 - 1 for _, r1, _, _ in spans]]
            out_groups = [(0, len(spans), True)] if len(spans) > 1 else [(0, 1, False)]
        hn = np.empty_like(out_rows)
        ops.rmsnorm(out_rows, self.output_norm, eps, hn)
        out = hn if hidden else check_logits(_matmul_rows(self.output, hn, out_groups))
        if all_logits:
            return out
        back = np.empty_like(out)
        back[order] = out                     # rows back in the callers' order
        return back
