"""Rotary position embeddings: cos/sin tables and their application (neox layout:
halves, not interleaved pairs)."""

from __future__ import annotations

import math

import torch

from mistralrs_serve.config import RopeScaling
from mistralrs_serve.errors import UnsupportedModelError


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise UnsupportedModelError(f"rope_scaling type {scaling.rope_type!r} is not supported")


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band
    # between interpolated smoothly (Llama 3.1's published recipe).
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, blended)
    return torch.where(wavelen < high_wavelen, inv_freq, out)


class RotaryTable:
    """cos/sin per position, computed once up to `max_positions`."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: RopeScaling,
        max_positions: int,
        dtype: torch.dtype,
        freq_factors: torch.Tensor | None = None,
    ) -> None:
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        if freq_factors is not None:
            # GGUF stores Llama 3.1 scaling as per-frequency divisors (rope_freqs.weight).
            inv_freq = inv_freq / freq_factors.double()
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        self.cos = angles.cos().to(dtype)  # (max_positions, head_dim // 2)
        self.sin = angles.sin().to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (T, 1, head_dim // 2): broadcasts over heads
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of the last dimension: x (T, heads, D), cos/sin (T, 1, D/2) from `lookup`.
    Torch on every device: cos/sin are looked up once per step and broadcast over heads."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
