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
from llmrun.gguf.metadata import TypedMetadata

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
        return self.rope.get("rope_type", "default")


_MAX_DIM = 1 << 31
_MAX_F32 = 3.0e38          # values written as float32 must stay finite there


def config_values(cfg: dict, path: Path) -> TypedMetadata:
    """Checked getters over a JSON object: each wrong type or range is a ConvertError naming file and key."""
    return TypedMetadata(cfg, str(path), ConvertError, label="")


def _rope_block(c: TypedMetadata, path: Path) -> dict:
    """The scaling block (`rope_parameters`, else `rope_scaling`; {} = none) with its values checked."""
    key = "rope_parameters" if c.metadata.get("rope_parameters") is not None else "rope_scaling"
    rope = c.get_dict(key, {})
    if isinstance(rope.get("full_attention"), dict):
        rope = dict(rope["full_attention"])
    r = config_values(rope, f"{path}: {key}")
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = r.get_str("type")
    if "rope_type" in rope:
        rope["rope_type"] = r.get_str("rope_type").lower()
    for name in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "attn_factor", "beta_fast",
                 "beta_slow", "rope_theta"):
        if rope.get(name) is not None:
            rope[name] = r.get_float(name, lo=0.0, lo_open=True, hi=_MAX_F32)
    if rope.get("extrapolation_factor") is not None:
        rope["extrapolation_factor"] = r.get_float("extrapolation_factor", hi=_MAX_F32)
    if rope.get("original_max_position_embeddings") is not None:
        rope["original_max_position_embeddings"] = r.get_int("original_max_position_embeddings", lo=1,
                                                             hi=_MAX_DIM)
    if rope.get("rope_type") == "llama3" and rope.get("high_freq_factor", 4.0) <= rope.get("low_freq_factor", 1.0):
        r.fail("high_freq_factor", "must be larger than low_freq_factor (llama3 scaling divides by the difference)")
    return rope


def load_config(hf_dir: Path) -> HFConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint folder)")
    cfg = read_json_object(path)
    c = config_values(cfg, path)

    archs = c.get_array("architectures", "str", None) or []
    hf_arch = archs[0] if archs else None
    model_type = c.get_str("model_type", None)
    if hf_arch is None and model_type in ("llama", "mistral"):
        hf_arch = "MistralForCausalLM" if model_type == "mistral" else "LlamaForCausalLM"
    if hf_arch not in SUPPORTED_ARCHITECTURES:
        raise ConvertError(f"{path}: architecture {hf_arch!r:.80} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    act = c.get_str("hidden_act", "silu")
    if act != "silu":
        raise ConvertError(f"{path}: hidden_act {act!r:.80} is not supported (LLaMA uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if c.get_bool(flag, False):
            raise ConvertError(f"{path}: {flag}=true is not supported")
    n_ctx = c.get_int("max_position_embeddings", 2048, lo=1, hi=_MAX_DIM)
    sw = c.get_int("sliding_window", None, lo=0)
    if sw is not None and c.get_bool("use_sliding_window", True) and sw < n_ctx:
        raise ConvertError(f"{path}: sliding-window attention (sliding_window={sw}) is not supported")

    n_embd = c.get_int("hidden_size", lo=1, hi=_MAX_DIM)
    n_head = c.get_int("num_attention_heads", lo=1, hi=_MAX_DIM)
    n_head_kv = c.get_int("num_key_value_heads", n_head, lo=1, hi=_MAX_DIM)
    if n_head % n_head_kv:
        raise ConvertError(f"{path}: num_attention_heads {n_head} is not a multiple of "
                           f"num_key_value_heads {n_head_kv}")
    head_dim = c.get_int("head_dim", None, lo=1, hi=_MAX_DIM)
    if head_dim is None:
        if n_embd % n_head:
            raise ConvertError(f"{path}: hidden_size {n_embd} is not divisible by num_attention_heads {n_head}")
        head_dim = n_embd // n_head
    if head_dim % 2:
        raise ConvertError(f"{path}: head_dim {head_dim} must be even for RoPE")

    # rope: the newer `rope_parameters` block, else `rope_scaling` + top-level `rope_theta`
    rope = _rope_block(c, path)
    rope_theta = rope["rope_theta"] if "rope_theta" in rope else \
        c.get_float("rope_theta", 10000.0, lo=0.0, lo_open=True, hi=_MAX_F32)
    rtype = rope.get("rope_type", "default")
    if rtype not in ("default", "linear", "dynamic", "yarn", "llama3"):
        raise ConvertError(f"{path}: rope scaling type {rtype!r:.80} is not supported "
                           "(supported: linear, dynamic, yarn, llama3)")
    if rtype == "yarn" and "original_max_position_embeddings" not in rope:
        raise ConvertError(f"{path}: yarn rope scaling needs original_max_position_embeddings")
    if c.metadata.get("original_max_position_embeddings") is not None:
        c.get_int("original_max_position_embeddings", lo=1, hi=_MAX_DIM)

    return HFConfig(
        path=path, hf_arch=hf_arch,
        n_vocab=c.get_int("vocab_size", 32000, lo=1, hi=_MAX_DIM),
        n_embd=n_embd, n_layer=c.get_int("num_hidden_layers", lo=1, hi=_MAX_DIM),
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ff=c.get_int("intermediate_size", lo=1, hi=_MAX_DIM),
        n_ctx_train=n_ctx,
        rms_eps=c.get_float("rms_norm_eps", 1e-6, lo=0.0, lo_open=True, hi=1.0),
        rope_theta=rope_theta,
        tie_embeddings=c.get_bool("tie_word_embeddings", False),
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
    top = c.raw.get("original_max_position_embeddings")     # checked by load_config
    old = r.get("original_max_position_embeddings", top if top is not None else 8192)
    return dict(head_dim=c.head_dim, base=c.rope_theta, factor=float(r.get("factor", 8.0)),
                low_freq_factor=float(r.get("low_freq_factor", 1.0)),
                high_freq_factor=float(r.get("high_freq_factor", 4.0)), original_context=int(old))
