"""THE one map from Hugging Face LLaMA tensor names to GGUF names (docs/formats.md §4).

Both the checkpoint conversion and the LoRA merging go through `gguf_name`, so a name is
spelled in exactly one place.
"""
from __future__ import annotations

import re

from llmrun.errors import ConvertError

# whole-model tensors
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# per-layer tensors: HF suffix after "model.layers.N." -> GGUF suffix after "blk.N."
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# HF tensors that carry no weights for inference and are dropped
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")   # group 1: the layer of a per-layer HF tensor

ROPE_FREQS = "rope_freqs.weight"
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"

# GGUF tensors whose rows are permuted for ggml's NORM RoPE, and the head count they are permuted with
PERMUTED = {"attn_q.weight": "n_head", "attn_k.weight": "n_head_kv"}

# order of the per-layer tensors in the output file (llama.cpp's own loading order)
BLOCK_ORDER = list(_BLOCK.values())


def gguf_name(hf_name: str) -> str | None:
    """GGUF name of a HF tensor, None for tensors to drop; ConvertError for anything unknown."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = LAYER_RE.match(hf_name)
    if m and m.group(2) in _BLOCK:
        return f"blk.{int(m.group(1))}.{_BLOCK[m.group(2)]}"
    if _IGNORED.search(hf_name):
        return None
    raise ConvertError(f"unexpected tensor {hf_name!r}: not part of a LLaMA checkpoint "
                       "(biases and other extras are not supported)")


def block_suffix(gguf: str) -> str:
    """`blk.3.attn_q.weight` -> `attn_q.weight` (other names unchanged)."""
    return gguf.split(".", 2)[2] if gguf.startswith("blk.") else gguf
