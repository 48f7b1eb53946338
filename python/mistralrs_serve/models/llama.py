"""Llama-family decoder (Llama 2/3, SmolLM and SmolLM2; Mistral, Ministral and SmolLM3 subclass it).

Qwen2 (biases on q/k/v) and Qwen3 (RMSNorm on q and k per head) are the
same network with a flag each; their files only map configs and names.
A subclass gives layers their own attention (`layer_attention`: a sliding
window) or skips rotary on some (`layer_uses_rope`); the default is plain
causal attention with rotary on every layer.

Weights are plain tensors, not nn.Modules: a decode step at batch 1 is
~20 ops per layer and module dispatch would be a visible share of it.
q/k/v and gate/up are fused into one matmul each (measured: 5 fewer ops per
layer, about 10% of a decode step on the default model).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from mistralrs_serve.config import ModelConfig
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.layers.activation import SiluAndMul
from mistralrs_serve.layers.attention import PLAIN, AttentionBackend, LayerAttention
from mistralrs_serve.layers.linear import AnyWeight, Linear, concat_weights
from mistralrs_serve.layers.norm import RMSNorm
from mistralrs_serve.layers.rotary import RotaryTable, apply_rotary
from mistralrs_serve.models.interface import KVPlaces, every_layer_window
from mistralrs_serve.models.registry import Architecture

if TYPE_CHECKING:
    from mistralrs_serve.engine.media import StepMedia
    from mistralrs_serve.models.llama_native import NativeForward


class DecoderLayer:
    def __init__(
        self,
        cfg: ModelConfig,
        idx: int,
        w: Mapping[str, AnyWeight],
        dtype: torch.dtype,
        how: LayerAttention = PLAIN,
        use_rope: bool = True,
    ) -> None:
        p = f"model.layers.{idx}."
        att = p + "self_attn."
        self.idx = idx
        self.how, self.use_rope = (PLAIN if how == PLAIN else how), use_rope
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        mlp = p + "mlp."

        def dense(name: str) -> torch.Tensor:
            return _dense(w[name], dtype)

        self.input_norm = RMSNorm(dense(p + "input_layernorm.weight"), eps)
        self.post_norm = RMSNorm(dense(p + "post_attention_layernorm.weight"), eps)
        qkv_bias = torch.cat([dense(att + n + "_proj.bias") for n in "qkv"]) if cfg.attention_bias else None
        self.qkv = Linear(concat_weights([w[att + n + "_proj.weight"] for n in "qkv"]), qkv_bias, dtype)
        # Llama with attention_bias=True has an o_proj bias too (Qwen2 does not).
        o_bias = w.get(att + "o_proj.bias")
        self.o = Linear(
            w[att + "o_proj.weight"], None if o_bias is None else dense(att + "o_proj.bias"), dtype
        )
        self.q_norm = RMSNorm(dense(att + "q_norm.weight"), eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(dense(att + "k_norm.weight"), eps) if cfg.qk_norm else None
        self.gate_up = Linear(
            concat_weights([w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]]), None, dtype
        )
        self.act = SiluAndMul()
        self.down = Linear(w[mlp + "down_proj.weight"], None, dtype)

    def norms(self) -> list[RMSNorm]:
        return [n for n in (self.input_norm, self.post_norm, self.q_norm, self.k_norm) if n is not None]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        int4_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self._attention(self.input_norm(x), cos, sin, attn, int4_rows)
        h = self.post_norm(x)
        return x + self.down(self.act(self.gate_up(h, int4_rows)), int4_rows)

    def _attention(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionBackend,
        int4_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        return qkv_attention(self, x, cos, sin, attn, int4_rows, self.use_rope)


class AttentionParts(Protocol):
    """What a decoder layer's attention is made of (Llama's, Gemma's, the MoE families')."""

    idx: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv: Linear
    o: Linear
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    how: LayerAttention


def qkv_attention(
    layer: AttentionParts,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    attn: AttentionBackend,
    int4_rows: torch.Tensor | None,
    use_rope: bool = True,
) -> torch.Tensor:
    """Fused q/k/v, optional per-head q/k norms, rotary, attention over the cache, output projection."""
    h, kv = layer.num_heads, layer.num_kv_heads
    qkv = layer.qkv(x, int4_rows).view(x.shape[0], h + 2 * kv, layer.head_dim)
    q, k, v = qkv.split([h, kv, kv], dim=1)  # (T, heads, D) each
    if layer.q_norm is not None and layer.k_norm is not None:
        q, k = layer.q_norm(q), layer.k_norm(k)
    if use_rope:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    # `how` only where it differs, so a plain layer runs on any backend (test doubles included)
    out = (
        attn.attend(layer.idx, q, k, v) if layer.how is PLAIN else attn.attend(layer.idx, q, k, v, layer.how)
    )
    return layer.o(out, int4_rows)


class LlamaForCausalLM:
    """Token ids and positions in, logits of the selected rows out."""

    embed_source: AnyWeight  # the embedding table as loaded (see `embed`)
    _embed_dense: torch.Tensor | None

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, AnyWeight], dtype: torch.dtype) -> None:
        missing = [n for n in required_weight_names(cfg) if n not in weights]
        if missing:
            raise ModelLoadError(f"weights are missing {len(missing)} tensors, e.g. {missing[:3]}")
        self.config, self.dtype = cfg, dtype
        self.device = torch.device("cpu")
        self.embed = weights["model.embed_tokens.weight"]
        self.layers = [
            DecoderLayer(cfg, i, weights, dtype, self.layer_attention(i), self.layer_uses_rope(i))
            for i in range(cfg.num_layers)
        ]
        self.norm = RMSNorm(_dense(weights["model.norm.weight"], dtype), cfg.rms_norm_eps)
        head = weights["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
        self.lm_head = Linear(head, None, dtype)
        freq_factors = weights.get("rope_freqs")
        self.rotary = RotaryTable(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.rope_scaling,
            cfg.max_position_embeddings,
            dtype,
            None if freq_factors is None else _dense(freq_factors, torch.float64),
        )

    @property
    def embed(self) -> torch.Tensor:
        """The dense embedding table, decoded on first use (the fused forward looks
        rows up in the quantized table instead: `embed_source`, kept as loaded)."""
        if isinstance(self.embed_source, torch.Tensor):
            return self.embed_source
        if self._embed_dense is None:
            self._embed_dense = _dense(self.embed_source, self.dtype)
        return self._embed_dense

    @embed.setter
    def embed(self, table: AnyWeight) -> None:
        self.embed_source = table if not isinstance(table, torch.Tensor) else table.to(self.dtype)
        self._embed_dense = None

    def layer_attention(self, idx: int) -> LayerAttention:
        """How layer `idx` attends (a family with sliding windows overrides this)."""
        return PLAIN

    def layer_uses_rope(self, idx: int) -> bool:
        """Whether layer `idx` rotates q and k (SmolLM3 skips it on some layers)."""
        return True

    def is_plain(self) -> bool:
        """Every layer plain causal attention with rotary: what the fused Rust forward computes."""
        return all(layer.how is PLAIN and layer.use_rope for layer in self.layers)

    def kv_window(self) -> int | None:
        """The window every layer attends within (Mistral v0.1, a windowed Phi-3), else None."""
        return every_layer_window(layer.how for layer in self.layers)

    def layer_windows(self) -> list[int | None]:
        return [layer.how.window for layer in self.layers]

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
        int4_rows: the rows of a mixed step that take the 4-bit kernel (see Linear);
        media: image embeddings replacing rows, multimodal rotary positions."""
        x = embed_tokens(self.embed, input_ids, media)
        cos, sin = rotary_tables(self.rotary, positions, media, self.config.rope_scaling.mrope_section)
        for layer in self.layers:
            x = layer.forward(x, cos, sin, attn, int4_rows)
        return self.lm_head(self.norm(x[logits_indices])).float()

    def to(self, device: torch.device | str) -> LlamaForCausalLM:
        """Move every weight (in place); off the CPU the 4-bit CPU kernel's copies are dropped."""
        device = torch.device(device)
        self.device = device
        self.embed = self.embed.to(device)
        self.lm_head.to(device)
        self.rotary.cos, self.rotary.sin = self.rotary.cos.to(device), self.rotary.sin.to(device)
        for norm in self._norms():
            norm.to(device)
        for lin in self.linears()[1:]:
            lin.to(device)
        return self

    def use_triton(self) -> None:
        """RMSNorm and SwiGLU by the Triton kernels (rotary stays torch)."""
        for norm in self._norms():
            norm.triton = True
        for layer in self.layers:
            layer.act.triton = True

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads (the embedding row is negligible)."""
        return sum(lin.decode_bytes() for lin in self.linears())

    def fused_forward(self, kv: np.ndarray | None, kv_layout: KVPlaces | None = None) -> NativeForward | None:
        """The fused Rust step (models/llama_native.py) where it applies: it knows
        neither windows nor layers without rotary."""
        from mistralrs_serve.models.llama_native import NativeForward

        return NativeForward.build(self, kv, kv_layout) if self.is_plain() else None

    def linears(self) -> list[Linear]:
        """The head first, then every layer's."""
        return [self.lm_head] + [
            lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
        ]

    def _norms(self) -> list[RMSNorm]:
        return [self.norm] + [n for layer in self.layers for n in layer.norms()]


def _dense(w: AnyWeight, dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype) if isinstance(w, torch.Tensor) else w.dequantize(dtype)


def embed_tokens(
    table: torch.Tensor,
    input_ids: torch.Tensor,
    media: StepMedia | None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rows of `table` for input_ids (times `scale`), then the step's image
    embeddings in their rows, unscaled, as transformers places them (placeholder ids
    may lie outside the table: those rows look up id 0 first)."""
    if media is None or media.rows is None:
        x = F.embedding(input_ids, table)
        return x if scale is None else x * scale
    x = F.embedding(input_ids.index_fill(0, media.rows, 0), table)
    x = x if scale is None else x * scale
    assert media.embeddings is not None
    return x.index_copy_(0, media.rows, media.embeddings.to(x.dtype))


def rotary_tables(
    rotary: RotaryTable, positions: torch.Tensor, media: StepMedia | None, sections: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of a step: by the step's three rotary positions per token where the
    model rotates by sections (Qwen2-VL) and the step has them, else by position."""
    if media is not None and media.rope_positions is not None and sections:
        return rotary.lookup_multimodal(media.rope_positions, sections)
    return rotary.lookup(positions)


def required_weight_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{n}_proj.weight" for n in "qkvo"]
        names += [f"{p}mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        if cfg.attention_bias:
            names += [f"{p}self_attn.{n}_proj.bias" for n in "qkv"]
        if cfg.qk_norm:
            names += [f"{p}self_attn.q_norm.weight", f"{p}self_attn.k_norm.weight"]
    return names


LLAMA = Architecture(
    name="llama",
    hf_names=("LlamaForCausalLM",),
    # llama.cpp writes Mistral as "llama" (no window in the metadata; it runs full attention)
    gguf_names=("llama", "mistral"),
    model=LlamaForCausalLM,
    gguf_permuted_qk=True,
)
