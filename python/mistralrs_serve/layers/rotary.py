"""Rotary position embeddings: cos/sin tables and their application (neox layout:
halves, not interleaved pairs), over the whole head or its first part (partial
rotary), with Llama 3's and Phi-3's LongRoPE frequency scaling."""

from __future__ import annotations

import math

import torch

from mistralrs_serve.config import RopeScaling
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError


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


def longrope_frequencies(
    rotary_dim: int, theta: float, s: RopeScaling, max_positions: int
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3, Phi-4-mini): (inverse frequencies, the factor cos and sin are multiplied by).

    Each frequency is divided by its entry of `short_factor` or of `long_factor`. transformers picks
    the set per forward call by the call's last position (long once it passes
    `original_max_position_embeddings`; its generate then recomputes the whole cache). Our table is
    per position and the KV cache keeps keys rotated, so one set serves every position, chosen by the
    context the model is built for (`max_positions`): long when it passes the original context, short
    otherwise (as vLLM and llama.cpp choose), so keys of both sets never meet in one sequence. Logits
    equal transformers' for every sequence on the same side of the original context as `max_positions`.

    The multiplier applies to both sets: `attention_factor`, else sqrt(1 + ln(factor) / ln(original
    context)) for a `factor` above 1, else 1 (transformers' rule; the family fills `factor` with
    max_positions / original context where config.json has none).
    """
    original = s.original_max_position_embeddings
    use_long = max_positions > original
    factors = s.long_factor if use_long else s.short_factor
    if len(factors) != rotary_dim // 2:
        which = "long_factor" if use_long else "short_factor"
        raise ModelLoadError(
            f"rope_scaling {which} has {len(factors)} entries; a rotary dimension of {rotary_dim} "
            f"needs {rotary_dim // 2}"
        )
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float64) * theta**exponents)
    if s.attention_factor is not None:
        return inv_freq, s.attention_factor
    if s.factor <= 1.0:
        return inv_freq, 1.0
    return inv_freq, math.sqrt(1 + math.log(s.factor) / math.log(original))


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
        if scaling.rope_type == "longrope":
            inv_freq, multiplier = longrope_frequencies(head_dim, theta, scaling, max_positions)
        else:
            inv_freq, multiplier = inverse_frequencies(head_dim, theta, scaling), 1.0
        if freq_factors is not None:
            # GGUF stores Llama 3.1 scaling as per-frequency divisors (rope_freqs.weight).
            inv_freq = inv_freq / freq_factors.double()
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
        cos, sin = angles.cos(), angles.sin()
        if multiplier != 1.0:
            cos, sin = cos * multiplier, sin * multiplier
        self.cos = cos.to(dtype)  # (max_positions, head_dim // 2)
        self.sin = sin.to(dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (T, 1, head_dim // 2): broadcasts over heads
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def lookup_multimodal(
        self, positions: torch.Tensor, sections: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Qwen2-VL's multimodal rotary: positions (3, T) temporal, row and column; the
        frequencies of the i-th section of `sections` turn by positions[i % 3]. The
        (T, 1, head_dim // 2) tables `lookup` gives; equal to it where the three agree."""
        bounds = [0, *torch.tensor(sections).cumsum(0).tolist()]
        cos, sin = self.cos[positions], self.sin[positions]  # (3, T, head_dim // 2)

        def by_section(t: torch.Tensor) -> torch.Tensor:
            parts = [t[i % 3, :, bounds[i] : bounds[i + 1]] for i in range(len(sections))]
            return torch.cat(parts, dim=-1).unsqueeze(1)

        return by_section(cos), by_section(sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of the last dimension: x (T, heads, D), cos/sin (T, 1, D/2) from `lookup`.
    Torch on every device: cos/sin are looked up once per step and broadcast over heads."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial rotary (Phi-4-mini rotates 3/4 of each head): the first 2 * cos.shape[-1] features of
    x (T, heads, D) rotated as `apply_rotary` does (halves of that part), the rest passed through."""
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
