"""RoPE angle tables: cos/sin per position and rotated dimension pair, ggml's rope formulas.

theta_i = pos * base^(-2i/n_rot) / factor_i, scaled by freq_scale (linear interpolation) or blended with the
unscaled angle per dimension (YaRN); cos/sin are multiplied by mscale (rope.scaling.attn_factor, times YaRN's
own correction). The factors come from rope_freqs.weight (Llama 3) or rope_factors_short/long (LongRoPE).
"""
from __future__ import annotations

import math

import numpy as np


class Rope:
    def __init__(self, n_rot: int, base: float, freq_scale: float = 1.0, factors: np.ndarray | None = None,
                 attn_factor: float = 1.0, yarn: tuple[float, float, float, int] | None = None):
        """yarn: (ext_factor, beta_fast, beta_slow, original context) for rope.scaling.type = yarn."""
        half = n_rot // 2
        inv = base ** (-2.0 * np.arange(half, dtype=np.float64) / n_rot)
        if factors is not None:
            inv = inv / factors.astype(np.float64)
        self._inv_freq = inv
        self._freq_scale = freq_scale
        self._mix = None
        self._mscale = attn_factor
        if yarn is not None:
            ext_factor, beta_fast, beta_slow, orig_ctx = yarn
            # ggml's rope_yarn: blend interpolated and extrapolated angles per dimension with a linear
            # ramp between the "correction dims", and scale cos/sin (hence q and k) by mscale.
            def corr_dim(n_rot_turns):
                return n_rot * math.log(orig_ctx / (n_rot_turns * 2 * math.pi)) / (2 * math.log(base))
            low = max(0.0, math.floor(corr_dim(beta_fast)))
            high = min(n_rot - 1.0, math.ceil(corr_dim(beta_slow)))
            y = (np.arange(half, dtype=np.float64) - low) / max(0.001, high - low)
            self._mix = (1.0 - np.clip(y, 0.0, 1.0)) * ext_factor
            if ext_factor != 0.0:
                self._mscale *= 1.0 + 0.1 * math.log(1.0 / freq_scale)

    def tables(self, pos0: int, T: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 cos, sin [T, n_rot/2] for positions pos0 .. pos0+T-1."""
        return self.tables_at(np.arange(pos0, pos0 + T))

    def tables_at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 cos, sin [len(positions), n_rot/2], row i for position positions[i]."""
        pos = np.asarray(positions, dtype=np.float64)[:, None]
        extrap = pos * self._inv_freq[None, :]
        interp = extrap * self._freq_scale
        theta = interp if self._mix is None else interp * (1 - self._mix) + extrap * self._mix
        c = (np.cos(theta) * self._mscale).astype(np.float32)
        s = (np.sin(theta) * self._mscale).astype(np.float32)
        return c, s
