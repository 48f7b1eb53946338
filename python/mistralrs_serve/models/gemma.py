"""Gemma 2 and Gemma 3 text decoders.

What differs from Llama (models/llama.py), all read from `ModelConfig.extra`
(models/gemma_config.py says where each setting comes from):
- the embedding is multiplied by sqrt(hidden_size), rounded to the model's dtype
  first as transformers does;
- every RMSNorm scales by (1 + weight), and each layer has four: before and after
  attention, before and after the MLP (the "after" ones normalise the branch
  output before it joins the residual);
- the MLP is gelu(gate) * up (tanh approximation);
- attention scales scores by query_pre_attn_scalar ** -0.5, not head_dim's, and
  per layer either slides (a window of keys) or sees everything; Gemma 2
  soft-caps scores and logits with tanh, Gemma 3 normalises q and k per head and
  gives sliding and global layers RoPE bases (and scaling) of their own.

Weights are plain tensors as in Llama, with q/k/v and gate/up fused into one
matmul each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from mistralrs_serve.config import ModelConfig, RopeScaling
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.layers.activation import GeluAndMul
from mistralrs_serve.layers.attention import AttentionBackend, LayerAttention
from mistralrs_serve.layers.linear import AnyWeight, Linear, concat_weights
from mistralrs_serve.layers.norm import RMSNorm
from mistralrs_serve.layers.rotary import RotaryTable
from mistralrs_serve.models import gemma_config
from mistralrs_serve.models.interface import FusedForward, KVPlaces, every_layer_window
from mistralrs_serve.models.llama import embed_tokens, qkv_attention
from mistralrs_serve.models.llama_native import (
    FusedSpec,
    LayerExtras,
    LayerTuple,
    NativeForward,
    applies,
    f32_list,
)
from mistralrs_serve.models.registry import Architecture

if TYPE_CHECKING:
    from mistralrs_serve.engine.media import StepMedia

_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


def _dense(w: AnyWeight, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype) if isinstance(w, torch.Tensor) else w.dequantize(dtype)


def gemma_norm(weight: AnyWeight, eps: float) -> RMSNorm:
    # (1 + weight) in fp32, as transformers computes it; RMSNorm then normalises in fp32 too
    return RMSNorm(1.0 + _dense(weight, torch.float32), eps)


class GemmaDecoderLayer:
    def __init__(
        self, cfg: ModelConfig, idx: int, w: Mapping[str, AnyWeight], dtype: torch.dtype, how: LayerAttention
    ) -> None:
        p, att, mlp = f"model.layers.{idx}.", f"model.layers.{idx}.self_attn.", f"model.layers.{idx}.mlp."
        self.idx, self.how = idx, how
        self.is_sliding = bool(cfg.extra["sliding_layers"][idx])  # picks the local RoPE
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        self.input_norm, self.post_attn_norm, self.pre_mlp_norm, self.post_mlp_norm = (
            gemma_norm(w[p + n + ".weight"], eps) for n in _NORMS
        )
        qkv_bias = (
            torch.cat([_dense(w[att + n + "_proj.bias"], dtype) for n in "qkv"])
            if cfg.attention_bias
            else None
        )
        self.qkv = Linear(concat_weights([w[att + n + "_proj.weight"] for n in "qkv"]), qkv_bias, dtype)
        o_bias = w.get(att + "o_proj.bias")
        self.o = Linear(w[att + "o_proj.weight"], None if o_bias is None else _dense(o_bias, dtype), dtype)
        self.q_norm = gemma_norm(w[att + "q_norm.weight"], eps) if cfg.qk_norm else None
        self.k_norm = gemma_norm(w[att + "k_norm.weight"], eps) if cfg.qk_norm else None
        self.gate_up = Linear(
            concat_weights([w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]]), None, dtype
        )
        self.act = GeluAndMul(cfg.extra["gelu_approximate"])
        self.down = Linear(w[mlp + "down_proj.weight"], None, dtype)

    def norms(self) -> list[RMSNorm]:
        norms = [self.input_norm, self.post_attn_norm, self.pre_mlp_norm, self.post_mlp_norm]
        return norms + [n for n in (self.q_norm, self.k_norm) if n is not None]

    def linears(self) -> list[Linear]:
        return [self.qkv, self.o, self.gate_up, self.down]

    def fused_weights(self) -> LayerTuple:
        """The layer as the fused step takes it (norm weights are already 1 + w)."""
        q_norm, k_norm = (
            None if n is None else n.weight.float().tolist() for n in (self.q_norm, self.k_norm)
        )
        return (
            self.input_norm.weight.float().tolist(),
            self.qkv,
            f32_list(self.qkv.bias),
            q_norm,
            k_norm,
            self.o,
            f32_list(self.o.bias),
            self.pre_mlp_norm.weight.float().tolist(),
            self.gate_up,
            self.down,
        )

    def fused_extras(self, local_table: bool) -> LayerExtras:
        """(post-attention norm, post-MLP norm, window, rotary table: 1 for a sliding layer
        where the local layers have a table of their own)."""
        return (
            self.post_attn_norm.weight.float().tolist(),
            self.post_mlp_norm.weight.float().tolist(),
            self.how.window,
            1 if local_table and self.is_sliding else 0,
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        int4_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        h = self._attention(self.input_norm(x), cos, sin, attn, int4_rows)
        x = x + self.post_attn_norm(h)
        h = self.down(self.act(self.gate_up(self.pre_mlp_norm(x), int4_rows)), int4_rows)
        return x + self.post_mlp_norm(h)

    def _attention(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        int4_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        return qkv_attention(self, x, cos, sin, attn, int4_rows)


def layer_attention(cfg: ModelConfig, idx: int) -> LayerAttention:
    """Layer idx's window (sliding layers only), score scale and soft-cap."""
    sliding = bool(cfg.extra["sliding_layers"][idx])
    return LayerAttention(
        window=cfg.sliding_window if sliding else None,
        scale=cfg.extra["attn_scale"],
        softcap=cfg.extra["attn_softcap"],
    )


class GemmaForCausalLM:
    """Token ids and positions in, logits of the selected rows out."""

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, AnyWeight], dtype: torch.dtype) -> None:
        missing = [n for n in required_weight_names(cfg) if n not in weights]
        if missing:
            raise ModelLoadError(f"weights are missing {len(missing)} tensors, e.g. {missing[:3]}")
        if len(cfg.extra["sliding_layers"]) != cfg.num_layers:
            raise ModelLoadError(
                f"{len(cfg.extra['sliding_layers'])} layer kinds for {cfg.num_layers} layers"
            )
        self.config, self.dtype = cfg, dtype
        self.device = torch.device("cpu")
        self.embed_source: AnyWeight = weights["model.embed_tokens.weight"]
        self._embed: torch.Tensor | None = None
        # transformers rounds sqrt(hidden) to the weights' dtype before multiplying (25.25 in bf16, not 25.30)
        self.embed_scale = torch.tensor(cfg.hidden_size**0.5).to(dtype)
        self.layers = [
            GemmaDecoderLayer(cfg, i, weights, dtype, layer_attention(cfg, i)) for i in range(cfg.num_layers)
        ]
        self.norm = gemma_norm(weights["model.norm.weight"], cfg.rms_norm_eps)
        head = weights["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        self.lm_head = Linear(head, None, dtype)
        self.final_softcap: float | None = cfg.extra["final_softcap"]
        self.global_rotary = self._rotary(cfg.rope_theta, cfg.rope_scaling)
        local_theta, local_scaling = cfg.extra["local_rope_theta"], cfg.extra["local_rope_scaling"]
        same = local_theta is None or (local_theta == cfg.rope_theta and local_scaling == cfg.rope_scaling)
        self.local_rotary = self.global_rotary if same else self._rotary(local_theta, local_scaling)

    @property
    def embed(self) -> torch.Tensor:
        """The dense embedding table, decoded on first use (the fused forward reads rows of
        the quantized table instead)."""
        if self._embed is None:
            self._embed = _dense(self.embed_source, self.dtype)
        return self._embed

    def _rotary(self, theta: float, scaling: RopeScaling) -> RotaryTable:
        cfg = self.config
        return RotaryTable(cfg.head_dim, theta, scaling, cfg.max_position_embeddings, self.dtype)

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
        """input_ids/positions (T,); returns fp32 logits (len(logits_indices), vocab).
        media: Gemma 3's image embeddings, placed after the embedding's scaling."""
        x = embed_tokens(self.embed, input_ids, media, self.embed_scale)
        local = self.local_rotary.lookup(positions)
        glob = local if self.local_rotary is self.global_rotary else self.global_rotary.lookup(positions)
        for layer in self.layers:
            cos, sin = local if layer.is_sliding else glob
            x = layer.forward(x, cos, sin, attn, int4_rows)
        logits = self.lm_head(self.norm(x[logits_indices])).float()
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def to(self, device: torch.device | str) -> GemmaForCausalLM:
        """Move every weight (in place); off the CPU the 4-bit CPU kernel's copies are dropped."""
        device = torch.device(device)
        self.device = device
        self._embed, self.embed_scale = self.embed.to(device), self.embed_scale.to(device)
        for rotary in {id(r): r for r in (self.global_rotary, self.local_rotary)}.values():
            rotary.cos, rotary.sin = rotary.cos.to(device), rotary.sin.to(device)
        for norm in self._norms():
            norm.to(device)
        for lin in self.linears():
            lin.to(device)
        return self

    def use_triton(self) -> None:
        """RMSNorm by the Triton kernel (it reads the fp32 1 + weight as it is); GELU stays torch."""
        for norm in self._norms():
            norm.triton = True

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads (the embedding row is negligible)."""
        return sum(lin.decode_bytes() for lin in self.linears())

    def fused_forward(self, kv: np.ndarray | None, kv_layout: KVPlaces | None = None) -> FusedForward | None:
        """The fused Rust step (models/llama_native.py) with Gemma's settings: GELU-tanh,
        its score scale and (Gemma 2) soft-cap, post norms, windows and the local
        layers' rotary table."""
        cfg = self.config
        if cfg.extra["gelu_approximate"] != "tanh":
            return None
        if not applies(self.device, kv, [lin for layer in self.layers for lin in layer.linears()]):
            return None
        assert kv is not None
        local = None if self.local_rotary is self.global_rotary else self.local_rotary
        spec = FusedSpec(
            hidden=cfg.hidden_size,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            intermediate=cfg.intermediate_size,
            eps=cfg.rms_norm_eps,
            layers=[layer.fused_weights() for layer in self.layers],
            final_norm=self.norm.weight.float().tolist(),
            head=self.lm_head,
            embed_source=self.embed_source,
            dense_embed=lambda: self.embed,
            rotary=self.global_rotary,
            local_rotary=local,
            extras=[layer.fused_extras(local is not None) for layer in self.layers],
            activation="gelu_tanh",
            attn_scale=cfg.extra["attn_scale"],
            attn_softcap=cfg.extra["attn_softcap"],
            # llama.cpp's scale, in f32 (transformers rounds it to the weights' dtype first)
            embed_scale=cfg.hidden_size**0.5,
            final_softcap=self.final_softcap,
        )
        return NativeForward(spec, kv, kv_layout)

    def kv_window(self) -> int | None:
        """None for Gemma 2 and 3, whose global layers read every block (freeing behind
        the sliding layers' window would take them a block pool of their own)."""
        return every_layer_window(layer.how for layer in self.layers)

    def layer_windows(self) -> list[int | None]:
        return [layer.how.window for layer in self.layers]

    def linears(self) -> list[Linear]:
        """The head first, then every layer's."""
        return [self.lm_head] + [lin for layer in self.layers for lin in layer.linears()]

    def _norms(self) -> list[RMSNorm]:
        return [self.norm] + [n for layer in self.layers for n in layer.norms()]


def required_weight_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + n + ".weight" for n in _NORMS]
        names += [f"{p}self_attn.{n}_proj.weight" for n in "qkvo"]
        names += [f"{p}mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        if cfg.attention_bias:
            names += [f"{p}self_attn.{n}_proj.bias" for n in "qkv"]
        if cfg.qk_norm:
            names += [f"{p}self_attn.q_norm.weight", f"{p}self_attn.k_norm.weight"]
    return names


GEMMA2 = Architecture(
    name="gemma2",
    hf_names=("Gemma2ForCausalLM",),
    gguf_names=("gemma2",),
    model=GemmaForCausalLM,
    sliding_window=True,
    hf_extra=gemma_config.gemma2_hf_extra,
    gguf_extra=gemma_config.gemma2_gguf_extra,
    gguf_layer_names=gemma_config.GGUF_LAYER_NAMES,
    gguf_fixup=gemma_config.gguf_fixup,
)

GEMMA3 = Architecture(
    name="gemma3",
    hf_names=("Gemma3ForCausalLM",),
    gguf_names=("gemma3",),
    model=GemmaForCausalLM,
    qk_norm=True,
    sliding_window=True,
    hf_extra=gemma_config.gemma3_hf_extra,
    gguf_extra=gemma_config.gemma3_gguf_extra,
    gguf_layer_names=gemma_config.GGUF_LAYER_NAMES,
    gguf_fixup=gemma_config.gguf_fixup,
)
