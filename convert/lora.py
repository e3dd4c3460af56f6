"""PEFT LoRA adapters: load, validate against the base checkpoint, merge into base weights (docs/formats.md §7a).

Merge rule (PEFT's merge_and_unload): W' = W + s * scaling * (B @ A), in float32, in the HF layout (the Q/K
permutation and quantization happen afterwards), with scaling = alpha/r, or alpha/sqrt(r) for rsLoRA, r and
alpha taken per module from rank_pattern/alpha_pattern, and s the user's --lora DIR:SCALE. Embedding LoRA
(lora_embedding_A/B) adds (B @ A)^T. modules_to_save entries replace the whole weight.
Everything is checked when the adapter is opened, before the converter writes a byte.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmrun.errors import ConvertError
from llmrun.gguf.metadata import is_number, parse_bool

from .checkpoint import SafetensorsFile, TensorEntry, bf16_bits_to_f32
from .hf_config import config_values
from .jsonfile import read_json_object
from .names import gguf_name

# HF module names LoRA may target (as PEFT target_modules suffixes); Phi-3 fuses qkv_proj and gate_up_proj
KNOWN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "qkv_proj", "gate_up_proj", "lm_head", "embed_tokens")

# adapter_config.json switches that change what merging means; we refuse rather than merge wrongly
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA adapters",
    "lora_bias": "adapters with a LoRA bias",
    "use_qalora": "QALoRA adapters",
    "alora_invocation_tokens": "activated LoRA (aLoRA) adapters",
    "layer_replication": "adapters with layer_replication",
    "trainable_token_indices": "adapters with trainable_token_indices",
    "target_parameters": "adapters targeting parameters (target_parameters)",
}

_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\."
                     r"(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """`DIR[:SCALE]` -> (DIR, SCALE); the scale defaults to 1.0. A ':' not followed by a number is part of DIR."""
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return arg, 1.0


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's get_pattern_key: the first pattern matching the end of the module name (at a dot boundary).
    `patterns` maps compiled regexes to values (see _patterns)."""
    for regex, value in patterns.items():
        if regex.match(key):
            return value
    return default


def _patterns(path: Path, cfg: dict, key: str, integer: bool) -> dict:
    """rank_pattern / alpha_pattern: {regex: positive number}, compiled the way PEFT matches them."""
    raw = config_values(cfg, path).get_dict(key, None) or {}
    out = {}
    for pat, value in raw.items():
        if isinstance(value, bool) or not (isinstance(value, int) if integer else is_number(value)) or \
                not math.isfinite(value) or value <= 0:
            raise ConvertError(f"{path}: {key}[{pat!r:.60}] must be a positive {'integer' if integer else 'number'}, "
                               f"got {value!r:.40}")
        if len(pat) > 1000:
            raise ConvertError(f"{path}: {key} pattern of {len(pat)} characters is too long")
        try:
            out[re.compile(rf"(.*\.)?({pat})$")] = value
        except (re.error, RecursionError, OverflowError) as e:
            raise ConvertError(f"{path}: {key} key {pat!r:.60} is not a valid regular expression ({e})") from None
    return out


def _is_set(value) -> bool:
    """Is a config switch on? ("false" is off, unlike bool("false")); lists and objects: when non-empty."""
    parsed = parse_bool(value)
    return parsed if parsed is not None else bool(value)


@dataclass
class _Pair:
    module: str          # HF module path, e.g. model.layers.0.self_attn.q_proj
    a: TensorEntry | None = None
    b: TensorEntry | None = None
    embedding: bool = False
    scale: float = 0.0   # user scale * alpha/r (or alpha/sqrt(r))
    alpha: float = 0.0   # this module's lora_alpha (alpha_pattern or the adapter's)


class LoraAdapter:
    """One PEFT adapter folder, validated; `apply(hf_weight_name, w)` merges it into a float32 weight."""

    def __init__(self, adapter_dir: str | Path, user_scale: float = 1.0, arch: str = "llama"):
        self.dir = Path(adapter_dir)
        self.arch = arch   # the base's GGUF architecture: names the weights an adapter may target
        self.user_scale = float(user_scale)
        if not math.isfinite(self.user_scale):
            raise ConvertError(f"{self.dir}: LoRA scale must be a finite number")
        if not self.dir.is_dir():
            raise ConvertError(f"{self.dir}: LoRA adapter folder not found")
        cfg_path = self.dir / "adapter_config.json"
        if not cfg_path.is_file():
            raise ConvertError(f"{self.dir}: no adapter_config.json (not a PEFT adapter folder)")
        cfg = read_json_object(cfg_path)
        self.config = cfg
        self._check_config(cfg_path, cfg)
        weights = self.dir / "adapter_model.safetensors"
        if not weights.is_file():
            if (self.dir / "adapter_model.bin").is_file():
                raise ConvertError(f"{self.dir}: adapter_model.bin is not supported; save the adapter with "
                                   "safetensors (PEFT's default)")
            raise ConvertError(f"{self.dir}: no adapter_model.safetensors")
        self.file = SafetensorsFile(weights, folder=self.dir)
        self.pairs: dict[str, _Pair] = {}             # HF weight name -> LoRA pair
        self.replacements: dict[str, TensorEntry] = {}  # HF weight name -> full weight (modules_to_save)
        self.overrides: dict[str, TensorEntry] = {}     # HF weight name -> saved base weight (base_layer)
        self._index_tensors()

    # -- reading -------------------------------------------------------------------------------------------
    def _check_config(self, path: Path, cfg: dict) -> None:
        c = config_values(cfg, path)
        ptype = c.get_str("peft_type", "LORA")
        if ptype.upper() != "LORA":
            raise ConvertError(f"{path}: PEFT type {ptype!r:.60} is not supported (only LORA)")
        for flag, what in _UNSUPPORTED_FLAGS.items():
            if _is_set(cfg.get(flag)):
                raise ConvertError(f"{path}: {what} are not supported")
        bias = c.get_str("bias", "none")
        if bias != "none":
            raise ConvertError(f"{path}: bias={bias!r:.60} is not supported (only LoRA matrices are merged)")
        for key in ("r", "lora_alpha"):
            c.get_float(key, lo=0.0, lo_open=True)
        self.rank_pattern = _patterns(path, cfg, "rank_pattern", integer=True)
        self.alpha_pattern = _patterns(path, cfg, "alpha_pattern", integer=False)
        self.use_rslora = c.get_bool("use_rslora", False)
        self.fan_in_fan_out = c.get_bool("fan_in_fan_out", False)
        targets = cfg.get("target_modules")
        if isinstance(targets, list):
            targets = c.get_array("target_modules", "str")
            unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in KNOWN_MODULES]
            if unknown:
                raise ConvertError(f"{path}: target module {unknown[0]!r:.80} is not a linear layer we know "
                                   f"(known: {', '.join(KNOWN_MODULES)})")
        elif targets is not None:
            c.get_str("target_modules")          # PEFT also takes one regular expression
        for m in c.get_array("modules_to_save", "str", None) or []:
            if m.rsplit(".", 1)[-1] not in ("lm_head", "embed_tokens"):
                raise ConvertError(f"{path}: modules_to_save entry {m!r:.80} is not supported "
                                   "(only lm_head and embed_tokens)")

    def _index_tensors(self) -> None:
        cfg = self.config
        r0, alpha0 = cfg["r"], cfg["lora_alpha"]
        rank_pattern, alpha_pattern = self.rank_pattern, self.alpha_pattern
        for key, e in self.file.entries.items():
            m = _KEY_RE.match(key)
            if m is None:
                if ".modules_to_save." in key or ".original_module." in key:
                    raise ConvertError(f"{self.file.path}: unexpected wrapped tensor {key}")
                hf = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
                # PEFT saves the base weight of LoRA-targeted embedding layers as `<module>.base_layer.weight`;
                # loading it copies into the (possibly tied) base weight, so it is an in-place override
                override = hf.endswith(".base_layer.weight")
                if override:
                    hf = hf[: -len(".base_layer.weight")] + ".weight"
                if not hf.endswith(".weight") or hf.rsplit(".", 2)[-2] not in ("lm_head", "embed_tokens"):
                    raise ConvertError(f"{self.file.path}: tensor {key} is neither a LoRA A/B matrix nor a "
                                       "supported modules_to_save weight")
                self._known_target(hf, key)
                (self.overrides if override else self.replacements)[hf] = e
                continue
            module, kind = m.group("module"), m.group("kind")
            hf = module + ".weight"
            self._known_target(hf, key)
            pair = self.pairs.setdefault(hf, _Pair(module))
            pair.embedding = kind.startswith("lora_embedding")
            if kind.endswith("A"):
                pair.a = e
            else:
                pair.b = e
        for hf, p in self.pairs.items():
            if p.a is None or p.b is None:
                raise ConvertError(f"{self.file.path}: {p.module} has lora_{'B' if p.a is None else 'A'} "
                                   "but not its partner")
            if len(p.a.shape) != 2 or len(p.b.shape) != 2:
                raise ConvertError(f"{self.file.path}: LoRA matrices of {p.module} must be 2-D")
            r = p.a.shape[0]
            if r < 1:
                raise ConvertError(f"{self.file.path}: LoRA matrices of {p.module} have rank 0")
            if p.b.shape[1] != r:
                raise ConvertError(f"{self.file.path}: {p.module}: lora_A has rank {r} but lora_B has "
                                   f"{p.b.shape[1]}")
            want_r = _pattern_value(rank_pattern, p.module, r0)
            if want_r != r:
                raise ConvertError(f"{self.file.path}: {p.module} has rank {r} but adapter_config.json says "
                                   f"{want_r}")
            alpha = _pattern_value(alpha_pattern, p.module, alpha0)
            scaling = alpha / math.sqrt(r) if self.use_rslora else alpha / r
            p.scale, p.alpha = self.user_scale * scaling, alpha
        if not self.pairs and not self.replacements and not self.overrides:
            raise ConvertError(f"{self.file.path}: the adapter holds no LoRA tensors")

    def _known_target(self, hf_weight: str, key: str) -> None:
        try:
            g = gguf_name(hf_weight, self.arch)
        except ConvertError:
            g = None
        if g is None or g.endswith("_norm.weight"):
            raise ConvertError(f"{self.file.path}: tensor {key} targets {hf_weight[:-7]!r}, which is not a "
                               f"weight matrix of a {self.arch} model")

    # -- validation against the base -----------------------------------------------------------------------
    def validate(self, base_shapes: dict[str, tuple[int, ...]], n_layer: int) -> None:
        """base_shapes: HF weight name -> shape for every base weight (tied lm_head included)."""
        for hf in list(self.pairs) + list(self.replacements) + list(self.overrides):
            if hf not in base_shapes:
                layer = re.match(r"model\.layers\.(\d+)\.", hf)
                if layer and int(layer.group(1)) >= n_layer:
                    raise ConvertError(f"{self.dir}: adapter has weights for layer {layer.group(1)} but the base "
                                       f"model has {n_layer} layers (adapter made for a different base model?)")
                raise ConvertError(f"{self.dir}: adapter targets {hf}, which the base model does not have")
            want = tuple(base_shapes[hf])
            if hf in self.replacements or hf in self.overrides:
                got = (self.replacements.get(hf) or self.overrides[hf]).shape
                if tuple(got) != want:
                    raise ConvertError(f"{self.dir}: modules_to_save weight {hf} has shape {list(got)}, base has "
                                       f"{list(want)} (adapter made for a different base model?)")
                continue
            p = self.pairs[hf]
            if p.embedding:   # A (r, num_embeddings), B (embedding_dim, r); delta = (B @ A)^T
                got = (p.a.shape[1], p.b.shape[0])
            else:             # A (r, in), B (out, r); delta = B @ A (transposed if fan_in_fan_out)
                got = (p.b.shape[0], p.a.shape[1])
                if got != want and self.fan_in_fan_out and got[::-1] == want:
                    got = want
            if got != want:
                raise ConvertError(f"{self.dir}: LoRA for {hf} gives a {list(got)} update but the base weight is "
                                   f"{list(want)} (adapter made for a different base model?)")

    # -- merging ---------------------------------------------------------------------------------------------
    def _load(self, e: TensorEntry) -> np.ndarray:
        v = self.file.view(e)
        return bf16_bits_to_f32(v) if e.dtype == "BF16" else v.astype(np.float32)

    def touches(self, hf_weight: str) -> bool:
        return hf_weight in self.pairs or hf_weight in self.replacements or hf_weight in self.overrides

    def replacement(self, hf_weight: str) -> np.ndarray | None:
        """The modules_to_save weight replacing this one (a new, separate tensor), if any."""
        e = self.replacements.get(hf_weight)
        return None if e is None else self._load(e)

    def apply_override(self, hf_weight: str, w: np.ndarray) -> None:
        """Copy a saved base_layer weight into w in place (so a tied partner sees it too)."""
        e = self.overrides.get(hf_weight)
        if e is not None:
            w[...] = self._load(e)

    def low_rank(self, hf_weight: str) -> tuple[np.ndarray, np.ndarray]:
        """(A, B) of one LoRA pair as float32, as PEFT stores them: A (r, in), B (out, r); for embeddings
        A (r, num_embeddings), B (embedding_dim, r). The pair's scaling is `self.pairs[hf_weight].scale`."""
        p = self.pairs[hf_weight]
        return self._load(p.a), self._load(p.b)

    def add_delta(self, hf_weight: str, w: np.ndarray) -> None:
        """w += scale * delta, in place (w float32, HF layout)."""
        p = self.pairs.get(hf_weight)
        if p is None:
            return
        a, b = self.low_rank(hf_weight)
        delta = b @ a
        if p.embedding or delta.shape != w.shape:   # embeddings, and fan_in_fan_out adapters
            delta = delta.T
        delta *= np.float32(p.scale)
        w += delta

    def close(self) -> None:
        self.file.close()
