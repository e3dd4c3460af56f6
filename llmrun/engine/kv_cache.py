"""Per-layer KV cache: the whole context for global layers, a ring buffer for sliding-window layers. K and V
are each stored in their own type, f32, f16 (the default) or q8_0 (kernels/kv_formats.py).

A position p lives in slot p % capacity. A global layer's capacity is n_ctx, so nothing ever wraps. A
sliding-window layer (window W) only ever reads the last W positions, so it keeps RING_BATCH - 1 more
than that: a forward of up to RING_BATCH tokens writes all its keys before attending, and the oldest
key its first query needs must survive those writes (model.py splits longer forwards). Long contexts then
cost memory only on the global layers.

Prefix reuse: after `truncate(n)` the next forward starts at position n and needs positions
n-W+1 .. n-1 of every ring. A ring that has overwritten them cannot restart there (`can_restart_at`);
the model then starts over from 0 and says so, and the caller re-evaluates the prefix.
"""
from __future__ import annotations

from ..kernels import kv_formats

RING_BATCH = 256   # tokens per forward pass on a model with ring buffers


def layer_capacity(n_ctx: int, window: int = 0) -> int:
    """Slots a layer's cache needs: the whole context, or the ring of a sliding-window layer."""
    return n_ctx if window <= 0 else min(n_ctx, window + RING_BATCH - 1)


def new_k(lead: tuple, n_head_kv: int, k_dim: int, capacity: int, kind: str):
    """An empty K cache [*lead, n_head_kv, ceil(capacity / KB), k_dim, KB] (transposed in blocks of KB positions:
    kernels/kv_formats.py)."""
    return kv_formats.empty_cache(kv_formats.k_shape(lead, n_head_kv, k_dim, capacity), kind, blocks_axis=-2)


def new_v(lead: tuple, n_head_kv: int, v_dim: int, capacity: int, kind: str):
    """An empty V cache [*lead, n_head_kv, capacity, v_dim]."""
    return kv_formats.empty_cache(lead + (n_head_kv, capacity, v_dim), kind, blocks_axis=-1)


class LayerCache:
    def __init__(self, n_head_kv: int, k_dim: int, v_dim: int, n_ctx: int, window: int = 0,
                 arrays: tuple | None = None, types: tuple[str, str] = ("f32", "f32")):
        self.window = int(window)
        capacity = layer_capacity(n_ctx, window)
        self.ring = capacity < n_ctx
        if arrays is None:
            arrays = (new_k((), n_head_kv, k_dim, capacity, types[0]), new_v((), n_head_kv, v_dim, capacity, types[1]))
        self.k, self.v = arrays   # each an array or a pair (codes, scales): kv_formats.py
        self.valid_from = 0   # oldest position whose slot still holds it

    @property
    def capacity(self) -> int:
        return kv_formats.capacity(self.v)

    @property
    def max_batch(self) -> int | None:
        """Most tokens one forward may write (None: no limit) so that no query loses a key it needs."""
        return self.capacity - self.window + 1 if self.ring else None

    @property
    def nbytes(self) -> int:
        return kv_formats.nbytes(self.k) + kv_formats.nbytes(self.v)

    def wrote(self, end: int) -> None:
        """Positions up to `end` (exclusive) were written: older slots may now hold newer positions."""
        self.valid_from = max(self.valid_from, end - self.capacity)

    def can_restart_at(self, n: int) -> bool:
        """Whether a forward may start at position n (everything it will read is still here)."""
        if n == 0 or not self.ring:
            return True
        return max(0, n - self.window + 1) >= self.valid_from

    def reset(self) -> None:
        self.valid_from = 0


class KVCache:
    """One sequence's caches, one LayerCache per layer, and how many positions they hold. A model's own (what
    forward() extends) is made of its layers' caches; LlamaModel.new_cache() / new_caches(n) make more for
    forward_batch. Caches made together by new_caches are slices of one array per layer (`pool`), so the
    decode attention of all of them is one kernel launch."""

    def __init__(self, layers: list[LayerCache], pool: tuple | None = None, slot: int = 0):
        self.layers = layers
        self.n_past = 0
        self.pool = pool      # (K arrays, V arrays), one [n_slots, ...] array per layer; None: on its own
        self.slot = slot      # this cache's index in the pool

    def kept_prefix(self, n: int) -> int:
        """How many of the first n cached positions a forward can continue from: n, or 0 when a sliding-window
        ring no longer holds what position n needs (nothing changes; truncate does the same check)."""
        return n if 0 <= n <= self.n_past and all(L.can_restart_at(n) for L in self.layers) else 0

    def truncate(self, n: int) -> int:
        """Keep the first n positions (later ones are overwritten by the next forward); returns how many are
        kept: n, or 0 when a ring no longer holds what position n needs (the cache then starts over)."""
        from ..errors import ModelError
        if not 0 <= n <= self.n_past:
            raise ModelError(f"cannot truncate the cache to {n} tokens: it holds {self.n_past}")
        n = self.kept_prefix(n)
        if n == 0:
            for L in self.layers:
                L.reset()
        self.n_past = int(n)
        return self.n_past

    def reset(self) -> None:
        self.truncate(0)

    @property
    def nbytes(self) -> int:
        return sum(L.nbytes for L in self.layers)
