"""Mistral and Ministral: the Llama network with sliding-window attention.

Mistral 7B v0.1 attends over a window of 4096 keys on every layer (later
Mistral releases set no window and run as plain Llama); Ministral names each
layer's kind in `layer_types`, mixing sliding-window and full layers.

GGUF: llama.cpp writes both as its "llama" architecture, with no window in
the metadata, and runs them with full attention; so do we (models/llama.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.layers.attention import PLAIN, LayerAttention
from mistralrs_serve.models.llama import LlamaForCausalLM
from mistralrs_serve.models.registry import Architecture

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
