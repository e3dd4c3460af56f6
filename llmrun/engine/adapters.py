"""Run-time LoRA: adapters beside the base's matrix products as a low-rank side path (docs/formats.md §7b).

For each adapted tensor W:  y = W x + s * alpha/r * B (A x), with s the user's scale, alpha the adapter's
`adapter.lora.alpha` and r B's rank (alpha 0: s alone), llama.cpp's rule. The base weights stay packed and
shared; swapping adapters only rebuilds the small side paths. token_embd's pair adds rows at the lookup
(x_t += s * alpha/r * B a_t, a_t = row t of its A); output.weight's pair sits beside the output product even
when the embeddings are tied (PEFT's lm_head).

Sources: llama.cpp GGUF LoRA files (`general.type = adapter`), and PEFT adapter folders, read through
llmrun.convert (the factors `llmrun convert-lora` writes: per-module scaling folded into B, Q/K rows
permuted). Everything is checked against the model when an adapter is loaded, and `build_side_paths`
computes the new paths before `install` touches the model, so a bad adapter changes nothing.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AdapterError, LlmrunError

EMBD = "token_embd.weight"


@dataclass
class _Segment:
    col0: int            # output columns col0:col1 of the group's product
    col1: int
    r0: int              # rank columns r0:r1 of the stacked A
    r1: int
    bt: np.ndarray       # B transposed (rank, rows), float32 contiguous


@dataclass
class _GroupFactors:
    """One adapter's pairs for one product: A's stacked, (in, R) contiguous; alpha/r per rank column."""
    at: np.ndarray
    segments: list[_Segment]
    col_scale: np.ndarray    # (R,) float32


@dataclass
class LoadedAdapter:
    """An adapter checked against one model and laid out for it."""
    path: str
    alpha: float
    groups: dict[int, _GroupFactors] = field(default_factory=dict)   # index in model.matrix_groups()
    embd: _GroupFactors | None = None                                 # at = token_embd's A (n_vocab, r)


class SidePath:
    """y[:, cols] += (x @ A^T * scale) @ B^T for every adapted tensor of one product, all adapters stacked."""

    def __init__(self, at: np.ndarray, segments: list[_Segment], scale: np.ndarray):
        self.at, self.segments, self.scale = at, segments, scale

    def add_to(self, X: np.ndarray, Y: np.ndarray) -> None:
        u = X @ self.at
        u *= self.scale
        for s in self.segments:
            Y[:, s.col0:s.col1] += u[:, s.r0:s.r1] @ s.bt

    def add_rows(self, ids: np.ndarray, X: np.ndarray) -> None:
        """token_embd (A's rows per token): X[t] += (A[ids[t]] * scale) @ B^T."""
        u = self.at[ids] * self.scale
        for s in self.segments:
            X += u[:, s.r0:s.r1] @ s.bt


def _scale(alpha: float, rank: int) -> float:
    return alpha / rank if alpha != 0 else 1.0


def _read_gguf_lora(path: str, arch: str) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]]]:
    from ..gguf import GGUFReader
    from ..tensors import tensor_to_float32
    with GGUFReader(path) as r:
        md = r.metadata
        kind, adapter_type = r.get_str("general.type", None), r.get_str("adapter.type", None)
        if kind != "adapter" or adapter_type != "lora":
            raise AdapterError(f"{path}: not a LoRA adapter (general.type {kind!r:.40}, "
                               f"adapter.type {adapter_type!r:.40})")
        adapter_arch = r.get_str("general.architecture", None)
        if adapter_arch != arch:
            raise AdapterError(f"{path}: adapter for architecture {adapter_arch!r:.40}, the model is {arch!r}")
        alpha = md.get("adapter.lora.alpha", 0.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not math.isfinite(alpha):
            raise AdapterError(f"{path}: adapter.lora.alpha {alpha!r} is not a finite number")
        if "adapter.alora.invocation_tokens" in md:
            raise AdapterError(f"{path}: activated LoRA (aLoRA) adapters are not supported")
        halves: dict[str, dict[str, np.ndarray]] = {}
        for name, ti in r.tensors.items():
            base, dot, kind = name.rpartition(".")
            if name.endswith("_norm.weight"):
                continue   # llama.cpp ignores norm vectors in adapters too
            if not dot or kind not in ("lora_a", "lora_b"):
                raise AdapterError(f"{path}: LoRA tensor {name!r} has an unexpected suffix")
            if len(ti.shape) != 2:
                raise AdapterError(f"{path}: LoRA tensor {name} is not 2-D")
            try:
                halves.setdefault(base, {})[kind] = np.ascontiguousarray(tensor_to_float32(ti), dtype=np.float32)
            except LlmrunError as e:
                raise AdapterError(f"{path}: tensor {name}: {e}") from None
    pairs = {}
    for base, h in halves.items():
        if len(h) != 2:
            raise AdapterError(f"{path}: LoRA tensor pair for {base} is missing one component")
        pairs[base] = (h["lora_a"], h["lora_b"])
    return float(alpha), pairs


def _read_peft(path: str, model, shapes: dict[str, tuple[int, int]]):
    # PEFT's files have one home, the converter: the same factors `llmrun convert-lora` writes
    from ..convert.lora import LoraAdapter
    from ..convert.lora_gguf import check_low_rank_only, peft_factors
    from ..convert.names import gguf_name
    arch = model.hparams.arch.name
    adapter = LoraAdapter(path, arch=arch)
    try:
        check_low_rank_only(adapter)
        # the base's shapes under HF names, so that a wrong base is reported before any permutation
        hf_shapes = {hf: shapes[gguf_name(hf, arch)] for hf in list(adapter.pairs) + list(adapter.overrides)
                     if gguf_name(hf, arch) in shapes}
        adapter.validate(hf_shapes, model.hparams.n_layer)
        alpha, factors = peft_factors(adapter, heads=model.hparams)
    finally:
        adapter.close()
    return alpha, {f.name: (f.a, f.b) for f in factors}


def load_adapter(path, model) -> LoadedAdapter:
    """Read a GGUF LoRA file or a PEFT folder and check it against `model` (names, shapes, ranks)."""
    path = os.fspath(path)
    hp = model.hparams
    where = {}   # tensor name -> (group index, first column, rows, cols)
    for gi, g in enumerate(model.matrix_groups()):
        for name, col, rows, cols in g.tensors:
            where[name] = (gi, col, rows, cols)
    if os.path.isdir(path):
        shapes = {name: (rows, cols) for name, (_, _, rows, cols) in where.items()}
        alpha, pairs = _read_peft(path, model, {**shapes, EMBD: (hp.n_vocab, hp.n_embd)})
    elif os.path.isfile(path):
        alpha, pairs = _read_gguf_lora(path, hp.arch.name)
    else:
        raise AdapterError(f"{path}: LoRA adapter not found (a GGUF LoRA file or a PEFT adapter folder)")
    if not pairs:
        raise AdapterError(f"{path}: the adapter has no LoRA tensors")
    loaded = LoadedAdapter(path, alpha)
    per_group: dict[int, list] = {}
    for name, (a, b) in pairs.items():
        rank = b.shape[1]
        if rank == 0:
            raise AdapterError(f"{path}: LoRA pair for {name} has rank 0")
        if name == EMBD:
            want_a, want_b = (hp.n_vocab, rank), (hp.n_embd, rank)
        elif name in where:
            _, col, rows, cols = where[name]
            want_a, want_b = (rank, cols), (rows, rank)
        else:
            raise AdapterError(f"{path}: LoRA tensor {name} does not exist in the base model "
                               "(adapter made for another base model?)")
        if a.shape != want_a or b.shape != want_b:
            raise AdapterError(f"{path}: LoRA pair for {name} has A {list(a.shape)} and B {list(b.shape)}, the "
                               f"base model needs A {list(want_a)} and B {list(want_b)} (wrong rank, or an "
                               "adapter for another base model?)")
        if name == EMBD:
            loaded.embd = _GroupFactors(a, [_Segment(0, hp.n_embd, 0, rank, np.ascontiguousarray(b.T))],
                                        np.full(rank, _scale(alpha, rank), np.float32))
        else:
            per_group.setdefault(where[name][0], []).append((where[name][1], where[name][2], a, b))
    for gi, members in per_group.items():
        members.sort(key=lambda m: m[0])
        segments, r = [], 0
        for col, rows, a, b in members:
            segments.append(_Segment(col, col + rows, r, r + a.shape[0], np.ascontiguousarray(b.T)))
            r += a.shape[0]
        at = np.ascontiguousarray(np.concatenate([m[2] for m in members], axis=0).T)
        scale = np.concatenate([np.full(m[2].shape[0], _scale(alpha, m[2].shape[0]), np.float32)
                                for m in members])
        loaded.groups[gi] = _GroupFactors(at, segments, scale)
    return loaded


def _combine(parts: list[tuple[_GroupFactors, float]]) -> SidePath:
    """One side path for several adapters' factors of the same product, each at its user scale."""
    if len(parts) == 1:
        gf, s = parts[0]
        return SidePath(gf.at, gf.segments, gf.col_scale * np.float32(s))
    segments, offset = [], 0
    for gf, _ in parts:
        segments += [_Segment(x.col0, x.col1, x.r0 + offset, x.r1 + offset, x.bt) for x in gf.segments]
        offset += gf.at.shape[1]
    at = np.ascontiguousarray(np.concatenate([gf.at for gf, _ in parts], axis=1))   # rank columns side by side
    scale = np.concatenate([gf.col_scale * np.float32(s) for gf, s in parts])
    return SidePath(at, segments, scale)


def build_side_paths(model, active: list[tuple[LoadedAdapter, float]]):
    """(side path per matrix group index, token_embd side path) for the active adapters; model unchanged."""
    active = [(a, s) for a, s in active if s != 0.0]   # scale 0 is exactly the base
    paths: dict[int, SidePath] = {}
    for gi in range(len(model.matrix_groups())):
        parts = [(a.groups[gi], s) for a, s in active if gi in a.groups]
        if parts:
            paths[gi] = _combine(parts)
    embd = [(a.embd, s) for a, s in active if a.embd is not None]
    return paths, (_combine(embd) if embd else None)


def install(model, side_paths) -> None:
    """Put the side paths beside the model's products (replacing any previous ones); cannot fail."""
    paths, embd = side_paths
    for gi, g in enumerate(model.matrix_groups()):
        g.lora = paths.get(gi)
    model.embd_lora = embd


class AdapterCache:
    """Adapters loaded for one model, by file identity (path, size, modification time): loaded once."""

    def __init__(self):
        self._loaded: dict[tuple, LoadedAdapter] = {}

    def get(self, path, model) -> LoadedAdapter:
        p = Path(os.fspath(path))
        try:
            st = p.stat()
            files = [p / "adapter_model.safetensors", p / "adapter_config.json"] if p.is_dir() else []
            stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists())
            key = (str(p.resolve()), st.st_size, st.st_mtime_ns, stamp)
        except OSError:
            key = None   # load_adapter reports what is wrong with the path
        if key is None or key not in self._loaded:
            adapter = load_adapter(p, model)
            if key is not None:
                self._loaded[key] = adapter
            return adapter
        return self._loaded[key]
