"""Test-only: tiny random HF LLaMA models written to GGUF with gguf-py's writer (an implementation
independent of llmrun.gguf), and the float32 transformers reference run on the file's own
(dequantized, un-permuted) weights.

Quantized tensors are produced by llmrun.quants.quantize (checked bit-exact against ggml elsewhere);
the reference dequantizes them back with gguf-py, so the engine is compared with transformers on
exactly the weights stored in the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

def gguf_name(hf_name: str, n_layer: int) -> str:
    """GGUF name of a HF LLaMA tensor, from gguf-py's own name map (an independent reference for our converter)."""
    import gguf
    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layer).get_name(hf_name, try_suffixes=(".weight",))
    if name is None:
        raise KeyError(hf_name)
    return name


@dataclass
class TinySpec:
    hidden: int = 64
    ff: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 300
    head_dim: int | None = None            # explicit HF head_dim (writes key_length/value_length)
    tied: bool = False
    rope_theta: float = 10000.0
    rope: dict = field(default_factory=dict)   # HF rope_parameters extras, e.g. {"rope_type": "linear", "factor": 2.0}
    qtype: str = "f32"                     # type of the 2-D weights (norms stay f32)
    mix: dict = field(default_factory=dict)  # per-tensor types by GGUF name suffix, e.g. {"attn_v.weight": "q6_k"}
    max_pos: int = 512
    eps: float = 1e-5
    seed: int = 0


def hf_model(spec: TinySpec):
    """A random transformers LlamaForCausalLM (float32), weights perturbed away from the init (norms too)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta, **spec.rope}
    cfg = LlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ff,
                      num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                      num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.max_pos,
                      rms_norm_eps=spec.eps, tie_word_embeddings=spec.tied, rope_parameters=rope,
                      head_dim=spec.head_dim, attn_implementation="eager")
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 / math.sqrt(p.shape[-1])))
    return model


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> GGUF/Meta interleaved order: new[h*hd + 2i + j] = old[h*hd + j*hd/2 + i]."""
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(hd: int, base: float, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """The converter's rope_freqs.weight for Llama 3 rope scaling (docs/formats.md §5)."""
    out = []
    for i in range(hd // 2):
        f = base ** (-2.0 * i / hd)
        lam = 2 * math.pi / f
        if lam < old / high:
            out.append(1.0)
        elif lam > old / low:
            out.append(factor)
        else:
            s = (old / lam - low) / (high - low)
            out.append(1.0 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


def gguf_tensors(model, spec: TinySpec) -> dict[str, np.ndarray]:
    """GGUF-named float32 tensors (numpy order) with Q/K permuted, as a converter would produce."""
    out = {}
    n_layer = model.config.num_hidden_layers
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and spec.tied:
            continue
        a = p.detach().cpu().numpy().astype(np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            a = permute_qk(a, spec.heads)
        elif name.endswith("self_attn.k_proj.weight"):
            a = permute_qk(a, spec.kv_heads)
        out[gguf_name(name, n_layer)] = a
    return out


def write_gguf(path: Path, model, spec: TinySpec, *, arch: str = "llama", drop: tuple[str, ...] = (),
               per_layer_arrays: bool = False, raw_override: dict | None = None,
               metadata: dict | None = None) -> Path:
    """Write `model` as a GGUF file with gguf-py's GGUFWriter (2-D weights in spec.qtype). per_layer_arrays
    stores head counts and ffn length as per-layer arrays (llama.cpp's key-or-array form); `metadata` adds
    keys (int -> uint32, str -> string, list -> array)."""
    import gguf
    from llmrun.quants import quantize
    hd = spec.head_dim or spec.hidden // spec.heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(spec.max_pos)
    w.add_embedding_length(spec.hidden)
    w.add_block_count(spec.layers)
    per_layer = (lambda v: [v] * spec.layers) if per_layer_arrays else (lambda v: v)
    w.add_feed_forward_length(per_layer(spec.ff))
    w.add_head_count(per_layer(spec.heads))
    w.add_head_count_kv(per_layer(spec.kv_heads))
    w.add_layer_norm_rms_eps(spec.eps)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_rope_dimension_count(hd)
    for key, value in (metadata or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    if spec.head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    tensors = gguf_tensors(model, spec)
    rope_type = spec.rope.get("rope_type")
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope["factor"])
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(spec.rope["factor"])
        w.add_rope_scaling_orig_ctx_len(spec.rope["original_max_position_embeddings"])
    elif rope_type == "llama3":
        r = spec.rope
        tensors["rope_freqs.weight"] = llama3_rope_freqs(hd, spec.rope_theta, r["factor"], r["low_freq_factor"],
                                                         r["high_freq_factor"], r["original_max_position_embeddings"])
    for name, a in tensors.items():
        qname = next((t for suffix, t in spec.mix.items() if name.endswith(suffix)), spec.qtype)
        qt = gguf.GGMLQuantizationType[qname.upper()]
        if name in drop:
            continue
        if raw_override and name in raw_override:   # (uint8 bytes, gguf type): e.g. a type we cannot run
            data, rtype = raw_override[name]
            w.add_tensor(name, data, raw_dtype=rtype)
            continue
        if a.ndim == 1 or qt == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, a)
        elif qt == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, quantize(a, qname), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def reference_model_from_gguf(path: Path):
    """A transformers LlamaForCausalLM holding the GGUF file's weights, dequantized by gguf-py and
    un-permuted, configured from the file's metadata (rope scaling included)."""
    import gguf
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    r = gguf.GGUFReader(str(path))

    def meta(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        return v

    arch = meta("general.architecture")
    n_embd = int(meta(f"{arch}.embedding_length"))
    n_head = int(meta(f"{arch}.attention.head_count"))
    n_kv = int(meta(f"{arch}.attention.head_count_kv", n_head))
    hd = int(meta(f"{arch}.attention.key_length", n_embd // n_head))
    tensors = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = a.reshape([int(s) for s in reversed(t.shape)])
    n_vocab, n_layer = tensors["token_embd.weight"].shape[0], int(meta(f"{arch}.block_count"))
    tied = "output.weight" not in tensors
    rope = {"rope_type": "default", "rope_theta": float(meta(f"{arch}.rope.freq_base", 10000.0))}
    if meta(f"{arch}.rope.scaling.type") == "linear":
        rope.update(rope_type="linear", factor=float(meta(f"{arch}.rope.scaling.factor")))
    cfg = LlamaConfig(vocab_size=n_vocab, hidden_size=n_embd, intermediate_size=int(meta(f"{arch}.feed_forward_length")),
                      num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv,
                      max_position_embeddings=int(meta(f"{arch}.context_length", 2048)),
                      rms_norm_eps=float(meta(f"{arch}.attention.layer_norm_rms_epsilon")),
                      tie_word_embeddings=tied, rope_parameters=rope, head_dim=hd, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).float().eval()
    if "rope_freqs.weight" in tensors:
        # Llama 3 scaling: the file stores the per-dimension divisors; apply them to HF's inv_freq directly
        rot = model.model.rotary_emb
        ff = torch.from_numpy(tensors["rope_freqs.weight"])
        rot.inv_freq = rot.inv_freq / ff
        rot.original_inv_freq = rot.inv_freq
    sd = {}
    for hf in model.state_dict():
        g = "token_embd.weight" if hf == "lm_head.weight" and tied else gguf_name(hf, n_layer)
        a = tensors[g]
        if hf.endswith("self_attn.q_proj.weight"):
            a = unpermute_qk(a, n_head)
        elif hf.endswith("self_attn.k_proj.weight"):
            a = unpermute_qk(a, n_kv)
        sd[hf] = a
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, strict=False)
    return model


def reference_logits(model, ids) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long))
    return out.logits[0].float().numpy()


def mean_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over tokens of KL(softmax(ref) || softmax(ours)), computed in float64."""
    a = ref_logits.astype(np.float64)
    b = logits.astype(np.float64)
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    return float((np.exp(la) * (la - lb)).sum(-1).mean())
