"""What the engine checks in a model file before building anything from it, and what it checks while running.

* Hyper-parameter keys must have the right kind and a sane range (``check_hparams``): a count read from the
  file is compared with what the file actually holds before any list or array of that length is made (a
  768-byte file claiming two billion layers fails here, not after allocating 48 GB).
* Values that would poison every later computation (NaN/Inf norm weights or block scales, eps <= 0) are
  refused at load (``check_vector``, ``check_matrix``); what cannot be checked cheaply is caught at run time
  by ``check_logits``.
* The KV cache a context size asks for must fit in the machine's memory (``check_context``).
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import InvalidArgumentError, ModelError
from ..gguf.metadata import TypedMetadata
from ..quants.floats import BF16_EXP, F16_EXP, first_nonfinite

_MAX_DIM = 1 << 31          # any single dimension of a model (int32 arithmetic in the kernels)


def check_hparams(reader, arch: str) -> None:
    """Kinds and ranges of the `{arch}.*` keys the engine reads (one ModelError naming the key)."""
    md = TypedMetadata(reader.metadata, reader.path, ModelError)
    p = arch + "."
    # Every layer has several tensors: a block count beyond the number of tensors in the file is a lie, and
    # the engine builds per-layer lists of that length before it looks for the tensors.
    n_layer = md.get_int(p + "block_count", lo=1, hi=max(1, len(reader.tensors)))
    md.get_int(p + "embedding_length", lo=1, hi=_MAX_DIM)
    for key in ("attention.head_count", "feed_forward_length"):
        md.get_int_or_array(p + key, n_layer, lo=1, hi=_MAX_DIM)
    md.get_int_or_array(p + "attention.head_count_kv", n_layer, None, lo=1, hi=_MAX_DIM)
    for key in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        md.get_int(p + key, None, lo=1, hi=_MAX_DIM)
    for key in ("context_length", "vocab_size", "rope.scaling.original_context_length"):
        md.get_int(p + key, None, lo=0, hi=1 << 32)
    md.get_float(p + "attention.layer_norm_rms_epsilon", lo=0.0, lo_open=True, hi=1.0)
    base = md.get_float(p + "rope.freq_base", 10000.0, lo=0.0, lo_open=True)
    for key in ("rope.scaling.factor", "rope.scale_linear"):
        md.get_float(p + key, None, lo=0.0)
    scaling = md.get_str(p + "rope.scaling.type", None)
    if scaling == "yarn":
        # YaRN's correction dimensions divide by log(base) and by log(ctx / beta)
        if base == 1.0:
            md.fail(p + "rope.freq_base", "must not be 1 with YaRN scaling (it divides by log(freq_base))")
        for key in ("rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow"):
            md.get_float(p + key, None, lo=0.0, lo_open=True)
        for key in ("rope.scaling.yarn_ext_factor", "rope.scaling.attn_factor"):
            md.get_float(p + key, None)
        orig = md.get_int(p + "rope.scaling.original_context_length", None, lo=1)
        if orig is None and not md.get_int(p + "context_length", 0):
            md.fail(p + "rope.scaling.original_context_length", "is needed by YaRN scaling")
    emb = reader.tensors.get("token_embd.weight")
    tokens = reader.metadata.get("tokenizer.ggml.tokens")
    if emb is not None and isinstance(tokens, list) and len(tokens) != emb.shape[0]:
        raise ModelError(f"{reader.path}: the vocabulary has {len(tokens)} tokens but token_embd.weight has "
                         f"{emb.shape[0]} rows")


def check_context(where: str, n_ctx: int, kv_bytes_per_token: float) -> None:
    """Refuse a context whose KV cache cannot fit in this machine's memory."""
    need = int(n_ctx * kv_bytes_per_token)
    have = _physical_memory()
    if have and need > have:
        raise InvalidArgumentError(f"{where}: a context of {n_ctx} tokens needs {need / 2**30:.1f} GiB of KV cache, "
                                   f"more than this machine's {have / 2**30:.1f} GiB of memory (use a smaller n_ctx)")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_vector(where: str, name: str, v: np.ndarray, positive: bool = False) -> None:
    """A 1-D float32 weight (norms, rope factors) must be finite (and > 0 where it divides)."""
    if first_nonfinite(v) is not None:
        raise ModelError(f"{where}: tensor {name} holds NaN or Inf values")
    if positive and v.size and not (v > 0).all():
        raise ModelError(f"{where}: tensor {name} holds values <= 0 (they divide the rotation angles)")


def check_matrix(where: str, name: str, pm) -> None:
    """Block scales and offsets of a packed matrix must be finite; raw float matrices too (one pass)."""
    arrays = []
    for part in (pm.d, pm.m):
        if isinstance(part, tuple):
            arrays.append(part[0])          # half super-block scales (the sub-scales are small integers)
        elif part is not None:
            arrays.append(part)
    if pm.family in ("h16", "f32"):
        arrays.append(pm.codes)
    for a in arrays:
        if a.dtype == np.uint16:
            mask = BF16_EXP if (pm.family == "h16" and pm.kind == 1 and a is pm.codes) else F16_EXP
            bad = first_nonfinite(a, np.uint16(mask))
        else:
            bad = first_nonfinite(a)
        if bad is not None:
            what = "values" if a is pm.codes else "block scales"
            raise ModelError(f"{where}: tensor {name} holds NaN or Inf {what}")


def check_logits(logits: np.ndarray) -> np.ndarray:
    """The run-time guard: a non-finite logit means broken weights that the load checks could not see."""
    if not np.isfinite(logits).all():
        raise ModelError("the model computed NaN or Inf logits: its weights are broken (overflowing or "
                         "non-finite values)")
    return logits
