"""THE one map from Hugging Face tensor names to GGUF names, per GGUF architecture (docs/formats.md §4).

Both the checkpoint conversion and the LoRA merging go through `gguf_name`, so a name is spelled in
exactly one place. Each architecture's block table is the LLaMA table plus what that family adds or
renames (llama.cpp's gguf-py tensor_mapping.py names the same tensors).
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
_LLAMA_BLOCK = {
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
_QKV_BIAS = {"self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias"}
_QK_NORM = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
# Gemma 2/3: a norm after attention and around the FFN (HF's post_attention_layernorm is NOT the FFN's norm here)
_GEMMA_NORMS = {"post_attention_layernorm.weight": "post_attention_norm.weight",
                "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                "post_feedforward_layernorm.weight": "post_ffw_norm.weight"}
# Phi-3: fused Q/K/V and gate/up projections, kept fused (ffn_up holds gate then up)
_PHI3 = {"self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight"}


def _without(table: dict, *hf_suffixes: str) -> dict:
    return {k: v for k, v in table.items() if k not in hf_suffixes}


_BLOCKS = {
    "llama": _LLAMA_BLOCK,
    "qwen2": {**_LLAMA_BLOCK, **_QKV_BIAS},
    "qwen3": {**_LLAMA_BLOCK, **_QK_NORM},
    "phi3": {**_without(_LLAMA_BLOCK, "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                        "self_attn.v_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight"), **_PHI3},
    "gemma2": {**_LLAMA_BLOCK, **_GEMMA_NORMS},
    "gemma3": {**_LLAMA_BLOCK, **_GEMMA_NORMS, **_QK_NORM},
}

# HF tensors that carry no weights for inference and are dropped
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# the text model inside a multimodal checkpoint (Gemma3ForConditionalGeneration), and what is not text
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_NOT_TEXT = re.compile(r"^(model\.)?(vision_tower|vision_model|multi_modal_projector|multimodal_projector)\.")

LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")   # group 1: the layer of a per-layer HF tensor

ROPE_FREQS = "rope_freqs.weight"
ROPE_FACTORS_SHORT = "rope_factors_short.weight"
ROPE_FACTORS_LONG = "rope_factors_long.weight"
TOKEN_EMBD = "token_embd.weight"
OUTPUT = "output.weight"

# GGUF tensors whose rows are permuted for ggml's NORM RoPE (llama only), and the head count they are
# permuted with
PERMUTED = {"attn_q.weight": "n_head", "attn_k.weight": "n_head_kv"}


def block_order(arch: str) -> list[str]:
    """The per-layer GGUF tensors of an architecture, in the output file's order (llama.cpp's own)."""
    return list(_BLOCKS[arch].values())


def text_name(hf_name: str) -> str | None:
    """The text-model name of a checkpoint tensor (multimodal prefixes removed); None for vision tensors."""
    if _NOT_TEXT.match(hf_name):
        return None
    for prefix, repl in _TEXT_PREFIXES:
        if hf_name.startswith(prefix):
            return repl + hf_name[len(prefix):]
    return hf_name


def gguf_name(hf_name: str, arch: str = "llama") -> str | None:
    """GGUF name of a HF tensor, None for tensors to drop; ConvertError for anything unknown."""
    name = text_name(hf_name)
    if name is None:
        return None
    if name in _GLOBAL:
        return _GLOBAL[name]
    block = _BLOCKS[arch]
    m = LAYER_RE.match(name)
    if m and m.group(2) in block:
        return f"blk.{int(m.group(1))}.{block[m.group(2)]}"
    if _IGNORED.search(name):
        return None
    raise ConvertError(f"unexpected tensor {hf_name!r}: not part of a {arch} checkpoint "
                       "(biases and other extras of other architectures are not supported)")


def block_suffix(gguf: str) -> str:
    """`blk.3.attn_q.weight` -> `attn_q.weight` (other names unchanged)."""
    return gguf.split(".", 2)[2] if gguf.startswith("blk.") else gguf
