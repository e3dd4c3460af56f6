"""Re-quantize a GGUF model to another file type (the library behind `llmrun quantize`).

Like llama-quantize: every KV is copied with its type, every tensor gets the type chosen by llama.cpp's
mix rules (`plan_tensor_types`; norms and other 1-D tensors are stored as F32, see `stays_f32`).
Tensors are dequantized and quantized one at a time while the writer streams them out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import LlmrunError
from ..gguf import GGUFReader, GGUFWriter, GGMLType, GGUFValueType
from ..gguf.writer import check_output_path
from ..ggml import GGML_QUANT_VERSION
from ..quants import quantize
from ..quants.mixes import parse_file_type, plan_tensor_types
from ..tensors import tensor_to_float32

# How `progress` is told about each tensor: (index from 0, total, name, chosen type).
Progress = Callable[[int, int, str, GGMLType], None]


def _hparam(r: GGUFReader, arch: str, name: str, default=None) -> int:
    v = r.get(f"{arch}.{name}", default)
    if v is None:
        raise LlmrunError(f"{r.path}: missing metadata {arch}.{name}, needed to choose tensor types")
    if isinstance(v, np.ndarray):  # per-layer arrays: the mix rules only need one representative value
        v = int(v.max()) if v.size else 0
    return int(v)


def requantize(in_path, out_path, file_type, *, overwrite: bool = False,
               progress: Progress | None = None) -> dict[str, GGMLType]:
    """Write `out_path` as `in_path` re-quantized to `file_type` (name like "q4_k_m" or LlamaFileType).

    Returns the type chosen for every tensor. Nothing is written unless the whole file is.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    ftype = parse_file_type(file_type)
    check_output_path(out_path, overwrite, inputs=[in_path])

    r = GGUFReader(in_path)
    try:
        arch = r.get("general.architecture")
        if not isinstance(arch, str):
            raise LlmrunError(f"{in_path}: missing general.architecture")
        n_head = _hparam(r, arch, "attention.head_count")
        plan = plan_tensor_types(
            [(ti.name, ti.shape) for ti in r.tensors.values()], ftype,
            n_layer=_hparam(r, arch, "block_count"), n_head=n_head,
            n_head_kv=_hparam(r, arch, "attention.head_count_kv", n_head))

        w = GGUFWriter(out_path, overwrite=overwrite, alignment=r.alignment)
        overrides = {"general.quantization_version": (GGML_QUANT_VERSION, GGUFValueType.UINT32),
                     "general.file_type": (int(ftype), GGUFValueType.UINT32)}
        for key, value in r.metadata.items():
            if key in overrides:
                value, vtype = overrides.pop(key)
                w.add(key, value, vtype)
            else:
                vtype, etype = r.metadata_types[key]
                w.add(key, value, vtype, etype)
        for key, (value, vtype) in overrides.items():  # absent from the input: append, as llama.cpp does
            w.add(key, value, vtype)

        chosen: dict[str, GGMLType] = {}
        n = len(r.tensors)
        for i, ti in enumerate(r.tensors.values()):
            target = chosen[ti.name] = GGMLType(plan[ti.name])
            w.add_tensor(ti.name, ti.shape, target, _converter(ti, target, progress, i, n))
        w.write()
        return chosen
    finally:
        r.close()


def _converter(ti, target: GGMLType, progress: Progress | None, i: int, n: int):
    """Zero-arg callable producing the tensor's new bytes when the writer reaches it."""
    def produce():
        if progress is not None:
            progress(i, n, ti.name, target)
        if ti.ggml_type == target:  # llama.cpp copies tensors already of the target type
            return ti.data  # zero-copy view of the input's bytes
        x = tensor_to_float32(ti)
        if target == GGMLType.F32:
            return x
        return quantize(x.reshape(-1, ti.shape[-1]), target)
    return produce
