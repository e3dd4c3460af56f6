"""HF checkpoint (+ PEFT LoRA adapters) -> one GGUF file: the orchestration.

Order of work, so that a bad input never leaves anything behind:
  1. check paths, read config.json, index the safetensors, open and validate every adapter, build the
     vocabulary metadata, plan every tensor's name, shape and type -- all before the writer is created;
  2. stream the tensors through llmrun.gguf.GGUFWriter (temp file + rename), one at a time:
     float32 from the memory map -> LoRA merges in HF layout -> Q/K permute -> f32/f16/bf16 or quantize.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from llmrun.quants.floats import BF16_EXP, first_nonfinite
from llmrun.errors import ConvertError
from llmrun.gguf import GGMLType, GGUFValueType as VT, GGUFWriter, LlamaFileType
from llmrun.gguf.writer import check_output_path
from llmrun.quants import quantize
from llmrun.quants.mixes import parse_file_type, plan_tensor_types

from . import names
from .checkpoint import Checkpoint
from .hf_config import HFConfig, hparam_metadata, llama3_rope_params, load_config, longrope_factors
from .lora import LoraAdapter
from .permute import permute_rows
from .rope import llama3_rope_factors
from .vocab import vocab_metadata

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"

# safetensors dtype -> the GGML type whose bytes are the same (GGUFWriter takes bf16 bits as uint16)
_STORED_AS = {"F32": GGMLType.F32, "F16": GGMLType.F16, "BF16": GGMLType.BF16}

Progress = Callable[[int, int, str], None]


@dataclass
class _TensorPlan:
    name: str                       # GGUF name
    shape: tuple[int, ...]          # numpy order
    source: str | None              # HF weight name read from the checkpoint (None: generated)
    permute_heads: int = 0          # >0: Q/K rows permuted for this many heads
    tied_role: str | None = None    # "embed"/"output": one side of tied embeddings (see _tied_pair)
    tied_pair: tuple[str, str] = (EMBED, LM_HEAD)   # the checkpoint's names of embed_tokens and lm_head
    shift: float = 0.0              # added after the merges (Gemma's norms, stored as 1 + w)
    generated: np.ndarray | None = None
    ggml_type: GGMLType = GGMLType.F32


def _expected_shapes(c: HFConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape for every tensor a checkpoint of this architecture and config must have."""
    E, q, kv, ff = c.n_embd, c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_ff
    per_block = {"attn_norm.weight": (E,), "attn_q.weight": (q, E), "attn_k.weight": (kv, E),
                 "attn_v.weight": (kv, E), "attn_output.weight": (E, q), "ffn_norm.weight": (E,),
                 "ffn_gate.weight": (ff, E), "ffn_up.weight": (ff, E), "ffn_down.weight": (E, ff),
                 "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,),
                 "attn_q_norm.weight": (c.head_dim,), "attn_k_norm.weight": (c.head_dim,),
                 "post_attention_norm.weight": (E,), "post_ffw_norm.weight": (E,),
                 "attn_qkv.weight": (q + 2 * kv, E)}
    if "ffn_gate.weight" not in names.block_order(c.arch.gguf):   # fused gate/up (Phi-3)
        per_block["ffn_up.weight"] = (2 * ff, E)
    out = {names.TOKEN_EMBD: (c.n_vocab, E)}
    for i in range(c.n_layer):
        for suffix in names.block_order(c.arch.gguf):
            out[f"blk.{i}.{suffix}"] = per_block[suffix]
    out["output_norm.weight"] = (E,)
    out[names.OUTPUT] = (c.n_vocab, E)
    return out


def convert_checkpoint(hf_dir, out_path, out_type: str = "f16",
                       loras: Sequence[tuple[str | Path, float]] = (), overwrite: bool = False,
                       progress: Progress | None = None) -> Path:
    """Convert a HF safetensors checkpoint of a supported class (hf_config.HF_ARCHS), with LoRA adapters merged
    in order, to GGUF.

    loras: [(adapter_dir, scale), ...]. Returns the output path. Raises ConvertError (one line) on bad input;
    the output file is then untouched (or absent)."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir}: input folder not found")
    check_output_path(out_path, overwrite)
    cfg = load_config(hf_dir)
    ftype = parse_file_type(out_type)   # a one-line error listing the valid names

    ckpt = Checkpoint(hf_dir, quantization=cfg.raw.get("quantization_config"))
    adapters: list[LoraAdapter] = []
    try:
        for d, scale in loras:
            adapters.append(LoraAdapter(d, scale, arch=cfg.arch.gguf))
        check_output_path(out_path, overwrite, inputs=[f.path for f in ckpt.files] + [a.file.path for a in adapters])

        plans = _plan_tensors(cfg, ckpt, adapters)
        _assign_types(plans, cfg, ftype)
        vocab = vocab_metadata(hf_dir, cfg.n_vocab, flavor=cfg.arch.gguf)

        writer = GGUFWriter(out_path, overwrite=overwrite)
        for key, value, vtype, elem in _metadata(cfg, hf_dir, ftype):
            writer.add(key, value, vtype, elem)
        for key, value, vtype, elem in vocab:
            writer.add(key, value, vtype, elem)
        n = len(plans)
        for i, plan in enumerate(plans):
            writer.add_tensor(plan.name, plan.shape, plan.ggml_type,
                              _producer(plan, ckpt, adapters, i, n, progress))
        writer.write()
    finally:
        for a in adapters:
            a.close()
        ckpt.close()
    return out_path


def _metadata(cfg: HFConfig, hf_dir: Path, ftype: LlamaFileType):
    name = hf_dir.resolve().name or "model"
    return [("general.architecture", cfg.arch.gguf, VT.STRING, None),
            ("general.type", "model", VT.STRING, None),
            ("general.name", name, VT.STRING, None),
            *hparam_metadata(cfg),
            ("general.file_type", int(ftype), VT.UINT32, None),
            ("general.quantization_version", 2, VT.UINT32, None)]


def _check_layer_count(cfg: HFConfig, ckpt: Checkpoint) -> None:
    """config.json's layer count against the layers the checkpoint holds, before anything of that size is
    built (num_hidden_layers: 10**7 would otherwise make 90 million expected shapes)."""
    layers = {int(m.group(1)) for n in map(names.text_name, ckpt.names()) if n and (m := names.LAYER_RE.match(n))}
    held = max(layers) + 1 if layers else 0
    if cfg.n_layer > held:
        raise ConvertError(f"{cfg.path}: num_hidden_layers is {cfg.n_layer} but the checkpoint holds "
                           f"{held} layer(s)")


def _plan_tensors(cfg: HFConfig, ckpt: Checkpoint, adapters: list[LoraAdapter]) -> list[_TensorPlan]:
    _check_layer_count(cfg, ckpt)
    expected = _expected_shapes(cfg)
    found: dict[str, str] = {}   # GGUF name -> HF name
    for hf in ckpt.names():
        try:
            g = names.gguf_name(hf, cfg.arch.gguf)
        except ConvertError as e:
            raise ConvertError(f"{ckpt.entries[hf].file}: {e}") from None
        if g is None or (g == names.OUTPUT and cfg.arch.drop_lm_head):
            continue
        if g not in expected:
            raise ConvertError(f"{ckpt.entries[hf].file}: tensor {hf} is beyond the {cfg.n_layer} layers of "
                               "config.json")
        if tuple(ckpt.shape(hf)) != expected[g]:
            raise ConvertError(f"{ckpt.entries[hf].file}: tensor {hf} has shape {list(ckpt.shape(hf))}, "
                               f"config.json implies {list(expected[g])}")
        found[g] = hf
    missing = [g for g in expected if g not in found and g != names.OUTPUT]
    if missing:
        raise ConvertError(f"{ckpt.dir}: checkpoint lacks {len(missing)} tensor(s) the config needs, "
                           f"e.g. the one for {missing[0]}")

    # Tied embeddings: HF's lm_head *is* embed_tokens, so LoRA deltas on either land on the shared weight,
    # while a modules_to_save replacement of one of them unties the pair (then output.weight is written).
    tied = names.OUTPUT not in found or cfg.tie_embeddings
    embed, lm_head = _hf_name(found, names.TOKEN_EMBD, EMBED), _hf_name(found, names.OUTPUT, LM_HEAD)
    base_shapes = {hf: tuple(ckpt.shape(hf)) for g, hf in found.items()}
    base_shapes.setdefault(lm_head, expected[names.OUTPUT])
    for a in adapters:
        a.validate(base_shapes, cfg.n_layer)

    plans: list[_TensorPlan] = []
    rope = llama3_rope_params(cfg)
    if rope is not None:
        factors = llama3_rope_factors(**rope)
        plans.append(_TensorPlan(names.ROPE_FREQS, factors.shape, None, generated=factors))
    longrope = longrope_factors(cfg)
    if longrope is not None:
        for name, f in zip((names.ROPE_FACTORS_SHORT, names.ROPE_FACTORS_LONG), longrope):
            plans.append(_TensorPlan(name, (len(f),), None, generated=np.asarray(f, dtype=np.float32)))
    pair = (embed, lm_head)
    for g in expected:
        if g == names.OUTPUT:
            continue
        suffix = names.block_suffix(g)
        heads = getattr(cfg, names.PERMUTED[suffix]) if cfg.arch.permute_qk and suffix in names.PERMUTED else 0
        plans.append(_TensorPlan(g, expected[g], found[g], permute_heads=heads,
                                 tied_role="embed" if (tied and g == names.TOKEN_EMBD) else None, tied_pair=pair,
                                 shift=cfg.arch.norm_shift if g.endswith("norm.weight") else 0.0))
    if not tied:
        plans.append(_TensorPlan(names.OUTPUT, expected[names.OUTPUT], found[names.OUTPUT]))
    elif any(lm_head in a.replacements or embed in a.replacements for a in adapters):
        if cfg.arch.drop_lm_head:
            raise ConvertError(f"{ckpt.dir}: an adapter replaces only one of the tied embed_tokens / lm_head, "
                               f"but {cfg.arch.gguf} files cannot hold a separate output.weight")
        plans.append(_TensorPlan(names.OUTPUT, expected[names.OUTPUT], embed, tied_role="output", tied_pair=pair))
    return plans


def _hf_name(found: dict[str, str], gguf: str, default: str) -> str:
    """The checkpoint's own name of a tensor (a multimodal checkpoint prefixes the text model's names)."""
    return found.get(gguf, default)


def _tied_pair(ckpt: Checkpoint, adapters: list[LoraAdapter], plan: _TensorPlan) -> np.ndarray:
    """The embed ("embed") or lm_head ("output") weight of a tied checkpoint after every adapter, in order."""
    embed_name, lm_head_name = plan.tied_pair
    shared = ckpt.load_f32(embed_name)
    embed = output = shared
    untied = False
    for a in adapters:
        if not untied and (embed_name in a.replacements or lm_head_name in a.replacements):
            untied, output = True, shared.copy()   # from here on the two weights evolve separately
        rep_e, rep_o = a.replacement(embed_name), a.replacement(lm_head_name)
        if rep_e is not None:
            embed = rep_e
        if rep_o is not None:
            output = rep_o
        a.apply_override(embed_name, embed)
        a.apply_override(lm_head_name, output)
        a.add_delta(embed_name, embed)
        a.add_delta(lm_head_name, output)   # same array as `embed` while the pair is still tied
    return embed if plan.tied_role == "embed" else output


def _assign_types(plans: list[_TensorPlan], cfg: HFConfig, ftype: LlamaFileType) -> None:
    """Each tensor's type as llama-quantize would choose it (norms and 1-D tensors F32, see stays_f32)."""
    chosen = plan_tensor_types([(p.name, p.shape) for p in plans], ftype, n_layer=cfg.n_layer,
                               n_head=cfg.n_head, n_head_kv=cfg.n_head_kv)
    for p in plans:
        p.ggml_type = GGMLType(chosen[p.name])


def _producer(plan: _TensorPlan, ckpt: Checkpoint, adapters: list[LoraAdapter], i: int, n: int,
              progress: Progress | None):
    """A zero-argument callable the writer calls when it streams this tensor."""
    def make() -> np.ndarray:
        if progress is not None:
            progress(i + 1, n, plan.name)
        if plan.generated is not None:
            w = plan.generated
        elif plan.tied_role is not None:
            w = _tied_pair(ckpt, adapters, plan)
        elif _STORED_AS.get(ckpt.stored_type(plan.source)) == plan.ggml_type and not plan.shift and \
                not any(a.touches(plan.source) for a in adapters):
            # same type in and out, nothing merged: pass the stored bits through (identical to the
            # float32 round trip, without its cost)
            w = ckpt.load_stored(plan.source)
            _check_finite(plan, w, BF16_EXP if plan.ggml_type == GGMLType.BF16 else None)   # bf16 as raw bits
            if plan.permute_heads:
                w = permute_rows(w, plan.permute_heads)
            return w
        else:
            w = ckpt.load_f32(plan.source)
            for a in adapters:
                r = a.replacement(plan.source)
                if r is not None:
                    w = r
                a.apply_override(plan.source, w)
                a.add_delta(plan.source, w)
        _check_finite(plan, w)
        if plan.shift:
            w = w + np.float32(plan.shift)
        if plan.permute_heads:
            w = permute_rows(w, plan.permute_heads)
        return encode(w, plan.ggml_type)
    return make


def _check_finite(plan: _TensorPlan, w: np.ndarray, exp_mask: int | None = None) -> None:
    """NaN/Inf weights (or a LoRA merge that overflowed) would make a file that only produces garbage."""
    if first_nonfinite(w, None if exp_mask is None else np.uint16(exp_mask)) is not None:
        source = f" (from {plan.source})" if plan.source else ""
        raise ConvertError(f"tensor {plan.name}{source} holds NaN or Inf values; refusing to convert it")


def encode(w: np.ndarray, t: GGMLType) -> np.ndarray:
    """float32 tensor -> what GGUFWriter.add_tensor takes for type t (float32, float16 or raw uint8 blocks)."""
    if t == GGMLType.F32:
        return np.ascontiguousarray(w, dtype=np.float32)
    if t == GGMLType.F16:
        return w.astype(np.float16)
    return quantize(w, t)
