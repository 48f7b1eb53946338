"""Gemma 2 and Gemma 3 settings beyond the common config: which layers slide,
the attention scale and soft-caps, the local layers' RoPE, and how llama.cpp's
converter changed the weights. Read from config.json (transformers 4.x and 5.x
keys) and from GGUF metadata; the results go to `ModelConfig.extra`:

- sliding_layers: one bool per layer (True: the layer attends inside the window)
- attn_scale: the score scale (query_pre_attn_scalar ** -0.5)
- attn_softcap / final_softcap: tanh caps of attention scores / logits, or None
- local_rope_theta / local_rope_scaling: the sliding layers' RoPE (the global
  layers take ModelConfig.rope_theta / rope_scaling)
- gelu_approximate: "tanh" (every released Gemma) or "none"
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

from mistralrs_serve.config import ModelConfig, RopeScaling
from mistralrs_serve.errors import UnsupportedModelError
from mistralrs_serve.layers.linear import AnyWeight

SLIDING, FULL = "sliding_attention", "full_attention"
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}
# transformers' defaults where a config.json leaves a key out
_GEMMA2_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
_DEFAULT_WINDOW = 4096
_DEFAULT_QUERY_SCALAR = 256
# llama.cpp's fixed layer patterns: layer i slides unless i % n == n - 1
GEMMA2_PATTERN, GEMMA3_PATTERN = 2, 6
# llama.cpp runs Gemma 3's sliding layers at this RoPE base whatever the file says
GGUF_GEMMA3_LOCAL_THETA = 10_000.0


def sliding_by_pattern(num_layers: int, pattern: int) -> tuple[bool, ...]:
    """Every `pattern`-th layer (the last of each group) is global, the others slide."""
    return tuple(i % pattern != pattern - 1 for i in range(num_layers))


def _layer_kinds(cfg: Mapping[str, Any], pattern: int) -> tuple[bool, ...]:
    num_layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:
        return sliding_by_pattern(num_layers, pattern)
    if len(types) != num_layers or not set(types) <= {SLIDING, FULL}:
        raise UnsupportedModelError(
            f"layer_types must name {num_layers} layers, each {SLIDING!r} or {FULL!r}; got {types!r}"
        )
    return tuple(t == SLIDING for t in types)


def _gelu(cfg: Mapping[str, Any]) -> str:
    name = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if name not in _GELU:
        raise UnsupportedModelError(
            f"hidden_activation={name!r} is not supported (supported: {', '.join(sorted(_GELU))})"
        )
    return _GELU[name]


def _optional_float(value: Any) -> float | None:
    return None if value is None or float(value) == 0.0 else float(value)


def _hf_common(cfg: Mapping[str, Any], pattern: int) -> dict[str, Any]:
    if cfg.get("use_bidirectional_attention"):
        raise UnsupportedModelError("use_bidirectional_attention=true (an embedding model) is not supported")
    window = cfg.get("sliding_window", _DEFAULT_WINDOW)
    return {
        "sliding_window": int(window) if window else None,
        # transformers' Gemma configs tie the head to the embedding unless told otherwise
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
        "extra": {
            "sliding_layers": _layer_kinds(cfg, pattern),
            "attn_scale": float(cfg.get("query_pre_attn_scalar", _DEFAULT_QUERY_SCALAR)) ** -0.5,
            "gelu_approximate": _gelu(cfg),
        },
    }


def gemma2_hf_extra(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 2: layers alternate sliding/global; scores and logits are soft-capped; one RoPE."""
    out = _hf_common(cfg, GEMMA2_PATTERN)
    caps = {k: _optional_float(cfg.get(k, v)) for k, v in _GEMMA2_DEFAULTS.items()}
    out["extra"] |= {
        "attn_softcap": caps["attn_logit_softcapping"],
        "final_softcap": caps["final_logit_softcapping"],
        "local_rope_theta": None,  # the global RoPE
        "local_rope_scaling": None,
    }
    return out


def _gemma3_rope(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, local) rope parameters: transformers 5 nests them by layer type;
    4.x configs give rope_theta, rope_local_base_freq and rope_scaling (global only)."""
    params = cfg.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:
        full, local = dict(params.get(FULL) or {}), dict(params.get(SLIDING) or {})
    else:
        full, local = dict(params or cfg.get("rope_scaling") or {}), {}
    full.setdefault("rope_theta", cfg.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", cfg.get("rope_local_base_freq", 10_000.0))
    return full, local


def gemma3_hf_extra(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Gemma 3: five sliding layers to a global one (or config.json's layer_types), q/k norms,
    separate RoPE bases, no attention soft-cap (transformers ignores attn_logit_softcapping)."""
    out = _hf_common(cfg, int(cfg.get("sliding_window_pattern") or GEMMA3_PATTERN))
    full, local = _gemma3_rope(cfg)
    out["rope_theta"] = float(full["rope_theta"])
    out["rope_scaling"] = RopeScaling.from_dict(full)
    out["extra"] |= {
        "attn_softcap": None,
        "final_softcap": _optional_float(cfg.get("final_logit_softcapping")),
        "local_rope_theta": float(local["rope_theta"]),
        "local_rope_scaling": RopeScaling.from_dict(local),
    }
    return out


def _gguf_scale(get: Callable[[str, Any], Any], big_layer_count: int) -> float:
    # llama.cpp's rule (GGUF has no query_pre_attn_scalar): 1/sqrt(head_dim), except the 27B
    # models (recognised by their layer count), which scale by 1/sqrt(hidden / heads)
    hidden, heads = int(get("embedding_length", 0)), int(get("attention.head_count", 1))
    if int(get("block_count", 0)) == big_layer_count:
        return float(hidden // heads) ** -0.5
    return float(get("attention.key_length", hidden // heads)) ** -0.5


def gemma2_gguf_extra(get: Callable[[str, Any], Any], tensors: Collection[str]) -> dict[str, Any]:
    num_layers = int(get("block_count", 0))
    return {
        "sliding_window": int(get("attention.sliding_window", _DEFAULT_WINDOW)),
        "extra": {
            "sliding_layers": sliding_by_pattern(num_layers, GEMMA2_PATTERN),
            "attn_scale": _gguf_scale(get, 46),
            "attn_softcap": _optional_float(get("attn_logit_softcapping", 50.0)),
            "final_softcap": _optional_float(get("final_logit_softcapping", 30.0)),
            "local_rope_theta": None,
            "local_rope_scaling": None,
            "gelu_approximate": "tanh",
        },
    }


def gemma3_gguf_extra(get: Callable[[str, Any], Any], tensors: Collection[str]) -> dict[str, Any]:
    num_layers = int(get("block_count", 0))
    window = get("attention.sliding_window", None)
    # llama.cpp: no window key (or 0) means every layer is global
    sliding = sliding_by_pattern(num_layers, GEMMA3_PATTERN) if window else (False,) * num_layers
    return {
        "sliding_window": int(window) if window else None,
        "extra": {
            "sliding_layers": sliding,
            "attn_scale": _gguf_scale(get, 62),
            "attn_softcap": None,
            "final_softcap": _optional_float(get("final_logit_softcapping", None)),
            "local_rope_theta": GGUF_GEMMA3_LOCAL_THETA,
            "local_rope_scaling": RopeScaling(),
            "gelu_approximate": "tanh",
        },
    }


def gguf_fixup(hf_name: str, weight: AnyWeight, cfg: ModelConfig) -> AnyWeight:
    """llama.cpp's converter stores every Gemma RMSNorm weight (layer norms, q/k norms, the
    final norm) as 1 + weight; the model adds the 1 itself, as transformers does."""
    if hf_name.endswith("norm.weight") and isinstance(weight, torch.Tensor):
        return weight.float() - 1.0  # kept fp32: the model adds 1 back in fp32
    return weight


GGUF_LAYER_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
