"""The LoRA adapters a server serves (llama.cpp's server API; docs/server.md, "One base, many adapters").

Every `--lora PATH[:SCALE][@ALIAS]` adapter is loaded and checked against the model at start and gets an id
(its position). A request's adapter configuration is one scale per id (`Config`):
* `"lora": [{"id": i, "scale": s}, ...]` in the body chooses it for that request (ids not listed: 0);
* else a `model` naming an alias is that adapter alone, at its SCALE;
* else the global scales, which `POST /lora-adapters` sets (same list shape) and `GET /lora-adapters` shows.
  At start they are each adapter's SCALE, except for aliased adapters: those start at 0 (they are meant to
  be chosen by name, not mixed into every other request).

The scheduler steps together only the slots of one configuration, installing its side paths
(engine/adapters.py) before the batched forward; side paths are built once per configuration and kept.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
import threading
from typing import Any

from ..errors import LlmrunError
from .errors import RequestError

ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_SCALE = 100.0       # |scale| above this only overflows the logits
KEPT_CONFIGS = 16       # side paths kept for this many configurations (each is about the adapters' size)

Config = tuple  # one float per adapter id; all zeros: the base model


def parse_lora_option(arg: str) -> tuple[str, float, str | None]:
    """`PATH[:SCALE][@ALIAS]` -> (PATH, SCALE, ALIAS or None). An '@' is the alias only when what follows is
    a valid alias name (letters, digits, '.', '_', '-'), so a path holding '@' elsewhere stays whole."""
    from ..convert.lora import parse_lora_arg
    head, sep, tail = arg.rpartition("@")
    alias = None
    if sep and head and ALIAS.match(tail):
        arg, alias = head, tail
    elif sep and head and not tail:
        raise LlmrunError(f"--lora {arg}: empty alias after '@'")
    path, scale = parse_lora_arg(arg)
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise LlmrunError(f"--lora {arg}: the scale must be a number from -{MAX_SCALE:g} to {MAX_SCALE:g}")
    return path, scale, alias


@dataclasses.dataclass(frozen=True)
class ServedAdapter:
    id: int
    path: str
    scale: float              # SCALE from the command line (what its alias applies)
    alias: str | None


class AdapterTable:
    """The served adapters, the global scales, and the side paths per configuration for one model."""

    def __init__(self, model, specs, base_name: str):
        from ..engine import adapters as lora
        self._lora = lora
        self.model = model
        self.adapters = [ServedAdapter(i, str(p), float(s), a) for i, (p, s, a) in enumerate(specs)]
        names = [base_name]
        for a in self.adapters:
            if a.alias is not None:
                if a.alias in names:
                    raise LlmrunError(f"--lora alias {a.alias!r} is used twice (or is the model's name)")
                names.append(a.alias)
        if self.adapters and not hasattr(model, "matrix_groups"):
            raise LlmrunError("this model takes no LoRA adapters")
        cache = lora.AdapterCache()
        self.base_name = base_name
        self._loaded = [cache.get(a.path, model) for a in self.adapters]   # checks each against the model
        self._global: Config = tuple(0.0 if a.alias else a.scale for a in self.adapters)
        self._paths: collections.OrderedDict = collections.OrderedDict()
        self._installed: Config | None = None
        self._lock = threading.Lock()

    # ---- what requests ask for --------------------------------------------------------------------------
    @property
    def aliases(self) -> dict[str, ServedAdapter]:
        return {a.alias: a for a in self.adapters if a.alias is not None}

    def global_config(self) -> Config:
        with self._lock:
            return self._global

    def alias_config(self, alias: str) -> Config:
        chosen = self.aliases[alias]
        return tuple(chosen.scale if a.id == chosen.id else 0.0 for a in self.adapters)

    def parse(self, value: Any, param: str = "lora") -> Config:
        """`[{"id": i, "scale": s}, ...]` -> a configuration (ids not listed: scale 0), or a 400 naming `param`."""
        n = len(self.adapters)
        if not isinstance(value, list):
            raise RequestError(f"'{param}' must be an array of {{\"id\": ..., \"scale\": ...}} objects", param=param)
        scales = [0.0] * n
        seen = set()
        for k, item in enumerate(value):
            where = f"{param}[{k}]"
            if not isinstance(item, dict) or set(item) - {"id", "scale"} or "id" not in item:
                raise RequestError(f"'{where}' must be an object with an 'id' and a 'scale'", param=param)
            i, s = item["id"], item.get("scale", 0.0)
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                what = f"an adapter id from 0 to {n - 1}" if n else "an adapter id, but no adapters are loaded " \
                                                                    "(start the server with --lora)"
                raise RequestError(f"'{where}.id' must be {what}", param=param, code="invalid_lora_id")
            if i in seen:
                raise RequestError(f"'{where}.id': adapter {i} is listed twice", param=param)
            seen.add(i)
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or abs(s) > MAX_SCALE:
                raise RequestError(f"'{where}.scale' must be a number from -{MAX_SCALE:g} to {MAX_SCALE:g}",
                                   param=param)
            scales[i] = float(s) + 0.0   # -0.0 and 0.0: one configuration
        return tuple(scales)

    def for_request(self, lora: Any, model: str | None) -> tuple[Config, str]:
        """A request's configuration and the model name its results carry, from its `lora` field and its
        `model` (an alias, the base's name, or anything when no adapter has an alias: names are then not
        checked, as before adapters). An unknown name where aliases exist is a 404."""
        aliases = self.aliases
        if model is not None and not isinstance(model, str):
            raise RequestError("'model' must be a string", param="model")
        if model is not None and model not in aliases and model.endswith(":latest"):
            model = model.removesuffix(":latest")     # Ollama's default tag
        if aliases and model is not None and model not in aliases and model != self.base_name:
            names = ", ".join([self.base_name, *aliases])
            raise RequestError(f"the model '{model[:100]}' does not exist (this server has {names})", 404,
                               param="model", code="model_not_found")
        name = model if model in aliases else self.base_name
        if lora is not None:
            return self.parse(lora), name
        if model in aliases:
            return self.alias_config(model), name
        return self.global_config(), name

    def set_global(self, config: Config) -> None:
        with self._lock:
            self._global = config

    def listing(self) -> list[dict]:
        """GET /lora-adapters: llama.cpp's fields, and the alias where there is one."""
        config = self.global_config()
        out = []
        for a in self.adapters:
            entry = {"id": a.id, "path": a.path, "scale": config[a.id]}
            if a.alias is not None:
                entry["alias"] = a.alias
            out.append(entry)
        return out

    # ---- the scheduler's side (its thread only) -------------------------------------------------------------
    def install(self, config: Config | None) -> None:
        """Put `config`'s side paths beside the model's products (None: leave what is there)."""
        if config is None or config == self._installed:
            return
        paths = self._paths.get(config)
        if paths is None:
            active = [(ad, s) for ad, s in zip(self._loaded, config) if s != 0.0]
            paths = self._lora.build_side_paths(self.model, active)
            self._paths[config] = paths
            while len(self._paths) > KEPT_CONFIGS:
                self._paths.popitem(last=False)
        else:
            self._paths.move_to_end(config)
        self._lora.install(self.model, paths)
        self._installed = config
