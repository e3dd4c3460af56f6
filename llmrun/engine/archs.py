"""The LLaMA relatives as data: what each GGUF architecture changes in the one graph of model.py.

Every architecture is the LLaMA block (docs/architectures.md)

    x += attn(rmsnorm(x)) ; x += ffn(rmsnorm(x))

plus a few well-defined pieces, each a field below. The graph reads these fields; it never tests an
architecture's name. Values the file may override (a window, a RoPE base) are the defaults llama.cpp's
loader assumes for that architecture when the key is absent.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str                          # general.architecture
    # RoPE pairing: "norm" rotates dimension pairs (2i, 2i+1) (Meta's layout; the converter permutes HF's Q/K
    # rows for it), "neox" pairs (i, i + n_rot/2) (HF's rotate_half, weights as trained)
    rope: str = "norm"
    rope_full_width: bool = True       # rope.dimension_count must equal the head size (llama.cpp's check)
    rope_factors: str = "freqs"        # "freqs": optional rope_freqs.weight; "longrope": rope_factors_short/long
    qkv_fused: bool = False            # one attn_qkv tensor (Q, K, V rows stacked) instead of three
    qkv_bias: str = "optional"         # attn_q/k/v .bias: "optional" (loaded when present) or "required"
    qk_norm: bool = False              # attn_q_norm / attn_k_norm: RMSNorm over each head, before RoPE
    gate_up_fused: bool = False        # ffn_up holds gate then up (2*n_ff rows); no ffn_gate
    activation: str = "silu"           # gated FFN: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    post_norms: bool = False           # post_attention_norm / post_ffw_norm on each sub-block's output
    embed_scale_sqrt: bool = False     # input embeddings times sqrt(n_embd)
    output_tensor: bool = True         # output.weight may be present (else always tied to token_embd)
    # attn_logit_softcapping / final_logit_softcapping are read, with these defaults (None: never soft-capped)
    softcaps: tuple[float, float] | None = None
    # sliding-window attention: with a window, layer il slides iff il % swa_period < swa_period - 1
    # (0: every layer slides); default_window applies when the file declares none (0: no window)
    swa_period: int = 0
    default_window: int = 0
    swa_rope_base: float = 0.0         # RoPE base of sliding layers without rope.freq_base_swa (0: the global one)
    # attention scale 1/sqrt(head size), except for these block counts, where llama.cpp uses
    # 1/sqrt(n_embd / n_head) (Gemma's 27B models, whose query_pre_attn_scalar says so)
    scale_by_embd_per_head_at: tuple[int, ...] = ()


LLAMA = Arch("llama")
QWEN2 = Arch("qwen2", rope="neox", qkv_bias="required")
QWEN3 = Arch("qwen3", rope="neox", qk_norm=True)
PHI3 = Arch("phi3", rope="neox", rope_full_width=False, rope_factors="longrope", qkv_fused=True, gate_up_fused=True)
_GEMMA = dict(rope="neox", activation="gelu_tanh", post_norms=True, embed_scale_sqrt=True)
GEMMA2 = Arch("gemma2", output_tensor=False, softcaps=(50.0, 30.0), swa_period=2, default_window=4096,
              scale_by_embd_per_head_at=(46,), **_GEMMA)
GEMMA3 = Arch("gemma3", qk_norm=True, softcaps=(0.0, 0.0), swa_period=6, swa_rope_base=10000.0,
              scale_by_embd_per_head_at=(62,), **_GEMMA)

ARCHS: dict[str, Arch] = {a.name: a for a in (LLAMA, QWEN2, QWEN3, PHI3, GEMMA2, GEMMA3)}


def supported() -> str:
    return ", ".join(repr(n) for n in ARCHS)
