"""SmolLM3: the Llama network where some layers skip rotary position embeddings.

config.json's `no_rope_layers` has one entry per layer, 1 where the layer
rotates q and k and 0 where it does not (by default every fourth layer
skips it). With `use_sliding_window`, the layers without rotary attend over a
window (transformers' default `layer_types`); the released models use none.

GGUF (llama.cpp's "smollm3"): the converter stores no per-layer list and
llama.cpp skips rotary on every fourth layer, as we do for such files; q/k
rows are permuted as for "llama".
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models.mistral import (
    FULL,
    SLIDING,
    MistralForCausalLM,
    binding_window,
    check_layer_types,
)
from mistralrs_serve.models.registry import Architecture

# llama.cpp's n_no_rope_layer_step for "smollm3", and transformers' default interval
NO_ROPE_INTERVAL = 4


class SmolLM3ForCausalLM(MistralForCausalLM):
    """Layers with 0 in `config.extra["no_rope_layers"]` leave q and k unrotated;
    windows as in MistralForCausalLM (none unless the config enables them)."""

    def layer_uses_rope(self, idx: int) -> bool:
        return bool(self.config.extra["no_rope_layers"][idx])


def every_fourth_without_rope(num_layers: int, interval: int = NO_ROPE_INTERVAL) -> tuple[int, ...]:
    return tuple(int((i + 1) % interval != 0) for i in range(num_layers))


def _hf_extra(cfg: Mapping[str, Any]) -> dict[str, Any]:
    num_layers = int(cfg["num_hidden_layers"])
    rope = cfg.get("no_rope_layers")
    if rope is None:
        rope = every_fourth_without_rope(num_layers, int(cfg.get("no_rope_layer_interval", NO_ROPE_INTERVAL)))
    if not isinstance(rope, (list, tuple)) or len(rope) != num_layers or not set(rope) <= {0, 1}:
        raise ModelLoadError(f"no_rope_layers must list {num_layers} entries of 0 or 1; got {rope!r}")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    kinds = cfg.get("layer_types")
    if kinds is None:
        kinds = [SLIDING if window and not r else FULL for r in rope]
    return {
        "sliding_window": binding_window(window, cfg),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "extra": {"no_rope_layers": tuple(rope), "layer_types": check_layer_types(kinds, num_layers)},
    }


def _gguf_extra(get: Callable[[str, Any], Any], tensors: Collection[str]) -> dict[str, Any]:
    return {"extra": {"no_rope_layers": every_fourth_without_rope(int(get("block_count", 0)))}}


SMOLLM3 = Architecture(
    name="smollm3",
    hf_names=("SmolLM3ForCausalLM",),
    gguf_names=("smollm3",),
    model=SmolLM3ForCausalLM,
    gguf_permuted_qk=True,
    sliding_window=True,
    hf_extra=_hf_extra,
    gguf_extra=_gguf_extra,
)
