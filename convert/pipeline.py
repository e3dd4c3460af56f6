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
from .hf_config import ARCH, HFConfig, hparam_metadata, llama3_rope_params, load_config
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
    generated: np.ndarray | None = None
    ggml_type: GGMLType = GGMLType.F32


def _expected_shapes(c: HFConfig) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape for every tensor a LLaMA checkpoint with this config must have."""
    q, kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    per_block = {"attn_norm.weight": (c.n_embd,), "attn_q.weight": (q, c.n_embd), "attn_k.weight": (kv, c.n_embd),
                 "attn_v.weight": (kv, c.n_embd), "attn_output.weight": (c.n_embd, q),
                 "ffn_norm.weight": (c.n_embd,), "ffn_gate.weight": (c.n_ff, c.n_embd),
                 "ffn_up.weight": (c.n_ff, c.n_embd), "ffn_down.weight": (c.n_embd, c.n_ff)}
    out = {names.TOKEN_EMBD: (c.n_vocab, c.n_embd)}
    for i in range(c.n_layer):
        for suffix in names.BLOCK_ORDER:
            out[f"blk.{i}.{suffix}"] = per_block[suffix]
    out["output_norm.weight"] = (c.n_embd,)
    out[names.OUTPUT] = (c.n_vocab, c.n_embd)
    return out


def convert_checkpoint(hf_dir, out_path, out_type: str = "f16",
                       loras: Sequence[tuple[str | Path, float]] = (), overwrite: bool = False,
                       progress: Progress | None = None) -> Path:
    """Convert a HF LLaMA/Mistral safetensors checkpoint, with LoRA adapters merged in order, to GGUF.

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
            adapters.append(LoraAdapter(d, scale))
        check_output_path(out_path, overwrite, inputs=[f.path for f in ckpt.files] + [a.file.path for a in adapters])

        plans = _plan_tensors(cfg, ckpt, adapters)
        _assign_types(plans, cfg, ftype)
        vocab = vocab_metadata(hf_dir, cfg.n_vocab)

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
    return [("general.architecture", ARCH, VT.STRING, None),
            ("general.type", "model", VT.STRING, None),
            ("general.name", name, VT.STRING, None),
            *hparam_metadata(cfg),
            ("general.file_type", int(ftype), VT.UINT32, None),
            ("general.quantization_version", 2, VT.UINT32, None)]


def _check_layer_count(cfg: HFConfig, ckpt: Checkpoint) -> None:
    """config.json's layer count against the layers the checkpoint holds, before anything of that size is
    built (num_hidden_layers: 10**7 would otherwise make 90 million expected shapes)."""
    layers = {int(m.group(1)) for m in map(names.LAYER_RE.match, ckpt.names()) if m}
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
            g = names.gguf_name(hf)
        except ConvertError as e:
            raise ConvertError(f"{ckpt.entries[hf].file}: {e}") from None
        if g is None:
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
    base_shapes = {hf: tuple(ckpt.shape(hf)) for g, hf in found.items()}
    base_shapes.setdefault(LM_HEAD, expected[names.OUTPUT])
    for a in adapters:
        a.validate(base_shapes, cfg.n_layer)

    plans: list[_TensorPlan] = []
    rope = llama3_rope_params(cfg)
    if rope is not None:
        factors = llama3_rope_factors(**rope)
        plans.append(_TensorPlan(names.ROPE_FREQS, factors.shape, None, generated=factors))
    for g in expected:
        if g == names.OUTPUT:
            continue
        suffix = names.block_suffix(g)
        heads = getattr(cfg, names.PERMUTED[suffix]) if suffix in names.PERMUTED else 0
        plans.append(_TensorPlan(g, expected[g], found[g], permute_heads=heads,
                                 tied_role="embed" if (tied and g == names.TOKEN_EMBD) else None))
    if not tied:
        plans.append(_TensorPlan(names.OUTPUT, expected[names.OUTPUT], found[names.OUTPUT]))
    elif any(LM_HEAD in a.replacements or EMBED in a.replacements for a in adapters):
        plans.append(_TensorPlan(names.OUTPUT, expected[names.OUTPUT], EMBED, tied_role="output"))
    return plans


def _tied_pair(ckpt: Checkpoint, adapters: list[LoraAdapter], role: str) -> np.ndarray:
    """The embed ("embed") or lm_head ("output") weight of a tied checkpoint after every adapter, in order."""
    shared = ckpt.load_f32(EMBED)
    embed = output = shared
    untied = False
    for a in adapters:
        if not untied and (EMBED in a.replacements or LM_HEAD in a.replacements):
            untied, output = True, shared.copy()   # from here on the two weights evolve separately
        rep_e, rep_o = a.replacement(EMBED), a.replacement(LM_HEAD)
        if rep_e is not None:
            embed = rep_e
        if rep_o is not None:
            output = rep_o
        a.apply_override(EMBED, embed)
        a.apply_override(LM_HEAD, output)
        a.add_delta(EMBED, embed)
        a.add_delta(LM_HEAD, output)   # same array as `embed` while the pair is still tied
    return embed if role == "embed" else output


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
            w = _tied_pair(ckpt, adapters, plan.tied_role)
        elif _STORED_AS.get(ckpt.stored_type(plan.source)) == plan.ggml_type and \
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
