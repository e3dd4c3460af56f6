"""Loading the graph (model.py) from a GGUF file: the hyper-parameters and load checks, each layer's repacked
matrices, norms and biases as the file's Arch describes them (archs.py), the RoPE tables, the KV cache, and the
kernels the file's types need, compiled in worker processes while the weights load (kernels/warmup.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ModelError
from ..kernels import kv_formats, warmup
from ..kernels.repack import FAMILY
from ..runtime import fixed_mmap_threshold, forward_heap, trim_heap
from .hparams import read_hparams
from .kv_cache import KVCache, LayerCache
from .load_checks import check_context
from .rope import Rope
from .weights import MatrixGroup, Weights

if TYPE_CHECKING:
    from .model import LlamaModel


def _matrix_types(reader) -> tuple[set[str], str]:
    """The repack families of a file's matrices, and their ggml type names ("q4_1, q8_0")."""
    types = sorted({ti.ggml_type for ti in reader.tensors.values()
                    if len(ti.shape) == 2 and ti.ggml_type in FAMILY}, key=int)
    return {FAMILY[t] for t in types}, ", ".join(t.lower for t in types) or "f32"


@dataclass
class Layer:
    """One block of the graph as loaded: its matrices (repacked), norms, biases and its part of the KV cache."""
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    qkv: MatrixGroup
    out: MatrixGroup
    gate_up: MatrixGroup
    down: MatrixGroup
    n_head: int
    n_head_kv: int
    n_ff: int
    cache: LayerCache                        # this layer's part of the model's own KV cache
    rope: int = 0                            # index into LlamaModel.ropes
    qkv_bias: np.ndarray | None = None       # [q | k | v] biases, zeros where the file has none
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None

    @property
    def k_cache(self) -> np.ndarray:
        return self.cache.k

    @property
    def v_cache(self) -> np.ndarray:
        return self.cache.v


class ModelLoading:
    """Mixed into `LlamaModel` (model.py): building it from a GGUF file -- its layers over the repacked
    weights, its RoPE tables and KV cache, with the kernels it needs compiled meanwhile."""

    @classmethod
    def load(cls, reader, n_ctx: int = 4096, n_threads: int | None = None, type_k: str | int | None = None,
             type_v: str | int | None = None) -> "LlamaModel":
        """The model of a GGUF file, with an empty KV cache of n_ctx positions whose K and V are stored as
        type_k / type_v (f32, f16, q8_0, or ggml's type numbers 0, 1, 8; None: f16): kernels/kv_formats.py."""
        t0 = time.perf_counter()
        if n_ctx <= 0:
            raise ModelError(f"{reader.path}: context size must be positive, got {n_ctx}")
        if n_threads is not None and int(n_threads) < 1:
            raise ModelError(f"thread count must be at least 1, got {n_threads}")
        kv_types = (kv_formats.kv_type(type_k, "type_k"), kv_formats.kv_type(type_v, "type_v"))
        hp = read_hparams(reader)
        kv_formats.check_head_dims(kv_types, hp.head_dim, hp.v_head_dim, reader.path)
        check_context(reader.path, n_ctx, sum(nkv * (hp.head_dim * kv_formats.BYTES[kv_types[0]]
                                                     + hp.v_head_dim * kv_formats.BYTES[kv_types[1]])
                                              for nkv in hp.n_head_kv_per_layer))
        arch = hp.arch
        families, type_names = _matrix_types(reader)
        # the kernels this model needs, compiled in worker processes while the weights load (kernels/warmup.py)
        what = type_names + ("" if kv_types == (kv_formats.DEFAULT_KV_TYPE,) * 2 else
                             f", KV cache {'/'.join(kv_types)}")
        compiling = warmup.start(warmup.units_for(families, kv_types), what)
        fixed_mmap_threshold()   # glibc settings for the load's large temporaries: runtime.py
        w = Weights(reader)
        E = hp.n_embd
        self = cls(hp, n_ctx, n_threads)
        self.kv_types = kv_types
        self.families, self.type_names = families, type_names
        self.tok_embd = w.matrix([("token_embd.weight", (hp.n_vocab, E))])[0]
        if arch.output_tensor and w.has("output.weight"):
            self.output = w.matrix([("output.weight", (hp.n_vocab, E))])
        else:
            hp.tied_embeddings = True
            # the output product of tied embeddings is still "output.weight" to adapters (PEFT's lm_head)
            self.output = MatrixGroup([self.tok_embd], [("output.weight", 0, hp.n_vocab, E)])
        self.output_norm = w.vector("output_norm.weight", E)
        self._rope_setup(w)
        for il in range(hp.n_layer):
            self.layers.append(self._load_layer(w, il))
        extra = w.unused()
        if extra:
            raise ModelError(f"{reader.path}: unsupported tensor {extra[0]}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        mats = [self.tok_embd] + ([] if hp.tied_embeddings else self.output)
        for layer in self.layers:
            mats += layer.qkv + layer.out + layer.gate_up + layer.down
        self.weights_nbytes = sum(p.nbytes for p in mats)   # repacked weights held in memory
        self.cache = KVCache([L.cache for L in self.layers])
        self.kv_nbytes = self.cache.nbytes  # reserved (committed as used)
        # forwards longer than a ring's spare room run in batches (kv_cache.py)
        self._max_batch = min((L.cache.max_batch for L in self.layers if L.cache.ring), default=None)
        trim_heap()
        forward_heap()   # and the forwards' temporaries: runtime.py
        compiling.wait()
        self.load_seconds = time.perf_counter() - t0
        return self
    def _load_layer(self, w: Weights, il: int) -> Layer:
        hp, arch, E = self.hparams, self.hparams.arch, self.hparams.n_embd
        b = f"blk.{il}."
        nh, nkv, nff = hp.n_head_per_layer[il], hp.n_head_kv_per_layer[il], hp.n_ff_per_layer[il]
        hd, vd = hp.head_dim, hp.v_head_dim
        qd, kd, vdd = nh * hd, nkv * hd, nkv * vd
        parts = [("attn_q", qd), ("attn_k", kd), ("attn_v", vdd)]
        if arch.qkv_fused:
            qkv = w.matrix([(b + "attn_qkv.weight", (qd + kd + vdd, E))])
        else:
            qkv = w.matrix([(b + p + ".weight", (rows, E)) for p, rows in parts])
        bias = None   # llama.cpp loads attn_q/k/v.bias when present (qwen2 always has them)
        required = arch.qkv_bias == "required"
        if required or any(w.has(b + p + ".bias") for p, _ in parts):
            bias = np.concatenate([w.vector(b + p + ".bias", rows) if required or w.has(b + p + ".bias")
                                   else np.zeros(rows, np.float32) for p, rows in parts])
        if arch.gate_up_fused:
            gate_up = w.matrix([(b + "ffn_up.weight", (2 * nff, E))])
        else:
            gate_up = w.matrix([(b + "ffn_gate.weight", (nff, E)), (b + "ffn_up.weight", (nff, E))])
        window = hp.sliding_window if hp.swa_layers[il] else 0
        return Layer(
            attn_norm=w.vector(b + "attn_norm.weight", E),
            ffn_norm=w.vector(b + "ffn_norm.weight", E),
            qkv=qkv, qkv_bias=bias,
            q_norm=w.vector(b + "attn_q_norm.weight", hd) if arch.qk_norm else None,
            k_norm=w.vector(b + "attn_k_norm.weight", hd) if arch.qk_norm else None,
            out=w.matrix([(b + "attn_output.weight", (E, nh * vd))]),
            post_attn_norm=w.vector(b + "post_attention_norm.weight", E) if arch.post_norms else None,
            gate_up=gate_up,
            down=w.matrix([(b + "ffn_down.weight", (E, nff))]),
            post_ffn_norm=w.vector(b + "post_ffw_norm.weight", E) if arch.post_norms else None,
            n_head=nh, n_head_kv=nkv, n_ff=nff,
            cache=LayerCache(nkv, hd, vd, self.n_ctx, window, types=self.kv_types),
            rope=1 if window and hp.local_rope else 0)

    def _rope_setup(self, w: Weights) -> None:
        """ropes[0] for global layers; ropes[1] for sliding layers with a local RoPE (gemma3's: its own base,
        never the file's scaling)."""
        hp = self.hparams
        half = hp.n_rot // 2
        factors = None
        if hp.arch.rope_factors == "longrope":
            # llama.cpp's choice: the long factors once the context exceeds the original one
            short, long = (w.vector(n, half, positive=True) if w.has(n) else None
                           for n in ("rope_factors_short.weight", "rope_factors_long.weight"))
            factors = long if self.n_ctx > hp.rope_orig_ctx > 0 and long is not None else short
        elif w.has("rope_freqs.weight"):
            factors = w.vector("rope_freqs.weight", half, positive=True)
        yarn = None
        if hp.rope_scaling == "yarn":
            yarn = (hp.yarn_ext_factor, hp.yarn_beta_fast, hp.yarn_beta_slow, hp.rope_orig_ctx)
        self.ropes = [Rope(hp.n_rot, hp.rope_base, hp.rope_freq_scale, factors, hp.yarn_attn_factor, yarn)]
        if hp.local_rope:
            self.ropes.append(Rope(hp.n_rot, hp.rope_base_swa))
