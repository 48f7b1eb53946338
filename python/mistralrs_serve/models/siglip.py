"""The SigLIP vision transformer (Gemma 3's vision tower): a picture's patches
(a strided convolution), learned position embeddings, pre-norm encoder layers
with full attention and a tanh-GELU MLP, a final LayerNorm. Float32, torch.

The tower reads its tensors through `weight_getter` (the prefixes a Gemma 3
checkpoint may use for them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mistralrs_serve.errors import ModelLoadError

_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu": "none"}


@dataclass(frozen=True)
class SiglipConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    gelu_approximate: str

    @staticmethod
    def from_hf(cfg: Mapping[str, Any]) -> SiglipConfig:
        act = str(cfg.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in _GELU:
            raise ModelLoadError(f"SigLIP: activation {act!r} is not supported")
        return SiglipConfig(
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            image_size=int(cfg["image_size"]),
            patch_size=int(cfg["patch_size"]),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
            gelu_approximate=_GELU[act],
        )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


class SiglipVisionTower:
    def __init__(self, config: SiglipConfig, get: Any) -> None:
        self.config = config
        self.patch_w, self.patch_b = (
            get("embeddings.patch_embedding.weight"),
            get("embeddings.patch_embedding.bias"),
        )
        self.positions = get("embeddings.position_embedding.weight")
        patches = config.patches_per_side**2
        if self.positions.shape[0] != patches:
            found = self.positions.shape[0]
            raise ModelLoadError(f"SigLIP: {found} position embeddings for {patches} patches")
        self.layers = []
        for i in range(config.num_layers):
            p = f"encoder.layers.{i}."
            qkv_w = torch.cat([get(f"{p}self_attn.{n}_proj.weight") for n in "qkv"])
            qkv_b = torch.cat([get(f"{p}self_attn.{n}_proj.bias") for n in "qkv"])
            self.layers.append(
                {
                    "norm1": (get(p + "layer_norm1.weight"), get(p + "layer_norm1.bias")),
                    "qkv": (qkv_w, qkv_b),
                    "out": (get(p + "self_attn.out_proj.weight"), get(p + "self_attn.out_proj.bias")),
                    "norm2": (get(p + "layer_norm2.weight"), get(p + "layer_norm2.bias")),
                    "fc1": (get(p + "mlp.fc1.weight"), get(p + "mlp.fc1.bias")),
                    "fc2": (get(p + "mlp.fc2.weight"), get(p + "mlp.fc2.bias")),
                }
            )
        self.post_norm = (get("post_layernorm.weight"), get("post_layernorm.bias"))

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, patches, hidden) states."""
        cfg = self.config
        x = F.conv2d(pixel_values.float(), self.patch_w, self.patch_b, stride=cfg.patch_size)
        x = x.flatten(2).transpose(1, 2) + self.positions  # (B, patches, hidden)
        batch, n, hidden = x.shape
        heads = cfg.num_heads
        for layer in self.layers:
            h = F.layer_norm(x, (hidden,), *layer["norm1"], cfg.layer_norm_eps)
            q, k, v = (
                F.linear(h, *layer["qkv"]).view(batch, n, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4)
            )
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, n, hidden)
            x = x + F.linear(a, *layer["out"])
            h = F.layer_norm(x, (hidden,), *layer["norm2"], cfg.layer_norm_eps)
            x = x + F.linear(
                F.gelu(F.linear(h, *layer["fc1"]), approximate=cfg.gelu_approximate), *layer["fc2"]
            )
        return F.layer_norm(x, (hidden,), *self.post_norm, cfg.layer_norm_eps)


def weight_getter(weights: Mapping[str, torch.Tensor], *prefixes: str) -> Any:
    """get(name): the float32 tensor `prefix + name` for the first of `prefixes` that has
    it, also under a leading `model.` (checkpoints name the tower differently:
    `vision_tower.vision_model.` as published, `vision_tower.` as transformers 5 saves)."""

    def get(name: str) -> torch.Tensor:
        for prefix in prefixes:
            for key in (prefix + name, "model." + prefix + name):
                if key in weights:
                    return weights[key].float().contiguous()
        raise ModelLoadError(f"vision weights lack {prefixes[0] + name}")

    return get
