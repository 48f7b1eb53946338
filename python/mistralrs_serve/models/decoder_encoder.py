"""Decoder-only models used as embedders (Qwen3-Embedding and the like): the
Llama-family network (Llama, Mistral, Qwen2, Qwen3) run over whole rows at
once, with no KV cache, returning the hidden states after the final norm for
sentence_embedder.py to pool (last-token pooling, as Qwen3-Embedding does).

Rows are right-padded, so every row's positions start at 0 and its real tokens
never attend to padding (causal attention with the padding masked); a padded
query row's output is never pooled. Weights come from the directory's
safetensors in fp32, with or without the causal LM's `model.` prefix."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mistralrs_serve.config import ModelConfig
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.layers.norm import RMSNorm
from mistralrs_serve.layers.rotary import RotaryTable, apply_rotary

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class _Layer:
    input_norm: RMSNorm
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None
    k_bias: torch.Tensor | None
    v_bias: torch.Tensor | None
    q_norm: RMSNorm | None
    k_norm: RMSNorm | None
    post_norm: RMSNorm
    gate_up: torch.Tensor  # gate and up stacked: one product
    down: torch.Tensor


class DecoderEncoder:
    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> None:
        if config.architecture not in FAMILIES or config.sliding_window is not None:
            raise UnsupportedModelError(
                f"{config.architecture}: decoder embedders are supported for {', '.join(FAMILIES)} "
                "without sliding windows"
            )
        self.config = config
        eps = config.rms_norm_eps

        def get(name: str) -> torch.Tensor:
            for key in (name, f"model.{name}"):
                if key in weights:
                    return weights[key].float()
            raise ModelLoadError(f"decoder embedder: weight {name} is missing")

        def maybe(name: str) -> torch.Tensor | None:
            return get(name) if name in weights or f"model.{name}" in weights else None

        self.embed = get("embed_tokens.weight")
        self.norm = RMSNorm(get("norm.weight"), eps)
        self.layers = []
        for i in range(config.num_layers):
            p = f"layers.{i}."
            qk = config.qk_norm
            self.layers.append(
                _Layer(
                    input_norm=RMSNorm(get(p + "input_layernorm.weight"), eps),
                    q=get(p + "self_attn.q_proj.weight"),
                    k=get(p + "self_attn.k_proj.weight"),
                    v=get(p + "self_attn.v_proj.weight"),
                    o=get(p + "self_attn.o_proj.weight"),
                    q_bias=maybe(p + "self_attn.q_proj.bias"),
                    k_bias=maybe(p + "self_attn.k_proj.bias"),
                    v_bias=maybe(p + "self_attn.v_proj.bias"),
                    q_norm=RMSNorm(get(p + "self_attn.q_norm.weight"), eps) if qk else None,
                    k_norm=RMSNorm(get(p + "self_attn.k_norm.weight"), eps) if qk else None,
                    post_norm=RMSNorm(get(p + "post_attention_layernorm.weight"), eps),
                    gate_up=torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]),
                    down=get(p + "mlp.down_proj.weight"),
                )
            )
        self.rotary = RotaryTable(
            config.head_dim,
            config.rope_theta,
            config.rope_scaling,
            config.max_position_embeddings,
            torch.float32,
        )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) right-padded ids and their mask -> (B, L, H) final hidden states."""
        b, length = input_ids.shape
        cfg = self.config
        x = F.embedding(input_ids, self.embed)
        positions = torch.arange(length).repeat(b)
        cos, sin = self.rotary.lookup(positions)
        causal = torch.ones((length, length), dtype=torch.bool).tril()
        allowed = (causal[None] & mask[:, None, :])[:, None]  # (B, 1, L, L)
        for layer in self.layers:
            h = layer.input_norm(x).reshape(b * length, -1)
            q = _linear(h, layer.q, layer.q_bias).view(b * length, cfg.num_heads, cfg.head_dim)
            k = _linear(h, layer.k, layer.k_bias).view(b * length, cfg.num_kv_heads, cfg.head_dim)
            v = _linear(h, layer.v, layer.v_bias).view(b, length, cfg.num_kv_heads, cfg.head_dim)
            if layer.q_norm is not None and layer.k_norm is not None:
                q, k = layer.q_norm(q), layer.k_norm(k)
            q = apply_rotary(q, cos, sin).view(b, length, cfg.num_heads, cfg.head_dim)
            k = apply_rotary(k, cos, sin).view(b, length, cfg.num_kv_heads, cfg.head_dim)
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=allowed,
                enable_gqa=cfg.num_heads != cfg.num_kv_heads,
            )
            x = x + attn.transpose(1, 2).reshape(b, length, -1) @ layer.o.T
            gate, up = (layer.post_norm(x) @ layer.gate_up.T).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.down.T
        return self.norm(x)


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, bias)


def load_decoder_encoder(directory: Path) -> DecoderEncoder:
    """A directory of the causal LM (`Qwen3ForCausalLM`) or of its base model (`Qwen3Model`,
    what a checkpoint saved without its head names)."""
    from mistralrs_serve.models.hf_loader import load_safetensors, read_hf_config

    return DecoderEncoder(
        read_hf_config(directory, base_models=True), load_safetensors(directory, torch.float32)
    )
