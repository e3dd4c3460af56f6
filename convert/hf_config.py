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


def _int(cfg: dict, key: str, path: Path, default=None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConvertError(f"{path}: {key} must be a positive integer, got {v!r}")
    return v


def _num(cfg: dict, key: str, path: Path, default=None) -> float | None:
    v = cfg.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConvertError(f"{path}: {key} must be a number, got {v!r}")
    return float(v)


def _hf_arch(cfg: dict, path: Path) -> str:
    archs = cfg.get("architectures") or []
    hf_arch = archs[0] if isinstance(archs, list) and archs else None
    if hf_arch is None:
        hf_arch = next((name for name, a in HF_ARCHS.items() if cfg.get("model_type") in a.model_types), None)
    if hf_arch not in HF_ARCHS:
        raise ConvertError(f"{path}: architecture {hf_arch!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return hf_arch


def _rope_block(cfg: dict, layer_type: str = "full_attention") -> dict:
    """The RoPE parameters of one layer type: `rope_parameters` (possibly per layer type), else `rope_scaling`."""
    rope = cfg.get("rope_parameters")
    if rope is None:
        rope = cfg.get("rope_scaling")
    rope = dict(rope) if isinstance(rope, dict) else {}
    if isinstance(rope.get(layer_type), dict):
        rope = dict(rope[layer_type])
    elif isinstance(rope.get("full_attention"), dict):
        rope = {}   # a per-layer-type block without this type
    if "rope_type" not in rope and "type" in rope:
        rope["rope_type"] = rope["type"]
    return rope


def _swa_layers(cfg: dict, hf_arch: str, n_layer: int, n_ctx, path: Path) -> tuple[int, list[bool]]:
    """(window, per-layer flags) as transformers applies them: `layer_types` when given, else the class's rule."""
    arch = HF_ARCHS[hf_arch]
    sw = cfg.get("sliding_window")
    if sw is None or cfg.get("use_sliding_window", True) is False or (sw == 0 and arch.window == "all"):
        return 0, [False] * n_layer   # (llama.cpp writes 0 for "none": Phi-4)
    if isinstance(sw, bool) or not isinstance(sw, int) or sw <= 0:
        raise ConvertError(f"{path}: sliding_window must be a positive integer, got {sw!r}")
    if arch.window == "none":
        if isinstance(n_ctx, int) and sw >= n_ctx:
            return 0, [False] * n_layer   # a window as long as the context changes nothing
        raise ConvertError(f"{path}: sliding-window attention (sliding_window={sw}) is not supported for {hf_arch}")
    types = cfg.get("layer_types")
    if arch.window == "layers" and isinstance(types, list):
        if len(types) != n_layer or any(t not in ("sliding_attention", "full_attention") for t in types):
            raise ConvertError(f"{path}: layer_types must list 'sliding_attention' or 'full_attention' for each "
                               f"of the {n_layer} layers")
        flags = [t == "sliding_attention" for t in types]
    elif arch.window == "layers" and "max_window_layers" in cfg:      # Qwen2/3: the layers from max_window_layers
        flags = [i >= int(cfg["max_window_layers"]) for i in range(n_layer)]
    elif arch.window == "layers":                                      # Gemma: every p-th layer is global
        p = cfg.get("sliding_window_pattern", ARCHS[arch.gguf].swa_period)
        if isinstance(p, bool) or not isinstance(p, int) or p <= 0:
            raise ConvertError(f"{path}: sliding_window_pattern must be a positive integer, got {p!r}")
        flags = [(i + 1) % p != 0 for i in range(n_layer)]
    else:
        flags = [True] * n_layer
    return (sw, flags) if any(flags) else (0, [False] * n_layer)


def load_config(hf_dir: Path) -> HFConfig:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConvertError(f"{hf_dir}: no config.json (not a Hugging Face checkpoint folder)")
    top = read_json_object(path)
    hf_arch = _hf_arch(top, path)
    arch = HF_ARCHS[hf_arch]
    cfg = top
    if arch.text_config:
        cfg = top.get("text_config")
        if not isinstance(cfg, dict):
            raise ConvertError(f"{path}: {hf_arch} needs a text_config object")
    act = cfg.get("hidden_activation", cfg.get("hidden_act", arch.activation))
    if act != arch.activation:
        raise ConvertError(f"{path}: hidden activation {act!r} is not supported for {hf_arch} "
                           f"(it uses {arch.activation})")
    if cfg.get("attention_bias") and not arch.qkv_bias:
        raise ConvertError(f"{path}: attention_bias=true is not supported for {hf_arch}")
    if cfg.get("mlp_bias"):
        raise ConvertError(f"{path}: mlp_bias=true is not supported")

    n_embd = _int(cfg, "hidden_size", path)
    n_layer = _int(cfg, "num_hidden_layers", path)
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
    n_ctx = cfg.get("max_position_embeddings", 2048)

    rope = _rope_block(cfg)
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 1_000_000.0 if arch.gguf == "gemma3" else 10000.0))
    try:
        rope_theta = float(rope_theta)
    except (TypeError, ValueError):
        raise ConvertError(f"{path}: rope_theta {rope_theta!r} is not a number") from None
    rtype = str(rope.get("rope_type", "default")).lower()
    if rtype not in arch.rope_types:
        raise ConvertError(f"{path}: rope scaling type {rtype!r} is not supported for {hf_arch} "
                           f"(supported: {', '.join(t for t in arch.rope_types if t != 'default')})")
    if rtype == "yarn" and "original_max_position_embeddings" not in rope:
        raise ConvertError(f"{path}: yarn rope scaling needs original_max_position_embeddings")
    partial = _num(rope, "partial_rotary_factor", path, _num(cfg, "partial_rotary_factor", path, 1.0))
    n_rot = int(partial * n_embd) // n_head if partial != 1.0 else head_dim   # llama.cpp's formula
    if not 0 < n_rot <= head_dim or n_rot % 2:
        raise ConvertError(f"{path}: partial_rotary_factor {partial} gives {n_rot} rotated dimensions "
                           f"(must be even and at most head_dim {head_dim})")

    window, swa = _swa_layers(cfg, hf_arch, n_layer, n_ctx, path)
    c = HFConfig(
        path=path, hf_arch=hf_arch,
        n_vocab=_int(cfg, "vocab_size", path, 32000),
        n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        n_ff=_int(cfg, "intermediate_size", path),
        n_ctx_train=_int({"max_position_embeddings": n_ctx}, "max_position_embeddings", path),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", top.get("tie_word_embeddings", arch.drop_lm_head))),
        rope=rope, raw=cfg, n_rot=n_rot, sliding_window=window, swa_layers=swa)
    if any(swa):
        local = _rope_block(cfg, "sliding_attention")
        c.rope_theta_swa = float(_num(local, "rope_theta", path, _num(cfg, "rope_local_base_freq", path, 0.0)) or 0)
    if arch.softcaps:
        c.attn_softcap = _num(cfg, "attn_logit_softcapping", path) or 0.0
        c.final_softcap = _num(cfg, "final_logit_softcapping", path) or 0.0
        c.query_pre_attn_scalar = _num(cfg, "query_pre_attn_scalar", path) or 0.0
        if arch.gguf == "gemma3" and c.attn_softcap:
            raise ConvertError(f"{path}: attn_logit_softcapping is not part of Gemma 3 (llama.cpp refuses it)")
    return c


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
    v = c.rope.get("original_max_position_embeddings", c.raw.get("original_max_position_embeddings", c.n_ctx_train))
    return _int({"original_max_position_embeddings": v}, "original_max_position_embeddings", c.path)


def longrope_attn_factor(c: HFConfig) -> float:
    """cos/sin scale of LongRoPE: the config's attention_factor, else llama.cpp's (and HF's) default."""
    given = _num(c.rope, "attention_factor", c.path)
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
