"""Phi-3, Phi-3.5 and Phi-4-mini (transformers' Phi3ForCausalLM, llama.cpp's "phi3").

The Llama network with q/k/v and gate/up stored fused (`qkv_proj`, `gate_up_proj`; our
Llama layers fuse them anyway, so the weights go in as they are, 4-bit ones included),
rotary over the first part of each head where `partial_rotary_factor` is below 1
(Phi-4-mini: 0.75), LongRoPE scaling (layers/rotary.py says which factor set serves
when), and, as transformers 5 runs Phi3, the `sliding_window` of config.json on every
layer (Phi-3-mini-4k: 2047; a window at least the context long changes nothing and runs
as plain attention).

GGUF, as llama.cpp's converter writes "phi3": `blk.N.attn_qkv`, `blk.N.ffn_up` holding
gate then up, the LongRoPE divisors as the tensors `rope_factors_long`/`rope_factors_short`
with the cos/sin multiplier in `phi3.rope.scaling.attn_factor`, the rotated width in
`phi3.rope.dimension_count`, the window in `phi3.attention.sliding_window` (0: none).
llama.cpp itself runs phi3 without that window; we keep transformers' behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from mistralrs_serve.config import ModelConfig, RopeScaling
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.layers.activation import SiluAndMul
from mistralrs_serve.layers.attention import PLAIN, AttentionBackend, LayerAttention
from mistralrs_serve.layers.linear import AnyWeight, Linear, concat_weights
from mistralrs_serve.layers.norm import RMSNorm
from mistralrs_serve.layers.rotary import RotaryTable, apply_partial_rotary
from mistralrs_serve.models.interface import KVPlaces
from mistralrs_serve.models.llama import DecoderLayer, LlamaForCausalLM, _dense
from mistralrs_serve.models.registry import Architecture

# fused HF module -> the unfused ones llama.cpp may write instead (its loader accepts both)
_FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


class Phi3DecoderLayer(DecoderLayer):
    """Pre-norm attention and SwiGLU MLP; rotary on the first `2 * cos.shape[-1]` features."""

    def __init__(
        self, cfg: ModelConfig, idx: int, w: Mapping[str, AnyWeight], dtype: torch.dtype, how: LayerAttention
    ) -> None:
        p = f"model.layers.{idx}."
        self.idx, self.how, self.use_rope = idx, how, True
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        self.input_norm = RMSNorm(_dense(w[p + "input_layernorm.weight"], dtype), eps)
        self.post_norm = RMSNorm(_dense(w[p + "post_attention_layernorm.weight"], dtype), eps)
        self.q_norm = self.k_norm = None
        self.qkv = Linear(_fused_weight(w, p, "self_attn.qkv_proj"), None, dtype)
        self.o = Linear(w[p + "self_attn.o_proj.weight"], None, dtype)
        self.gate_up = Linear(_fused_weight(w, p, "mlp.gate_up_proj"), None, dtype)
        self.act = SiluAndMul()
        self.down = Linear(w[p + "mlp.down_proj.weight"], None, dtype)

    def _attention(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        int4_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        h, kv = self.num_heads, self.num_kv_heads
        qkv = self.qkv(x, int4_rows).view(num_tokens, h + 2 * kv, self.head_dim)
        q, k, v = qkv.split([h, kv, kv], dim=1)  # (T, heads, D) each
        q, k = apply_partial_rotary(q, cos, sin), apply_partial_rotary(k, cos, sin)
        # `how` only where it differs (as models/llama.py passes it)
        out = (
            attn.attend(self.idx, q, k, v) if self.how is PLAIN else attn.attend(self.idx, q, k, v, self.how)
        )
        return self.o(out, int4_rows)


class Phi3ForCausalLM(LlamaForCausalLM):
    """Token ids and positions in, logits of the selected rows out (forward and the rest: Llama's)."""

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, AnyWeight], dtype: torch.dtype) -> None:
        missing = missing_weights(cfg, weights)
        if missing:
            raise ModelLoadError(f"weights are missing {len(missing)} tensors, e.g. {missing[:3]}")
        self.config, self.dtype = cfg, dtype
        self.device = torch.device("cpu")
        self.embed = weights["model.embed_tokens.weight"]
        how = layer_attention(cfg)
        self.layers: list[DecoderLayer] = [
            Phi3DecoderLayer(cfg, i, weights, dtype, how) for i in range(cfg.num_layers)
        ]
        self.norm = RMSNorm(_dense(weights["model.norm.weight"], dtype), cfg.rms_norm_eps)
        head = weights["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        self.lm_head = Linear(head, None, dtype)
        self.rotary = RotaryTable(
            rotary_dim(cfg),
            cfg.rope_theta,
            _with_gguf_factors(cfg.rope_scaling, weights),
            cfg.max_position_embeddings,
            dtype,
        )

    def fused_forward(self, kv: np.ndarray | None, kv_layout: KVPlaces | None = None) -> None:
        """None: the fused Rust step knows neither partial rotary nor LongRoPE's multiplier."""
        return None


def rotary_dim(cfg: ModelConfig) -> int:
    """How many features of each head rotate (transformers: int(head_dim * partial_rotary_factor))."""
    dim = int(cfg.extra.get("rotary_dim", cfg.head_dim))
    if dim <= 0 or dim % 2 or dim > cfg.head_dim:
        raise UnsupportedModelError(
            f"partial rotary over {dim} of {cfg.head_dim} features per head: "
            "an even count from 2 to head_dim is supported"
        )
    return dim


def layer_attention(cfg: ModelConfig) -> LayerAttention:
    """Every layer's: the window where one is set (config_from_hf drops one that covers the context)."""
    return PLAIN if cfg.sliding_window is None else LayerAttention(window=cfg.sliding_window)


def missing_weights(cfg: ModelConfig, weights: Mapping[str, AnyWeight]) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + n + ".weight" for n in ("input_layernorm", "post_attention_layernorm")]
        names += [p + "self_attn.o_proj.weight", p + "mlp.down_proj.weight"]
        for fused, parts in _FUSED.items():
            if p + fused + ".weight" not in weights:
                module = fused.split(".")[0]
                names += [f"{p}{module}.{part}.weight" for part in parts]
    return [n for n in names if n not in weights]


def _fused_weight(w: Mapping[str, AnyWeight], prefix: str, fused: str) -> AnyWeight:
    """The fused matrix, or its parts stacked in the same order (q, k, v; gate, up)."""
    if prefix + fused + ".weight" in w:
        return w[prefix + fused + ".weight"]
    module = fused.split(".")[0]
    return concat_weights([w[f"{prefix}{module}.{part}.weight"] for part in _FUSED[fused]])


def _with_gguf_factors(scaling: RopeScaling, weights: Mapping[str, AnyWeight]) -> RopeScaling:
    """A GGUF file carries the LongRoPE divisors as tensors rather than in its metadata."""
    tables = [weights.get(f"rope_factors_{which}") for which in ("short", "long")]
    if scaling.rope_type != "longrope" or any(t is None for t in tables):
        return scaling
    short, long = (tuple(_dense(t, torch.float64).tolist()) for t in tables if t is not None)
    return replace(scaling, short_factor=short, long_factor=long)


def _hf_extra(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Partial rotary, LongRoPE as transformers reads it, and the window."""
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    # rope_parameters' value first, then config.json's top level (transformers' order)
    partial = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    out: dict[str, Any] = {"extra": {"rotary_dim": int(head_dim * partial)}}
    if rope_type in ("su", "yarn", "longrope"):  # transformers reads Phi3's older names as longrope
        # Phi3Config's own field (default 4096) overrides any value inside rope_scaling
        original = int(cfg.get("original_max_position_embeddings", 4096))
        for key in ("short_factor", "long_factor"):
            if not isinstance(rope.get(key), list):
                raise ModelLoadError(f"rope_scaling of type {rope_type!r} needs a {key} list")
        factor = rope.get("factor") or max_pos / original
        out["rope_scaling"] = replace(
            RopeScaling.from_dict(rope),
            rope_type="longrope",
            factor=float(factor),
            original_max_position_embeddings=original,
        )
    window = cfg.get("sliding_window")
    out["sliding_window"] = int(window) if window and int(window) < max_pos else None
    return out


def _gguf_extra(get: Callable[[str, Any], Any], tensors: Collection[str]) -> dict[str, Any]:
    head_dim = get("attention.key_length", None) or int(get("embedding_length", 0)) // int(
        get("attention.head_count", 1)
    )
    max_pos = int(get("context_length", 4096))
    out: dict[str, Any] = {"extra": {"rotary_dim": int(get("rope.dimension_count", None) or head_dim)}}
    if "rope_factors_long.weight" in tensors and "rope_factors_short.weight" in tensors:
        original = int(get("rope.scaling.original_context_length", max_pos))
        attn_factor = get("rope.scaling.attn_factor", None)
        out["rope_scaling"] = RopeScaling(
            rope_type="longrope",
            factor=max_pos / original,
            original_max_position_embeddings=original,
            attention_factor=None if attn_factor is None else float(attn_factor),
        )
    window = get("attention.sliding_window", 0)
    out["sliding_window"] = int(window) if window and int(window) < max_pos else None
    return out


PHI3 = Architecture(
    name="phi3",
    hf_names=("Phi3ForCausalLM",),
    gguf_names=("phi3",),
    model=Phi3ForCausalLM,
    sliding_window=True,
    hf_extra=_hf_extra,
    gguf_extra=_gguf_extra,
    gguf_layer_names={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
)
