"""Human and JSON descriptions of a GGUF file (what `llmrun info` prints)."""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from ..safe_text import printable
from .constants import GGUFValueType, LlamaFileType
from .metadata import describe_value, is_integer
from .reader import GGUFReader

_SHORT_ARRAY = 8      # arrays up to this length are printed in full
_LONG_STRING = 80     # strings are cut after this many characters in the human view


def file_type_name(value) -> str | None:
    """general.file_type as a lower-case name ("q4_k_m", "f32"), None when absent or unknown."""
    if not is_integer(value):
        return None
    try:
        ft = LlamaFileType(int(value))
    except ValueError:
        return None
    return ft.name.lower().removeprefix("mostly_").removeprefix("all_")


def value_type_name(vtype: GGUFValueType) -> str:
    return vtype.name.lower()


def _plain(value, vtype: GGUFValueType):
    """A scalar as a JSON-friendly Python value; float32 shown by its shortest decimal."""
    if vtype is GGUFValueType.FLOAT32:
        return float(str(np.float32(value)))
    return value


def _element_list(value, etype: GGUFValueType) -> list:
    if isinstance(value, np.ndarray):
        return [_plain(v, etype) for v in value.tolist()]
    return list(value)


def describe(r: GGUFReader, runnable: Sequence[str] = ()) -> dict:
    """Everything `llmrun info --json` prints, as one JSON-serializable object. `runnable`: the architectures
    the engine runs (the report says whether this file's is one of them)."""
    metadata = {}
    for key, value in r.metadata.items():
        vtype, etype = r.metadata_types[key]
        if vtype is GGUFValueType.ARRAY:
            metadata[key] = {"type": value_type_name(etype), "len": len(value)}
        else:
            metadata[key] = _plain(value, vtype)
    tensors = [{"name": ti.name, "type": ti.ggml_type.lower, "shape": list(ti.shape),
                "offset": ti.offset, "nbytes": ti.nbytes} for ti in r.tensors.values()]
    return {
        "file": r.path,
        "file_size": r.file_size,
        "version": r.version,
        "alignment": r.alignment,
        "data_offset": r.data_offset,
        "architecture": _string_or_none(r.get("general.architecture")),
        "runs_in_llmrun": r.get("general.architecture") in runnable,
        "name": _string_or_none(r.get("general.name")),
        "file_type": file_type_name(r.get("general.file_type")),
        "n_params": sum(ti.n_elements for ti in r.tensors.values()),
        "n_tensors": len(r.tensors),
        "metadata": metadata,
        "tensors": tensors,
    }


def _string_or_none(value):
    return value if isinstance(value, str) else None


def _show_string(s: str, limit: int = _LONG_STRING) -> str:
    text = printable(s[:limit * 2])
    if len(text) > limit or len(s) > limit * 2:
        return f'"{text[:limit]}…" ({len(s)} chars)'
    return f'"{text}"'


def _field(value, missing: str = "(not set)") -> str:
    """A metadata string for the report (escaped); a value of another kind is described, not printed."""
    if value is None or (isinstance(value, str) and not value):
        return missing
    if isinstance(value, str):
        return printable(value)
    return f"({describe_value(value)})"


def _show_value(value, vtype: GGUFValueType, etype: GGUFValueType | None) -> str:
    if vtype is GGUFValueType.STRING:
        return _show_string(value)
    if vtype is GGUFValueType.BOOL:
        return "true" if value else "false"
    if vtype is not GGUFValueType.ARRAY:
        return str(_plain(value, vtype))
    items = _element_list(value[:_SHORT_ARRAY], etype)
    shown = [_show_string(v, 24) if etype is GGUFValueType.STRING else
             str(v).lower() if etype is GGUFValueType.BOOL else str(v) for v in items]
    if len(value) <= _SHORT_ARRAY:
        return "[" + ", ".join(shown) + "]"
    return "[" + ", ".join(shown[:3]) + f", …] ({len(value)} items)"


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    raise AssertionError


def _human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(n)


def describe_text(r: GGUFReader, runnable: Sequence[str] = ()) -> str:
    """The human-readable `llmrun info` report."""
    d = describe(r, runnable)
    lines = []
    add = lines.append
    ft = r.get("general.file_type")
    type_counts = Counter(ti.ggml_type.lower for ti in r.tensors.values())
    rows = [
        ("file", printable(r.path)),
        ("file size", f"{_human_size(d['file_size'])} ({d['file_size']} bytes)"),
        ("format", f"GGUF v{d['version']}, alignment {d['alignment']}, data at offset {d['data_offset']}"),
        ("architecture", _field(r.get("general.architecture"))),
        ("supported", f"{'yes' if d['runs_in_llmrun'] else 'no'} (llmrun runs: {', '.join(runnable)})"),
        ("name", _field(r.get("general.name"))),
        ("file type", "(not set)" if ft is None else f"{d['file_type'] or 'unknown'} ({ft})"),
        ("parameters", f"{_human_count(d['n_params'])} ({d['n_params']})"),
        ("tensor types", ", ".join(f"{t}: {c}" for t, c in type_counts.most_common()) or "(none)"),
    ]
    for k, v in rows:
        add(f"{k:<14}{v}")

    arch = d["architecture"]
    if isinstance(arch, str):
        prefix = arch + "."
        hp = [(k[len(prefix):], k) for k in r.metadata if k.startswith(prefix)]
        if hp:
            add("")
            add("hyper-parameters")
            for short, key in hp:
                vtype, etype = r.metadata_types[key]
                add(f"  {printable(short):<36}{_show_value(r.metadata[key], vtype, etype)}")
    model = r.get("tokenizer.ggml.model")
    tokens = r.get("tokenizer.ggml.tokens")
    if model is not None or tokens is not None:
        count = len(tokens) if isinstance(tokens, (list, np.ndarray)) else 0
        add(f"  {'vocabulary':<36}{_field(model, '?')}, {count} tokens")

    add("")
    add(f"metadata ({len(r.metadata)} keys)")
    for key, value in r.metadata.items():
        vtype, etype = r.metadata_types[key]
        tname = value_type_name(vtype) if etype is None else f"{value_type_name(etype)}[{len(value)}]"
        add(f"  {printable(key):<40} {tname:<14} {_show_value(value, vtype, etype)}")

    add("")
    add(f"tensors ({len(r.tensors)})")
    names = [printable(n) for n in r.tensors]
    width = max((len(n) for n in names), default=4)
    add(f"  {'#':>4}  {'name':<{width}}  {'type':<7} shape")
    for i, (name, ti) in enumerate(zip(names, r.tensors.values())):
        add(f"  {i:>4}  {name:<{width}}  {ti.ggml_type.lower:<7} {list(ti.shape)}")
    return "\n".join(lines)
