"""PEFT LoRA adapters as low-rank factors in GGUF layout, and llama.cpp's GGUF LoRA files (docs/formats.md §7b).

llama.cpp applies an adapter tensor pair as  y += s * alpha/r * B (A x)  with one `adapter.lora.alpha` for the
whole file and r = B's rank, while PEFT scales each module by its own alpha_m/r_m (alpha_m/sqrt(r_m) for
rsLoRA). We write alpha = lora_alpha verbatim, as llama.cpp's converter does, and fold the per-module ratio
(alpha_m/alpha, times sqrt(r_m) for rsLoRA) into B, so a plain LoRA's factors are stored unchanged.
The Q/K row permutation moves output rows only, i.e. B's rows; token_embd's A is stored transposed
(llama.cpp looks up A's rows per token). Both `llmrun convert-lora` and the run-time adapters
(llmrun/engine/adapters.py) read PEFT folders through `peft_factors`.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmrun.engine.archs import ARCHS
from llmrun.errors import ConvertError
from llmrun.gguf import GGMLType, GGUFValueType as VT, GGUFWriter, LlamaFileType
from llmrun.gguf.writer import check_output_path

from . import names
from .hf_config import load_config
from .jsonfile import read_json_object
from .lora import LoraAdapter
from .permute import permute_rows
from .pipeline import _expected_shapes, encode

# --type of convert-lora -> (general.file_type, type of every 2-D tensor); q8_0 needs rows of whole 32-blocks
# and falls back to f16 otherwise, as llama.cpp's converter does
OUT_TYPES = {"f32": (LlamaFileType.ALL_F32, GGMLType.F32), "f16": (LlamaFileType.MOSTLY_F16, GGMLType.F16),
             "q8_0": (LlamaFileType.MOSTLY_Q8_0, GGMLType.Q8_0)}
EMBED_HF, LM_HEAD_HF = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class LoraFactors:
    """One adapted tensor: delta W = alpha/rank * b @ a (token_embd: delta row t = alpha/rank * b @ a[t])."""
    name: str           # the base GGUF tensor, e.g. blk.0.attn_q.weight
    a: np.ndarray       # lora_a, numpy order (rank, in); token_embd: (n_vocab, rank)
    b: np.ndarray       # lora_b, (out, rank)

    @property
    def rank(self) -> int:
        return int(self.b.shape[1])


def _permuted(adapter: LoraAdapter, gguf: str) -> bool:
    """Whether this tensor's rows are permuted for NORM RoPE in the adapter's architecture (Q/K of llama)."""
    return ARCHS[adapter.arch].rope == "norm" and names.block_suffix(gguf) in names.PERMUTED


def needs_heads(adapter: LoraAdapter) -> bool:
    """True if the adapter has Q or K pairs, whose permutation needs the base's head counts."""
    return any(_permuted(adapter, names.gguf_name(hf, adapter.arch)) for hf in adapter.pairs)


def check_low_rank_only(adapter: LoraAdapter) -> None:
    """modules_to_save weights replace whole tensors: no low-rank side path can carry them. (Saved
    `base_layer` weights of adapted embeddings are the base's own and are skipped, as llama.cpp does.)"""
    if adapter.replacements:
        hf = next(iter(adapter.replacements))
        raise ConvertError(f"{adapter.dir}: the adapter replaces the whole weight {hf} (modules_to_save), which "
                           "a low-rank adapter cannot express; merge it with `llmrun convert --lora`")


def peft_factors(adapter: LoraAdapter, heads=None) -> tuple[float, list[LoraFactors]]:
    """(alpha, factors) of every LoRA pair in llama.cpp's layout. heads: anything with n_head and n_head_kv
    (HFConfig, the engine's hparams); needed only when Q/K are adapted."""
    check_low_rank_only(adapter)
    cfg = adapter.config
    alpha = float(cfg["lora_alpha"])
    rslora = adapter.use_rslora
    out = []
    for hf, pair in adapter.pairs.items():
        g = names.gguf_name(hf, adapter.arch)
        a, b = adapter.low_rank(hf)
        if pair.embedding:
            a = np.ascontiguousarray(a.T)
        elif adapter.fan_in_fan_out:
            raise ConvertError(f"{adapter.dir}: fan_in_fan_out adapters are not supported for LLaMA linear layers")
        rank = b.shape[1]
        fold = (pair.alpha / alpha) * (math.sqrt(rank) if rslora else 1.0)
        if fold != 1.0:
            b = b * np.float32(fold)
        suffix = names.block_suffix(g)
        if _permuted(adapter, g):
            if heads is None:
                raise ConvertError(f"{adapter.dir}: adapting {hf} needs the base model's head counts "
                                   "(give --base HF_DIR)")
            b = permute_rows(b, getattr(heads, names.PERMUTED[suffix]))
        out.append(LoraFactors(g, a, np.ascontiguousarray(b, dtype=np.float32)))
    out.sort(key=lambda f: _order(f.name, adapter.arch))
    return alpha, out


def _order(gguf: str, arch: str) -> tuple[int, int]:
    m = re.match(r"blk\.(\d+)\.(.+)$", gguf)
    order = names.block_order(arch)
    if m:
        return int(m.group(1)), order.index(m.group(2)) if m.group(2) in order else 99
    return (-1, 0) if gguf == names.TOKEN_EMBD else (1 << 30, 0)


def _base_dir(adapter_dir, base_dir) -> Path | None:
    """--base, else adapter_config.json's base_model_name_or_path when it is a local checkpoint folder (an
    unreadable config is left for LoraAdapter to report)."""
    if base_dir is not None:
        return Path(base_dir)
    try:
        guess = read_json_object(Path(adapter_dir) / "adapter_config.json").get("base_model_name_or_path")
    except ConvertError:
        return None
    if isinstance(guess, str) and guess and (Path(guess) / "config.json").is_file():
        return Path(guess)
    return None


def _check_against_base(adapter: LoraAdapter, cfg) -> None:
    expected = _expected_shapes(cfg)   # GGUF name -> shape implied by config.json
    shapes = {}
    for hf in list(adapter.pairs) + list(adapter.overrides):
        g = names.gguf_name(hf, adapter.arch)
        if g in expected:
            shapes[hf] = expected[g]
    adapter.validate(shapes, cfg.n_layer)
    if cfg.tie_embeddings:
        # llama.cpp's tied output *is* token_embd.weight, so it would look up this pair at the output too
        for hf, what in ((LM_HEAD_HF, "lm_head"), (EMBED_HF, "embed_tokens")):
            if hf in adapter.pairs:
                raise ConvertError(f"{adapter.dir}: LoRA on {what} of a model with tied embeddings cannot be "
                                   "written as a GGUF LoRA (llama.cpp shares one tensor for both); merge it with "
                                   "`llmrun convert --lora`")


def export_lora(adapter_dir, out_path, base_dir=None, out_type: str = "f32", overwrite: bool = False) -> Path:
    """Write the PEFT adapter in adapter_dir as a llama.cpp GGUF LoRA file. Returns the output path."""
    out_path = Path(out_path)
    key = str(out_type).strip().lower()
    if key not in OUT_TYPES:
        raise ConvertError(f"LoRA output type {out_type!r} is not supported (f32, f16, q8_0)")
    check_output_path(out_path, overwrite)
    ftype, tensor_type = OUT_TYPES[key]
    base = _base_dir(adapter_dir, base_dir)
    cfg = load_config(base) if base is not None else None
    # the base's architecture names the adapted weights (a llama base when there is no config to say)
    adapter = LoraAdapter(adapter_dir, arch=cfg.arch.gguf if cfg is not None else "llama")
    try:
        check_output_path(out_path, overwrite, inputs=[adapter.file.path, adapter.dir / "adapter_config.json"])
        check_low_rank_only(adapter)
        if cfg is not None:
            _check_against_base(adapter, cfg)
        elif needs_heads(adapter) or EMBED_HF in adapter.pairs or LM_HEAD_HF in adapter.pairs:
            what = "Q/K (their rows are permuted per head)" if needs_heads(adapter) else "embed_tokens/lm_head"
            raise ConvertError(f"{adapter.dir}: adapting {what} needs the base model's config.json (give --base "
                               "HF_DIR)")
        alpha, factors = peft_factors(adapter, cfg)
        writer = GGUFWriter(out_path, overwrite=overwrite)
        for k, v, vt in (("general.architecture", adapter.arch, VT.STRING), ("general.type", "adapter", VT.STRING),
                         ("general.name", adapter.dir.resolve().name or "adapter", VT.STRING),
                         ("general.file_type", int(ftype), VT.UINT32),
                         ("general.quantization_version", 2, VT.UINT32),
                         ("adapter.type", "lora", VT.STRING), ("adapter.lora.alpha", alpha, VT.FLOAT32)):
            writer.add(k, v, vt)
        for f in factors:
            for suffix, w in ((".lora_a", f.a), (".lora_b", f.b)):
                t = tensor_type if tensor_type != GGMLType.Q8_0 or w.shape[1] % 32 == 0 else GGMLType.F16
                writer.add_tensor(f.name + suffix, w.shape, t, lambda w=w, t=t: encode(w, t))
        writer.write()
    finally:
        adapter.close()
    return out_path
