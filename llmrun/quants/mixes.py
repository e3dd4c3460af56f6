"""llama.cpp's quantization mixes: a file type name -> the ggml type of every tensor.

Follows `src/llama-quant.cpp` of ggml-org/llama.cpp (read at commit 007dbbf3, mid-2026):
`tensor_allows_quantization`, `llama_tensor_get_type_impl`, `tensor_type_fallback`,
`llama_ftype_get_default_type`, and the type names of `tools/quantize/quantize.cpp`. Its fallback table
sends Q2_K/Q3_K to Q4_0 (older releases used IQ4_NL). Restricted to what llmrun runs: arch llama, dense
(no experts), no importance matrix, no user overrides; rules that only concern other architectures,
experts, imatrix or the IQ1/IQ2/IQ3 file types are left out.

The decisions depend on order: llama.cpp counts attn_v and ffn_down tensors as it meets them, in its
loader's order (layer number first, tensors outside blocks before all blocks, then by name), so we sort
the same way before walking the list.
"""
from __future__ import annotations

import re

from ..errors import QuantError
from ..ggml import GGML_BLOCK, GGMLType
from ..gguf.constants import LlamaFileType

F = LlamaFileType

# llama-quantize's names (lower case here; matching is case-insensitive). q3_k/q4_k/q5_k are its aliases.
FILE_TYPE_NAMES: dict[str, LlamaFileType] = {
    "f32": F.ALL_F32,
    "f16": F.MOSTLY_F16,
    "bf16": F.MOSTLY_BF16,
    "q8_0": F.MOSTLY_Q8_0,
    "q4_0": F.MOSTLY_Q4_0,
    "q4_1": F.MOSTLY_Q4_1,
    "q5_0": F.MOSTLY_Q5_0,
    "q5_1": F.MOSTLY_Q5_1,
    "q2_k": F.MOSTLY_Q2_K,
    "q3_k_s": F.MOSTLY_Q3_K_S,
    "q3_k_m": F.MOSTLY_Q3_K_M,
    "q3_k_l": F.MOSTLY_Q3_K_L,
    "q4_k_s": F.MOSTLY_Q4_K_S,
    "q4_k_m": F.MOSTLY_Q4_K_M,
    "q5_k_s": F.MOSTLY_Q5_K_S,
    "q5_k_m": F.MOSTLY_Q5_K_M,
    "q6_k": F.MOSTLY_Q6_K,
    "iq4_nl": F.MOSTLY_IQ4_NL,
    "q3_k": F.MOSTLY_Q3_K_M,
    "q4_k": F.MOSTLY_Q4_K_M,
    "q5_k": F.MOSTLY_Q5_K_M,
}

# llama_ftype_get_default_type: the type of every quantizable tensor before the mix rules.
DEFAULT_TYPE: dict[LlamaFileType, GGMLType] = {
    F.ALL_F32: GGMLType.F32,
    F.MOSTLY_F16: GGMLType.F16,
    F.MOSTLY_BF16: GGMLType.BF16,
    F.MOSTLY_Q8_0: GGMLType.Q8_0,
    F.MOSTLY_Q4_0: GGMLType.Q4_0,
    F.MOSTLY_Q4_1: GGMLType.Q4_1,
    F.MOSTLY_Q5_0: GGMLType.Q5_0,
    F.MOSTLY_Q5_1: GGMLType.Q5_1,
    F.MOSTLY_Q2_K: GGMLType.Q2_K,
    F.MOSTLY_Q2_K_S: GGMLType.Q2_K,
    F.MOSTLY_Q3_K_S: GGMLType.Q3_K,
    F.MOSTLY_Q3_K_M: GGMLType.Q3_K,
    F.MOSTLY_Q3_K_L: GGMLType.Q3_K,
    F.MOSTLY_Q4_K_S: GGMLType.Q4_K,
    F.MOSTLY_Q4_K_M: GGMLType.Q4_K,
    F.MOSTLY_Q5_K_S: GGMLType.Q5_K,
    F.MOSTLY_Q5_K_M: GGMLType.Q5_K,
    F.MOSTLY_Q6_K: GGMLType.Q6_K,
    F.MOSTLY_IQ4_NL: GGMLType.IQ4_NL,
}

_FLOAT_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)

# tensor_type_fallback: a 256-block type on rows that 256 does not divide -> a 32-block type.
_FALLBACK = {
    GGMLType.Q2_K: GGMLType.Q4_0,
    GGMLType.Q3_K: GGMLType.Q4_0,
    GGMLType.Q4_K: GGMLType.Q5_0,
    GGMLType.Q5_K: GGMLType.Q5_1,
    GGMLType.Q6_K: GGMLType.Q8_0,
}

# Name fragments of 2-D tensors llama.cpp never quantizes (the ones that can occur in a llama-arch file).
_NEVER_QUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight", "token_types.weight")


def parse_file_type(name) -> LlamaFileType:
    """A llama-quantize type name (any case, aliases included) or its number -> LlamaFileType."""
    if isinstance(name, LlamaFileType):
        return name
    key = str(name).strip().lower()
    if key in FILE_TYPE_NAMES:
        return FILE_TYPE_NAMES[key]
    if key.isdigit() and int(key) in set(FILE_TYPE_NAMES.values()):
        return LlamaFileType(int(key))
    raise QuantError(f"unknown quantization type {name!r}; valid types: {', '.join(FILE_TYPE_NAMES)}")


def _layer_of(name: str) -> int:
    m = re.match(r"blk\.([+-]?\d+)\.", name)
    return int(m.group(1)) if m else -1


def _loader_order(name: str):
    """llama_model_loader's weight_name_comparer: by layer (non-block tensors first), then by name."""
    return (_layer_of(name), name.encode())


def _category(name: str) -> str:
    """tensor_get_category, in its order of tests (substring matches)."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for fragment, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"),
                          ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                          ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                          ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        # attn_qkv / attn_kv_b are "attention-v-like" for llama.cpp: they share attn_v's rules and counter
        if fragment in name:
            return cat
    return "other"


def stays_f32(name: str, shape) -> bool:
    """True for the tensors every file type stores as F32: 1-D ones (norms, rope_freqs), norms and the
    other weights llama.cpp never quantizes (tensor_allows_quantization says no). The one statement of
    this rule: the converter and `llmrun quantize` both get their types from plan_tensor_types."""
    if len(shape) < 2 or not name.endswith("weight"):
        return True
    return any(fragment in name for fragment in _NEVER_QUANTIZED)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers the _M mixes give more bits: the first and last eighth, and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


class _MixState:
    """llama.cpp's quantize_state_impl, reduced to what a dense llama without imatrix uses."""

    def __init__(self, ftype: LlamaFileType, names: list[str], n_layer: int, n_head: int, n_head_kv: int):
        self.ftype = ftype
        self.n_layer = n_layer
        self.n_gqa = n_head // n_head_kv if n_head_kv else 0
        # LLM_TYPE_70B: llama-2/3 70B get their (8x shared) attn_v bumped to Q5_K
        self.is_70b = n_layer == 80 and n_head != n_head_kv
        self.has_tied_embeddings = "output.weight" not in names
        self.n_attention_wv = sum(_category(n) == "attn_v" for n in names)
        self.i_attention_wv = 0
        self.i_ffn_down = 0

    def mix_type(self, name: str, shape: tuple[int, ...], new_type: GGMLType) -> GGMLType:
        """llama_tensor_get_type_impl for arch llama."""
        ft, cat = self.ftype, _category(name)
        if cat == "output" or (self.has_tied_embeddings and cat == "token_embd"):
            # the output matrix (or the tied embeddings doubling as it) is the most sensitive: Q6_K
            if shape[-1] % GGML_BLOCK[new_type][0] != 0:
                return GGMLType.Q8_0
            return new_type if new_type == GGMLType.Q8_0 else GGMLType.Q6_K
        if cat == "token_embd":
            return new_type  # only IQ/TQ file types change untied embeddings
        if cat == "attn_v":
            if ft == F.MOSTLY_Q2_K:
                new_type = GGMLType.Q4_K if self.n_gqa >= 4 else GGMLType.Q3_K
            elif ft == F.MOSTLY_Q2_K_S and self.n_gqa >= 4:
                new_type = GGMLType.Q4_K
            elif ft == F.MOSTLY_Q3_K_M:
                new_type = GGMLType.Q5_K if self.i_attention_wv < 2 else GGMLType.Q4_K
            elif ft == F.MOSTLY_Q3_K_L:
                new_type = GGMLType.Q5_K
            elif ft == F.MOSTLY_IQ4_NL and self.n_gqa >= 4:
                new_type = GGMLType.Q5_K
            elif ft in (F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M) and use_more_bits(self.i_attention_wv, self.n_attention_wv):
                new_type = GGMLType.Q6_K
            elif ft == F.MOSTLY_Q4_K_S and self.i_attention_wv < 4:
                new_type = GGMLType.Q5_K
            if self.is_70b and new_type in (GGMLType.Q3_K, GGMLType.Q4_K):
                new_type = GGMLType.Q5_K
            self.i_attention_wv += 1
            return new_type
        if cat == "ffn_down":
            i, n = self.i_ffn_down, self.n_layer
            if ft == F.MOSTLY_Q2_K:
                new_type = GGMLType.Q3_K
            elif ft == F.MOSTLY_Q2_K_S:
                if i < n // 8:
                    new_type = GGMLType.Q4_K
            elif ft == F.MOSTLY_Q3_K_M:
                new_type = GGMLType.Q5_K if i < n // 16 else GGMLType.Q4_K
            elif ft == F.MOSTLY_Q3_K_L:
                new_type = GGMLType.Q5_K
            elif ft == F.MOSTLY_Q4_K_M:
                if use_more_bits(i, n):
                    new_type = GGMLType.Q6_K
            elif i < n // 8 and ft == F.MOSTLY_IQ4_NL:
                new_type = GGMLType.Q5_K
            elif ft == F.MOSTLY_Q5_K_M and use_more_bits(i, n):
                new_type = GGMLType.Q6_K
            elif ft == F.MOSTLY_Q4_K_S and i < n // 8:
                new_type = GGMLType.Q5_K
            self.i_ffn_down += 1
            return new_type
        if cat == "attn_output":
            if ft == F.MOSTLY_Q2_K:
                return GGMLType.Q3_K
            if ft == F.MOSTLY_Q3_K_M:
                return GGMLType.Q4_K
            if ft == F.MOSTLY_Q3_K_L:
                return GGMLType.Q5_K
        return new_type


def _fallback(name: str, n_cols: int, qtype: GGMLType) -> GGMLType:
    """tensor_type_fallback: rows that the block size does not divide get a smaller block, else F16."""
    if n_cols % GGML_BLOCK[qtype][0] == 0:
        return qtype
    if qtype not in _FALLBACK:
        raise QuantError(f"{name}: row length {n_cols} is not a multiple of {qtype.lower}'s block size "
                         f"{GGML_BLOCK[qtype][0]} and llama.cpp defines no fallback type for {qtype.lower}")
    new_type = _FALLBACK[qtype]
    return new_type if n_cols % GGML_BLOCK[new_type][0] == 0 else GGMLType.F16


def plan_tensor_types(tensors, ftype, *, n_layer: int, n_head: int, n_head_kv: int,
                      pure: bool = False) -> dict[str, GGMLType]:
    """The ggml type llama-quantize gives each tensor of a llama model for file type `ftype`.

    tensors: (name, numpy-order shape) pairs. Tensors that `stays_f32` names (1-D ones, norms) -> F32.
    pure=True is llama-quantize --pure: every quantizable tensor gets the default type (shape fallbacks
    still apply). Returns {name: GGMLType} in the order given.
    """
    ftype = parse_file_type(ftype) if not isinstance(ftype, LlamaFileType) else ftype
    if ftype not in DEFAULT_TYPE:
        raise QuantError(f"file type {ftype.name} is not supported by llmrun")
    default_type = DEFAULT_TYPE[ftype]
    shapes = {name: tuple(int(s) for s in shape) for name, shape in tensors}
    state = _MixState(ftype, list(shapes), n_layer, n_head, n_head_kv)

    planned: dict[str, GGMLType] = {}
    for name in sorted(shapes, key=_loader_order):
        shape = shapes[name]
        if stays_f32(name, shape):
            planned[name] = GGMLType.F32
        elif default_type in _FLOAT_TYPES:
            planned[name] = default_type
        else:
            new_type = default_type if pure else state.mix_type(name, shape, default_type)
            planned[name] = _fallback(name, shape[-1], new_type)
    return {name: planned[name] for name in shapes}


__all__ = ["FILE_TYPE_NAMES", "DEFAULT_TYPE", "parse_file_type", "plan_tensor_types", "stays_f32", "use_more_bits"]
