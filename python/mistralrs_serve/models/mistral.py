"""Mistral and Ministral: the Llama network with sliding-window attention.

Mistral 7B v0.1 attends over a window of 4096 keys on every layer (later
Mistral releases set no window and run as plain Llama); Ministral names each
layer's kind in `layer_types`, mixing sliding-window and full layers.
Ministral 3's text decoder adds YaRN rotary and Llama 4's query scale for
positions past its original context.

GGUF: llama.cpp writes Mistral and Ministral as its "llama" architecture,
with no window in the metadata, and runs them with full attention; so do we
(models/llama.py). Ministral 3 is its "mistral3", YaRN and query scale kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mistralrs_serve.config import ModelConfig, RopeScaling
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.layers.attention import PLAIN, AttentionBackend, LayerAttention
from mistralrs_serve.layers.linear import AnyWeight
from mistralrs_serve.models.interface import KVPlaces
from mistralrs_serve.models.llama import LlamaForCausalLM
from mistralrs_serve.models.registry import Architecture

if TYPE_CHECKING:
    from mistralrs_serve.engine.media import StepMedia
    from mistralrs_serve.models.llama_native import NativeForward

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' MistralConfig/MinistralConfig window when config.json names none
DEFAULT_WINDOW = 4096


class MistralForCausalLM(LlamaForCausalLM):
    """Llama whose layers named sliding in `config.extra["layer_types"]` (all of
    them when it is absent) attend over the last `config.sliding_window` keys."""

    def layer_attention(self, idx: int) -> LayerAttention:
        window = self.config.sliding_window
        kinds: Sequence[str] | None = self.config.extra.get("layer_types")
        if window is None or (kinds is not None and kinds[idx] != SLIDING):
            return PLAIN
        return LayerAttention(window=window)


class Ministral3ForCausalLM(MistralForCausalLM):
    """Ministral 3: YaRN rotary (cos/sin times its attention factor) and, where
    `llama_4_scaling_beta` is set, queries scaled by 1 + beta * log(1 + floor(pos /
    original context)): 1 inside the original context, growing past it."""

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, AnyWeight], dtype: torch.dtype) -> None:
        super().__init__(cfg, weights, dtype)
        yarn: Mapping[str, Any] = cfg.extra["yarn"]
        inv_freq, attention_factor = yarn_frequencies(cfg.head_dim, cfg.rope_theta, yarn, cfg)
        angles = torch.outer(torch.arange(cfg.max_position_embeddings, dtype=torch.float64), inv_freq)
        self.rotary.cos = (angles.cos() * attention_factor).to(dtype)
        self.rotary.sin = (angles.sin() * attention_factor).to(dtype)
        self.query_beta = float(yarn.get("llama_4_scaling_beta") or 0.0)
        self.query_context = int(yarn["original_max_position_embeddings"])

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        logits_indices: torch.Tensor,
        int4_rows: torch.Tensor | None = None,
        media: StepMedia | None = None,
    ) -> torch.Tensor:
        if self.query_beta:
            scale = 1 + self.query_beta * torch.log1p(torch.floor(positions.float() / self.query_context))
            attn = _ScaledQueries(attn, scale.to(self.dtype).view(-1, 1, 1))  # (T, 1, 1)
        return super().forward(input_ids, positions, attn, logits_indices, int4_rows, media)

    def fused_forward(self, kv: np.ndarray | None, kv_layout: KVPlaces | None = None) -> NativeForward | None:
        # the fused forward takes the rotary tables but knows no query scale
        return None if self.query_beta else super().fused_forward(kv, kv_layout)


class _ScaledQueries:
    """An attention backend whose queries are first multiplied by a per-token scale."""

    def __init__(self, inner: AttentionBackend, scale: torch.Tensor) -> None:
        self.inner, self.scale = inner, scale

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, how: LayerAttention = PLAIN
    ) -> torch.Tensor:
        q = q * self.scale
        if how is PLAIN:
            return self.inner.attend(layer_idx, q, k, v)
        return self.inner.attend(layer_idx, q, k, v, how)


def yarn_frequencies(
    head_dim: int, theta: float, yarn: Mapping[str, Any], cfg: ModelConfig
) -> tuple[torch.Tensor, float]:
    """YaRN's inverse frequencies and attention factor, as transformers reads `rope_parameters`:
    frequencies that turn fewer than `beta_slow` times over the original context are divided by
    `factor`, those turning more than `beta_fast` times kept, a linear ramp between."""
    original = int(yarn["original_max_position_embeddings"])
    factor = float(yarn.get("factor") or cfg.max_position_embeddings / original)
    attention_factor = yarn.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor, 1.0)
    fast, slow = float(yarn.get("beta_fast") or 32), float(yarn.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if yarn.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp), float(attention_factor)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def check_layer_types(kinds: Any, num_layers: int) -> tuple[str, ...]:
    """config.json's `layer_types` as a tuple, or ModelLoadError naming what is wrong."""
    if not isinstance(kinds, list) or len(kinds) != num_layers or not set(kinds) <= {SLIDING, FULL}:
        raise ModelLoadError(
            f"layer_types must list {num_layers} entries, each {SLIDING!r} or {FULL!r}; got {kinds!r}"
        )
    return tuple(kinds)


def binding_window(window: Any, cfg: Mapping[str, Any]) -> int | None:
    """The window, or None where it covers every position the model takes (Ministral 8B:
    32768 of 32768), so that those layers stay plain (and the fused CPU forward applies)."""
    if not window:
        return None
    return int(window) if int(window) < int(cfg.get("max_position_embeddings", 4096)) else None


def _mistral_hf_extra(cfg: Mapping[str, Any]) -> dict[str, Any]:
    # transformers' Mistral windows every layer and ignores a `layer_types` entry
    return {"sliding_window": binding_window(cfg.get("sliding_window", DEFAULT_WINDOW), cfg)}


def _ministral_hf_extra(cfg: Mapping[str, Any]) -> dict[str, Any]:
    window = cfg.get("sliding_window", DEFAULT_WINDOW)
    kinds = cfg.get("layer_types")
    if kinds is None:
        kinds = [SLIDING if window is not None else FULL] * int(cfg["num_hidden_layers"])
    return {
        "sliding_window": binding_window(window, cfg),
        "extra": {"layer_types": check_layer_types(kinds, int(cfg["num_hidden_layers"]))},
    }


def _ministral3_hf_extra(cfg: Mapping[str, Any]) -> dict[str, Any]:
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type != "yarn":
        raise UnsupportedModelError(f"Ministral 3 with rope type {rope_type!r}: only yarn is supported")
    if "original_max_position_embeddings" not in rope:
        raise ModelLoadError("rope_parameters: yarn needs original_max_position_embeddings")
    # the YaRN tables are built by Ministral3ForCausalLM, over plain rotary
    return {
        "sliding_window": binding_window(cfg.get("sliding_window"), cfg),
        "rope_scaling": RopeScaling(),
        "extra": {"yarn": rope},
    }


def _ministral3_gguf_extra(get: Callable[[str, Any], Any], tensors: Collection[str]) -> dict[str, Any]:
    """llama.cpp's "mistral3" keys back into transformers' rope_parameters (its converter writes
    mscale_all_dim as the YaRN log multiplier and leaves mscale at 1)."""
    if get("rope.scaling.type", None) != "yarn":
        raise UnsupportedModelError("mistral3 GGUF without YaRN rope scaling is not supported")
    yarn = {
        "rope_type": "yarn",
        "factor": get("rope.scaling.factor", None),
        "original_max_position_embeddings": get("rope.scaling.original_context_length", None),
        "beta_fast": get("rope.scaling.yarn_beta_fast", None),
        "beta_slow": get("rope.scaling.yarn_beta_slow", None),
        "attention_factor": get("rope.scaling.yarn_attn_factor", None),
        "mscale": 1.0,
        "mscale_all_dim": get("rope.scaling.yarn_log_multiplier", None),
        "llama_4_scaling_beta": get("attention.temperature_scale", None),
    }
    if yarn["original_max_position_embeddings"] is None:
        raise ModelLoadError("mistral3 GGUF: rope.scaling.original_context_length is missing")
    return {"rope_scaling": RopeScaling(), "extra": {"yarn": yarn}}


MISTRAL = Architecture(
    name="mistral",
    hf_names=("MistralForCausalLM",),
    gguf_names=(),
    model=MistralForCausalLM,
    sliding_window=True,
    hf_extra=_mistral_hf_extra,
)

MINISTRAL = Architecture(
    name="ministral",
    hf_names=("MinistralForCausalLM",),
    gguf_names=(),
    model=MistralForCausalLM,
    sliding_window=True,
    hf_extra=_ministral_hf_extra,
)

MINISTRAL3 = Architecture(
    name="ministral3",
    hf_names=("Ministral3ForCausalLM",),
    gguf_names=("mistral3",),
    model=Ministral3ForCausalLM,
    # llama.cpp's converter reorders q/k rows from HF weights; Mistral's own
    # format already has that order, so "mistral3" files have it either way
    gguf_permuted_qk=True,
    sliding_window=True,
    hf_extra=_ministral3_hf_extra,
    gguf_extra=_ministral3_gguf_extra,
)
