"""Hyper-parameters of a GGUF model, read from its `{arch}.*` metadata the way llama.cpp's loader reads them.

Every key goes through one typed accessor (`_Meta.get`), so a missing or mistyped key is one ModelError
that names it. Architecture defaults (a window, a local RoPE base) come from archs.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelError
from ..gguf.metadata import REQUIRED as _TM_REQUIRED, TypedMetadata
from .load_checks import check_hparams
from .archs import ARCHS, Arch, supported

_REQUIRED = object()


class _Meta:
    """The file's `{arch}.*` keys through gguf/metadata.py's typed accessor (keys given without the prefix)."""

    def __init__(self, reader, arch: str):
        self.prefix = arch + "."
        self.md = TypedMetadata(reader.metadata, reader.path, ModelError)

    def has(self, key: str) -> bool:
        return self.prefix + key in self.md

    def get(self, key: str, kind, default=_REQUIRED):
        """A scalar of `kind` (int, float, str, bool), or a per-layer list when kind is (list, n_layer, int|bool):
        llama.cpp's key-or-array hyper-parameters (a scalar is repeated over the layers)."""
        full, md = self.prefix + key, self.md
        if default is _REQUIRED:
            default = _TM_REQUIRED
        if isinstance(kind, tuple):
            _, n, elem = kind
            if elem is int:
                return md.get_int_or_array(full, n, default)
            value = md.metadata.get(full)
            if isinstance(value, (list, np.ndarray)):
                flags = [bool(v) for v in md.get_array(full, "bool")]
                if len(flags) != n:
                    md.fail(full, f"has {len(flags)} entries for {n} layers")
                return flags
            flag = md.get_bool(full, default)
            return flag if flag is default else [flag] * n
        return {int: md.get_int, float: md.get_float, str: md.get_str, bool: md.get_bool}[kind](full, default)


@dataclass
class HParams:
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
    rope_orig_ctx: int = 0           # YaRN / LongRoPE: original training context
    yarn_ext_factor: float = 0.0
    yarn_attn_factor: float = 1.0    # rope.scaling.attn_factor: scales cos/sin (YaRN's and LongRoPE's mscale)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    tied_embeddings: bool = False
    # per-layer values (equal to the scalars above unless the file stores per-layer arrays)
    n_head_per_layer: list[int] = field(default_factory=list)
    n_head_kv_per_layer: list[int] = field(default_factory=list)
    n_ff_per_layer: list[int] = field(default_factory=list)
    # the relatives' pieces (archs.py)
    arch: Arch = ARCHS["llama"]
    sliding_window: int = 0                                    # 0: none
    swa_layers: list[bool] = field(default_factory=list)       # per layer: uses the sliding window
    rope_base_swa: float = 0.0                                 # RoPE base of sliding layers when local_rope
    local_rope: bool = False                                   # sliding layers have their own, unscaled RoPE
    attn_scale: float = 0.0                                    # multiplies q (1/sqrt(head_dim) by default)
    attn_softcap: float = 0.0                                  # 0: none
    final_softcap: float = 0.0


LlamaHParams = HParams   # the name before the relatives arrived


def _arch(reader) -> Arch:
    name = reader.metadata.get("general.architecture")
    arch = ARCHS.get(name) if isinstance(name, str) else None
    if arch is None:
        raise ModelError(f"{reader.path}: architecture {name!r} is not supported (supported: {supported()})")
    return arch


def read_hparams(reader) -> HParams:
    arch = _arch(reader)
    check_hparams(reader, arch.name)   # kinds and ranges first: counts checked against what the file holds
    m = _Meta(reader, arch.name)
    path = reader.path
    n_embd = m.get("embedding_length", int)
    n_layer = m.get("block_count", int)
    if n_layer <= 0 or n_embd <= 0:
        raise ModelError(f"{path}: invalid model dimensions")
    layers = (list, n_layer, int)
    heads = m.get("attention.head_count", layers)
    heads_kv = m.get("attention.head_count_kv", layers, list(heads))
    n_ffs = m.get("feed_forward_length", layers)
    if min(heads) <= 0 or min(n_ffs) <= 0:
        raise ModelError(f"{path}: invalid model dimensions")
    for h, hk in zip(heads, heads_kv):
        if hk <= 0 or h % hk:
            raise ModelError(f"{path}: head_count {h} is not a multiple of head_count_kv {hk}")
    head_dim = m.get("attention.key_length", int, n_embd // heads[0])
    v_head_dim = m.get("attention.value_length", int, head_dim)
    n_rot = m.get("rope.dimension_count", int, head_dim)
    if head_dim <= 0 or v_head_dim <= 0 or head_dim % 2:
        raise ModelError(f"{path}: invalid head size {head_dim}")
    if arch.rope_full_width and n_rot != head_dim:
        raise ModelError(f"{path}: rope.dimension_count {n_rot} must equal the head size {head_dim}")
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise ModelError(f"{path}: rope.dimension_count {n_rot} must be even and at most the head size {head_dim}")
    n_ctx_train = m.get("context_length", int, 0)

    scaling = m.get("rope.scaling.type", str, "linear")
    factor = m.get("rope.scaling.factor", float, 0.0)
    if factor == 0.0:  # older files: rope.scale_linear
        factor = m.get("rope.scale_linear", float, 0.0)
    if scaling not in ("none", "linear", "yarn"):
        raise ModelError(f"{path}: rope scaling type {scaling!r} is not supported")
    freq_scale = 1.0 / factor if factor > 0 and scaling != "none" else 1.0
    if freq_scale == 1.0 and scaling == "linear":
        scaling = "none"
    emb = reader.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelError(f"{path}: missing tensor token_embd.weight")
    hp = HParams(
        n_vocab=int(emb.shape[0]), n_embd=n_embd, n_layer=n_layer, n_head=heads[0], n_head_kv=heads_kv[0],
        head_dim=head_dim, n_ff=n_ffs[0], rms_eps=m.get("attention.layer_norm_rms_epsilon", float),
        rope_base=m.get("rope.freq_base", float, 10000.0), v_head_dim=v_head_dim,
        n_rot=n_rot, n_ctx_train=n_ctx_train, rope_scaling=scaling, rope_freq_scale=freq_scale,
        rope_orig_ctx=m.get("rope.scaling.original_context_length", int, n_ctx_train),
        yarn_attn_factor=m.get("rope.scaling.attn_factor", float, 1.0),
        n_head_per_layer=heads, n_head_kv_per_layer=heads_kv, n_ff_per_layer=n_ffs, arch=arch)
    if scaling == "yarn":
        hp.yarn_ext_factor = m.get("rope.scaling.yarn_ext_factor", float, 1.0)
        hp.yarn_beta_fast = m.get("rope.scaling.yarn_beta_fast", float, 32.0)
        hp.yarn_beta_slow = m.get("rope.scaling.yarn_beta_slow", float, 1.0)
    _read_relatives(m, hp, path)
    return hp


def _read_relatives(m: _Meta, hp: HParams, path) -> None:
    """Sliding window, soft-capping and the attention scale: the keys only some architectures use."""
    arch = hp.arch
    window = m.get("attention.sliding_window", int, arch.default_window)
    if window < 0:
        raise ModelError(f"{path}: attention.sliding_window {window} is negative")
    hp.sliding_window = window
    if window == 0:
        hp.swa_layers = [False] * hp.n_layer
    elif m.has("attention.sliding_window_pattern"):
        hp.swa_layers = m.get("attention.sliding_window_pattern", (list, hp.n_layer, bool))
    else:
        p = arch.swa_period
        hp.swa_layers = [p == 0 or il % p < p - 1 for il in range(hp.n_layer)]
    hp.local_rope = any(hp.swa_layers) and (arch.swa_rope_base > 0 or m.has("rope.freq_base_swa"))
    hp.rope_base_swa = m.get("rope.freq_base_swa", float, arch.swa_rope_base or hp.rope_base)
    if arch.softcaps is not None:
        hp.attn_softcap = m.get("attn_logit_softcapping", float, arch.softcaps[0])
        hp.final_softcap = m.get("final_logit_softcapping", float, arch.softcaps[1])
    if m.has("attention.scale"):
        hp.attn_scale = m.get("attention.scale", float)
    elif hp.n_layer in arch.scale_by_embd_per_head_at:
        hp.attn_scale = 1.0 / math.sqrt(hp.n_embd // hp.n_head)
    else:
        hp.attn_scale = 1.0 / math.sqrt(hp.head_dim)
    if not (hp.attn_scale > 0 and math.isfinite(hp.attn_scale)) or hp.attn_softcap < 0 or hp.final_softcap < 0:
        raise ModelError(f"{path}: invalid attention scale or soft-capping values")
