"""config.json of a HF checkpoint -> hyper-parameters and the GGUF `{arch}.*` keys (docs/formats.md §5).

One `HFArch` per supported HF class says what converting it means (the GGUF side of each architecture is
llmrun/engine/archs.py). Accepts the shapes found in the wild: `rope_theta` + `rope_scaling` (linear,
dynamic, yarn, llama3, longrope; `type` or `rope_type`), the newer `rope_parameters` block (per layer type
for Gemma 3), an explicit `head_dim`, `num_key_value_heads` absent (= heads), `tie_word_embeddings`,
`layer_types` or the older window rules, a multimodal config's `text_config`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from llmrun.engine.archs import ARCHS
from llmrun.errors import ConvertError
from llmrun.gguf import GGUFValueType as VT
from llmrun.gguf.metadata import TypedMetadata

from .jsonfile import read_json_object


@dataclass(frozen=True)
class HFArch:
    gguf: str                          # general.architecture written
    model_types: tuple[str, ...]       # config.json model_type naming this class when `architectures` is absent
    norm_shift: float = 0.0            # added to every *norm.weight (Gemma's RMSNorm multiplies by 1 + w)
    activation: str = "silu"           # the hidden_act / hidden_activation the GGUF graph implements
    qkv_bias: bool = False             # q/k/v_proj always have biases (Qwen2); elsewhere attention_bias is refused
    window: str = "none"               # sliding_window: "none" (refused), "all" layers, or per layer ("layers")
    softcaps: bool = False             # attention / final logit soft-capping
    drop_lm_head: bool = False         # always tied: a stray lm_head.weight is skipped (llama.cpp's Gemma 2)
    text_config: bool = False          # hyper-parameters in config["text_config"] (a multimodal checkpoint)
    rope_types: tuple[str, ...] = ("default", "linear", "dynamic", "yarn", "llama3")

    @property
    def permute_qk(self) -> bool:
        """NORM RoPE (the engine's table says which): Q/K rows are permuted (docs/formats.md §4)."""
        return ARCHS[self.gguf].rope == "norm"


_GEMMA = dict(norm_shift=1.0, activation="gelu_pytorch_tanh", window="layers", softcaps=True)
HF_ARCHS = {
    "LlamaForCausalLM": HFArch("llama", ("llama",)),
    "MistralForCausalLM": HFArch("llama", ("mistral",), window="all"),
    "Qwen2ForCausalLM": HFArch("qwen2", ("qwen2",), qkv_bias=True, window="layers"),
    "Qwen3ForCausalLM": HFArch("qwen3", ("qwen3",), window="layers"),
    "Phi3ForCausalLM": HFArch("phi3", ("phi3",), window="all", rope_types=("default", "longrope", "su")),
    "Gemma2ForCausalLM": HFArch("gemma2", ("gemma2",), drop_lm_head=True, **_GEMMA),
    "Gemma3ForCausalLM": HFArch("gemma3", ("gemma3_text",), **_GEMMA),
    "Gemma3ForConditionalGeneration": HFArch("gemma3", ("gemma3",), text_config=True, **_GEMMA),
}
SUPPORTED_ARCHITECTURES = tuple(HF_ARCHS)


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
    raw: dict = field(default_factory=dict)    # config.json (the text part) as read
    n_rot: int = 0                             # rotated dimensions per head (Phi-3's partial rotary factor)
    sliding_window: int = 0                    # 0: no sliding-window layers
    swa_layers: list[bool] = field(default_factory=list)
    rope_theta_swa: float = 0.0                # RoPE base of sliding layers (Gemma 3's local base), 0: the global one
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    query_pre_attn_scalar: float = 0.0         # Gemma: q is scaled by its -1/2 power (0: head_dim)

    @property
    def arch(self) -> HFArch:
        return HF_ARCHS[self.hf_arch]

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type", "default")).lower()


_MAX_DIM = 1 << 31
_MAX_F32 = 3.0e38          # values written as float32 must stay finite there


def config_values(cfg: dict, path) -> TypedMetadata:
    """Checked getters over a JSON object: each wrong type or range is a ConvertError naming file and key."""
    return TypedMetadata(cfg, str(path), ConvertError, label="")


def _hf_arch(c: TypedMetadata, path: Path) -> str:
    archs = c.get_array("architectures", "str", None) or []
    hf_arch = archs[0] if archs else None
    if hf_arch is None:
        model_type = c.get_str("model_type", None)
        hf_arch = next((name for name, a in HF_ARCHS.items() if model_type in a.model_types), None)
    if hf_arch not in HF_ARCHS:
        raise ConvertError(f"{path}: architecture {hf_arch!r:.80} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return hf_arch


def _rope_block(c: TypedMetadata, path: Path, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters of one layer type, values checked: `rope_parameters` (possibly per layer type),
    else `rope_scaling` ({} = none)."""
    key = "rope_parameters" if "rope_parameters" in c else "rope_scaling"
    rope = c.get_dict(key, {})
    if isinstance(rope.get(layer_type), dict):
        rope = dict(rope[layer_type])
    elif isinstance(rope.get("full_attention"), dict):
        rope = {}   # a per-layer-type block without this type
    r = config_values(rope, f"{path}: {key}")
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = r.get_str("type")
    if rope.get("rope_type") is not None:
        rope["rope_type"] = r.get_str("rope_type").lower()
    for name in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "attn_factor", "beta_fast",
                 "beta_slow", "rope_theta", "partial_rotary_factor"):
        if rope.get(name) is not None:
            rope[name] = r.get_float(name, lo=0.0, lo_open=True, hi=_MAX_F32)
    if rope.get("extrapolation_factor") is not None:
        rope["extrapolation_factor"] = r.get_float("extrapolation_factor", hi=_MAX_F32)
    if rope.get("original_max_position_embeddings") is not None:
        rope["original_max_position_embeddings"] = r.get_int("original_max_position_embeddings", lo=1,
                                                             hi=_MAX_DIM)
    for name in ("short_factor", "long_factor"):   # LongRoPE (Phi-3)
        if rope.get(name) is not None:
            rope[name] = [float(v) for v in r.get_array(name, "float")]
    if rope.get("rope_type") == "llama3" and rope.get("high_freq_factor", 4.0) <= rope.get("low_freq_factor", 1.0):
        r.fail("high_freq_factor", "must be larger than low_freq_factor (llama3 scaling divides by the difference)")
    return rope


def _swa_layers(c: TypedMetadata, hf_arch: str, n_layer: int, n_ctx: int, path: Path) -> tuple[int, list[bool]]:
    """(window, per-layer flags) as transformers applies them: `layer_types` when given, else the class's rule."""
    arch = HF_ARCHS[hf_arch]
    sw = c.get_int("sliding_window", None, lo=0, hi=_MAX_DIM)
    if sw is None or not c.get_bool("use_sliding_window", True) or (sw == 0 and arch.window == "all"):
        return 0, [False] * n_layer   # (llama.cpp writes 0 for "none": Phi-4)
    if sw == 0:
        c.fail("sliding_window", "must be a positive integer, found 0")
    if arch.window == "none":
        if sw >= n_ctx:
            return 0, [False] * n_layer   # a window as long as the context changes nothing
        raise ConvertError(f"{path}: sliding-window attention (sliding_window={sw}) is not supported for {hf_arch}")
    types = c.get_array("layer_types", "str", None) if arch.window == "layers" else None
    if types is not None:
        if len(types) != n_layer or any(t not in ("sliding_attention", "full_attention") for t in types):
            raise ConvertError(f"{path}: layer_types must list 'sliding_attention' or 'full_attention' for each "
                               f"of the {n_layer} layers")
        flags = [t == "sliding_attention" for t in types]
    elif arch.window == "layers" and "max_window_layers" in c:      # Qwen2/3: the layers from max_window_layers
        first = c.get_int("max_window_layers", lo=0, hi=_MAX_DIM)
        flags = [i >= first for i in range(n_layer)]
    elif arch.window == "layers":                                    # Gemma: every p-th layer is global
        p = c.get_int("sliding_window_pattern", ARCHS[arch.gguf].swa_period, lo=1, hi=_MAX_DIM)
        flags = [(i + 1) % p != 0 for i in range(n_layer)]
    else:
        flags = [True] * n_layer
    return (sw, flags) if any(flags) else (0, [False] * n_layer)


def load_config(hf_dir: Path) -> HFConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint folder)")
    top = read_json_object(path)
    t = config_values(top, path)
    hf_arch = _hf_arch(t, path)
    arch = HF_ARCHS[hf_arch]
    cfg = t.get_dict("text_config") if arch.text_config else top
    c = config_values(cfg, f"{path}: text_config" if arch.text_config else path)
    act = c.get_str("hidden_activation", None) or c.get_str("hidden_act", arch.activation)
    if act != arch.activation:
        raise ConvertError(f"{path}: hidden activation {act!r:.80} is not supported for {hf_arch} "
                           f"(it uses {arch.activation})")
    if c.get_bool("attention_bias", False) and not arch.qkv_bias:
        raise ConvertError(f"{path}: attention_bias=true is not supported for {hf_arch}")
    if c.get_bool("mlp_bias", False):
        raise ConvertError(f"{path}: mlp_bias=true is not supported")

    n_embd = c.get_int("hidden_size", lo=1, hi=_MAX_DIM)
    n_layer = c.get_int("num_hidden_layers", lo=1, hi=_MAX_DIM)
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
    n_ctx = c.get_int("max_position_embeddings", 2048, lo=1, hi=_MAX_DIM)
    if "original_max_position_embeddings" in c:
        c.get_int("original_max_position_embeddings", lo=1, hi=_MAX_DIM)

    # rope: the newer `rope_parameters` block, else `rope_scaling` + top-level `rope_theta`
    rope = _rope_block(c, path)
    rope_theta = rope["rope_theta"] if "rope_theta" in rope else c.get_float(
        "rope_theta", 1_000_000.0 if arch.gguf == "gemma3" else 10000.0, lo=0.0, lo_open=True, hi=_MAX_F32)
    rtype = rope.get("rope_type", "default")
    if rtype not in arch.rope_types:
        raise ConvertError(f"{path}: rope scaling type {rtype!r:.80} is not supported for {hf_arch} "
                           f"(supported: {', '.join(t for t in arch.rope_types if t != 'default')})")
    if rtype == "yarn" and "original_max_position_embeddings" not in rope:
        raise ConvertError(f"{path}: yarn rope scaling needs original_max_position_embeddings")
    partial = rope.get("partial_rotary_factor") or c.get_float("partial_rotary_factor", 1.0, lo=0.0, lo_open=True,
                                                                hi=1.0)
    n_rot = int(partial * n_embd) // n_head if partial != 1.0 else head_dim   # llama.cpp's formula
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise ConvertError(f"{path}: partial_rotary_factor {partial} gives {n_rot} rotated dimensions "
                           f"(must be even and at most head_dim {head_dim})")

    window, swa = _swa_layers(c, hf_arch, n_layer, n_ctx, path)
    h = HFConfig(
        path=path, hf_arch=hf_arch,
        n_vocab=c.get_int("vocab_size", 32000, lo=1, hi=_MAX_DIM),
        n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ff=c.get_int("intermediate_size", lo=1, hi=_MAX_DIM),
        n_ctx_train=n_ctx,
        rms_eps=c.get_float("rms_norm_eps", 1e-6, lo=0.0, lo_open=True, hi=1.0),
        rope_theta=rope_theta,
        tie_embeddings=c.get_bool("tie_word_embeddings", t.get_bool("tie_word_embeddings", arch.drop_lm_head)),
        rope=rope, raw=cfg, n_rot=n_rot, sliding_window=window, swa_layers=swa)
    if any(swa):
        local = _rope_block(c, path, "sliding_attention")
        h.rope_theta_swa = local.get("rope_theta") or c.get_float("rope_local_base_freq", 0.0, lo=0.0, hi=_MAX_F32)
    if arch.softcaps:
        h.attn_softcap = c.get_float("attn_logit_softcapping", 0.0, lo=0.0, hi=_MAX_F32)
        h.final_softcap = c.get_float("final_logit_softcapping", 0.0, lo=0.0, hi=_MAX_F32)
        h.query_pre_attn_scalar = c.get_float("query_pre_attn_scalar", 0.0, lo=0.0, hi=_MAX_F32)
        if arch.gguf == "gemma3" and h.attn_softcap:
            raise ConvertError(f"{path}: attn_logit_softcapping is not part of Gemma 3 (llama.cpp refuses it)")
    return h


def hparam_metadata(c: HFConfig) -> list[tuple[str, object, VT, VT | None]]:
    """The `{arch}.*` keys with the exact value types llama.cpp's loader demands."""
    a = c.arch.gguf
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
    elif c.rope_type in ("longrope", "su"):
        kv += [(f"{a}.rope.scaling.original_context_length", longrope_original_context(c), VT.UINT32, None),
               (f"{a}.rope.scaling.attn_factor", longrope_attn_factor(c), VT.FLOAT32, None)]
    elif a == "phi3":   # llama.cpp's Phi-3 converter always writes the original context
        kv.append((f"{a}.rope.scaling.original_context_length", longrope_original_context(c), VT.UINT32, None))
    # dynamic NTK only acts beyond the training context and llama3 is carried by rope_freqs.weight: no keys
    kv += [
        (f"{a}.rope.freq_base", c.rope_theta, VT.FLOAT32, None),
        (f"{a}.attention.layer_norm_rms_epsilon", c.rms_eps, VT.FLOAT32, None),
        (f"{a}.attention.key_length", c.head_dim, VT.UINT32, None),
        (f"{a}.attention.value_length", c.head_dim, VT.UINT32, None),
        (f"{a}.vocab_size", c.n_vocab, VT.UINT32, None),
        (f"{a}.rope.dimension_count", c.n_rot, VT.UINT32, None),
    ]
    kv += _relative_metadata(c)
    return kv


def _relative_metadata(c: HFConfig) -> list[tuple[str, object, VT, VT | None]]:
    """Window, soft-caps, attention scale and local RoPE base: written as llama.cpp's converter does, plus
    a key where the checkpoint departs from what llama.cpp's loader assumes for the architecture (llama.cpp
    ignores those keys; llmrun reads them)."""
    a, engine = c.arch.gguf, ARCHS[c.arch.gguf]
    kv = []
    if c.sliding_window or a == "phi3":
        kv.append((f"{a}.attention.sliding_window", c.sliding_window, VT.UINT32, None))
    p = engine.swa_period
    if c.sliding_window and c.swa_layers != [p == 0 or i % p < p - 1 for i in range(c.n_layer)]:
        kv.append((f"{a}.attention.sliding_window_pattern", list(c.swa_layers), VT.ARRAY, VT.BOOL))
    if c.sliding_window and c.rope_theta_swa and c.rope_theta_swa != (engine.swa_rope_base or c.rope_theta):
        kv.append((f"{a}.rope.freq_base_swa", c.rope_theta_swa, VT.FLOAT32, None))
    if c.attn_softcap:
        kv.append((f"{a}.attn_logit_softcapping", c.attn_softcap, VT.FLOAT32, None))
    if c.final_softcap:
        kv.append((f"{a}.final_logit_softcapping", c.final_softcap, VT.FLOAT32, None))
    if c.query_pre_attn_scalar:
        scale = c.query_pre_attn_scalar ** -0.5
        assumed = (c.n_embd // c.n_head if c.n_layer in engine.scale_by_embd_per_head_at else c.head_dim) ** -0.5
        if abs(scale - assumed) > 1e-6 * assumed:
            kv.append((f"{a}.attention.scale", scale, VT.FLOAT32, None))
    return kv


def longrope_original_context(c: HFConfig) -> int:
    # both places were checked as positive integers by load_config
    return int(c.rope.get("original_max_position_embeddings",
                          c.raw.get("original_max_position_embeddings", c.n_ctx_train)))


def longrope_attn_factor(c: HFConfig) -> float:
    """cos/sin scale of LongRoPE: the config's attention_factor, else llama.cpp's (and HF's) default."""
    given = c.rope.get("attention_factor")
    if given is not None:
        return given
    orig = longrope_original_context(c)
    scale = c.n_ctx_train / orig
    return math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0


def longrope_factors(c: HFConfig) -> tuple[list[float], list[float]] | None:
    """(short, long) per-dimension factors of a LongRoPE config, checked against n_rot/2; None without them."""
    if c.rope_type not in ("longrope", "su"):
        return None
    short, long = c.rope.get("short_factor"), c.rope.get("long_factor")
    half = c.n_rot // 2
    for name, f in (("short_factor", short), ("long_factor", long)):
        if not isinstance(f, list) or len(f) != half or \
                any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 for v in f):
            raise ConvertError(f"{c.path}: longrope {name} must list {half} positive numbers")
    return [float(v) for v in short], [float(v) for v in long]


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
