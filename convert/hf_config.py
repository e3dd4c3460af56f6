"""config.json of a HF LLaMA/Mistral checkpoint -> hyper-parameters and the GGUF `llama.*` keys (docs/formats.md §5).

Accepts the shapes found in the wild: `rope_theta` + `rope_scaling` (linear, dynamic, yarn, llama3; `type` or
`rope_type`), the newer `rope_parameters` block, an explicit `head_dim`, `num_key_value_heads` absent (= heads),
`tie_word_embeddings`. Defaults are transformers' LlamaConfig defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmrun.errors import ConvertError
from llmrun.gguf import GGUFValueType as VT

from .jsonfile import read_json_object

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
ARCH = "llama"


@dataclass
class HFConfig:
    path: Path
    hf_arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    tie_embeddings: bool
    rope: dict = field(default_factory=dict)   # normalized scaling block: rope_type, factor, ... ({} = none)
    raw: dict = field(default_factory=dict)    # config.json as read

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type", "default")).lower()


def _int(cfg: dict, key: str, path: Path, default=None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConvertError(f"{path}: {key} must be a positive integer, got {v!r}")
    return v


def load_config(hf_dir: Path) -> HFConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint folder)")
    cfg = read_json_object(path)

    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if isinstance(archs, list) and archs else None
    if hf_arch is None and cfg.get("model_type") in ("llama", "mistral"):
        hf_arch = "MistralForCausalLM" if cfg["model_type"] == "mistral" else "LlamaForCausalLM"
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"{path}: architecture {hf_arch!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{path}: hidden_act {cfg.get('hidden_act')!r} is not supported (LLaMA uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConvertError(f"{path}: {flag}=true is not supported")
    n_ctx = cfg.get("max_position_embeddings", 2048)
    sw = cfg.get("sliding_window")
    if sw is not None and cfg.get("use_sliding_window", True) and isinstance(n_ctx, int) and sw < n_ctx:
        raise ConvertError(f"{path}: sliding-window attention (sliding_window={sw}) is not supported")

    n_embd = _int(cfg, "hidden_size", path)
    n_head = _int(cfg, "num_attention_heads", path)
    n_head_kv = cfg.get("num_key_value_heads")
    if n_head_kv is None:
        n_head_kv = n_head
    n_head_kv = _int({"num_key_value_heads": n_head_kv}, "num_key_value_heads", path)
    if n_head % n_head_kv:
        raise ConvertError(f"{path}: num_attention_heads {n_head} is not a multiple of "
                           f"num_key_value_heads {n_head_kv}")
    head_dim = cfg.get("head_dim")
    if head_dim is None:
        if n_embd % n_head:
            raise ConvertError(f"{path}: hidden_size {n_embd} is not divisible by num_attention_heads {n_head}")
        head_dim = n_embd // n_head
    head_dim = _int({"head_dim": head_dim}, "head_dim", path)
    if head_dim % 2:
        raise ConvertError(f"{path}: head_dim {head_dim} must be even for RoPE")

    # rope: the newer `rope_parameters` block, else `rope_scaling` + top-level `rope_theta`
    rope = cfg.get("rope_parameters")
    if rope is None:
        rope = cfg.get("rope_scaling")
    rope = dict(rope) if isinstance(rope, dict) else {}
    if "full_attention" in rope and isinstance(rope["full_attention"], dict):
        rope = dict(rope["full_attention"])
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    try:
        rope_theta = float(rope_theta)
    except (TypeError, ValueError):
        raise ConvertError(f"{path}: rope_theta {rope_theta!r} is not a number") from None
    rtype = str(rope.get("rope_type", "default")).lower()
    if rtype not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise ConvertError(f"{path}: rope scaling type {rtype!r} is not supported "
                           "(supported: linear, dynamic, yarn, llama3)")
    if rtype == "yarn" and "original_max_position_embeddings" not in rope:
        raise ConvertError(f"{path}: yarn rope scaling needs original_max_position_embeddings")

    return HFConfig(
        path=path, hf_arch=hf_arch,
        n_vocab=_int(cfg, "vocab_size", path, 32000),
        n_embd=n_embd, n_layer=_int(cfg, "num_hidden_layers", path),
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ff=_int(cfg, "intermediate_size", path),
        n_ctx_train=_int({"max_position_embeddings": n_ctx}, "max_position_embeddings", path),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        rope=rope,
        raw=cfg,
    )


def hparam_metadata(c: HFConfig) -> list[tuple[str, object, VT, VT | None]]:
    """The `llama.*` keys with the exact value types llama.cpp's loader demands."""
    a = ARCH
    kv = [
        (f"{a}.block_count", c.n_layer, VT.UINT32, None),
        (f"{a}.context_length", c.n_ctx_train, VT.UINT32, None),
        (f"{a}.embedding_length", c.n_embd, VT.UINT32, None),
        (f"{a}.feed_forward_length", c.n_ff, VT.UINT32, None),
        (f"{a}.attention.head_count", c.n_head, VT.UINT32, None),
        (f"{a}.attention.head_count_kv", c.n_head_kv, VT.UINT32, None),
    ]
    r = c.rope
    factor = r.get("factor")
    if c.rope_type == "linear" and factor is not None:
        kv += [(f"{a}.rope.scaling.type", "linear", VT.STRING, None),
               (f"{a}.rope.scaling.factor", float(factor), VT.FLOAT32, None)]
    elif c.rope_type == "yarn" and factor is not None:
        kv += [(f"{a}.rope.scaling.type", "yarn", VT.STRING, None),
               (f"{a}.rope.scaling.factor", float(factor), VT.FLOAT32, None),
               (f"{a}.rope.scaling.original_context_length", int(r["original_max_position_embeddings"]),
                VT.UINT32, None)]
        attn = r.get("attention_factor", r.get("attn_factor"))
        for key, v in (("yarn_ext_factor", r.get("extrapolation_factor")), ("yarn_attn_factor", attn),
                       ("yarn_beta_fast", r.get("beta_fast")), ("yarn_beta_slow", r.get("beta_slow"))):
            if v is not None:
                kv.append((f"{a}.rope.scaling.{key}", float(v), VT.FLOAT32, None))
    # dynamic NTK only acts beyond the training context and llama3 is carried by rope_freqs.weight: no keys
    kv += [
        (f"{a}.rope.freq_base", c.rope_theta, VT.FLOAT32, None),
        (f"{a}.attention.layer_norm_rms_epsilon", c.rms_eps, VT.FLOAT32, None),
        (f"{a}.attention.key_length", c.head_dim, VT.UINT32, None),
        (f"{a}.attention.value_length", c.head_dim, VT.UINT32, None),
        (f"{a}.vocab_size", c.n_vocab, VT.UINT32, None),
        (f"{a}.rope.dimension_count", c.head_dim, VT.UINT32, None),
    ]
    return kv


def llama3_rope_params(c: HFConfig) -> dict | None:
    """Arguments of rope.llama3_rope_factors when the config asks for llama3 scaling, else None."""
    if c.rope_type != "llama3":
        return None
    r = c.rope
    # llama.cpp reads original_max_position_embeddings at the top level (absent in real configs -> 8192);
    # HF reads it from the rope block. Use the rope block's when present so the model matches HF.
    top = c.raw.get("original_max_position_embeddings")
    old = r.get("original_max_position_embeddings", top if top is not None else 8192)
    return dict(head_dim=c.head_dim, base=c.rope_theta, factor=float(r.get("factor", 8.0)),
                low_freq_factor=float(r.get("low_freq_factor", 1.0)),
                high_freq_factor=float(r.get("high_freq_factor", 4.0)), original_context=int(old))
