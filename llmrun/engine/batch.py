"""Several sequences over one model: `SlotCaches` gives a LlamaModel the BatchModel shape (protocols.py).

Each slot is a KVCache of its own; the weights are shared. A step of all slots is ONE
LlamaModel.forward_batch: the decode tokens of every slot go through the weights in one pass (continuous
batching), prompt chunks beside them.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import ModelError
from ..protocols import BatchItem
from .model import LlamaModel


class SlotCaches:
    def __init__(self, model: LlamaModel, n_slots: int):
        if int(n_slots) < 1:
            raise ModelError(f"the number of slots must be at least 1, got {n_slots}")
        self.model = model
        self.n_slots = int(n_slots)
        self.n_ctx = int(model.n_ctx)
        self.caches = model.new_caches(self.n_slots)

    @property
    def kv_nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def kept_prefix(self, slot: int, n: int) -> int:
        """How much of slot's first n positions a forward can continue from (generate.py asks before reusing a
        prefix: a sliding-window ring may have overwritten what position n needs)."""
        return self.caches[slot].kept_prefix(n)

    def forward_batch(self, batch: Sequence[BatchItem]) -> list[np.ndarray]:
        caches, tokens = [], []
        for item in batch:
            if not 0 <= item.slot < self.n_slots:
                raise ModelError(f"no KV-cache slot {item.slot} (there are {self.n_slots})")
            cache = self.caches[item.slot]
            if item.pos > cache.n_past:
                raise ModelError(f"slot {item.slot} holds {cache.n_past} positions, cannot continue at {item.pos}")
            if item.pos < cache.n_past and cache.truncate(item.pos) != item.pos:
                raise ModelError(f"slot {item.slot} cannot continue at position {item.pos} (its sliding-window "
                                 f"cache no longer holds what that position needs)")
            caches.append(cache)
            tokens.append(item.tokens)
        return list(self.model.forward_batch(caches, tokens))
