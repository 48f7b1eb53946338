"""Gemma 3's image encoder: the SigLIP tower (models/siglip.py), then the
multimodal projector: the patch grid average-pooled to `mm_tokens_per_image`
tokens (16 x 16 by default), Gemma's RMSNorm (weight + 1), and one product
into the text model's width. `encode(pixels)` gives the embeddings that stand
in for an image's placeholder tokens in the prompt.

Loaded from a Gemma3ForConditionalGeneration directory (config.json with
`vision_config`, the safetensors shards), the same files the text model comes
from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models.siglip import SiglipConfig, SiglipVisionTower, weight_getter


class Gemma3ImageEncoder:
    def __init__(self, cfg: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> None:
        vision = cfg.get("vision_config")
        if not isinstance(vision, dict):
            raise ModelLoadError("Gemma 3: config.json has no vision_config (a text-only checkpoint)")
        self.vision_config = SiglipConfig.from_hf(vision)
        self.tower = SiglipVisionTower(
            self.vision_config, weight_getter(weights, "vision_tower.vision_model.", "vision_tower.")
        )
        project = weight_getter(weights, "multi_modal_projector.")
        self.norm_weight = project("mm_soft_emb_norm.weight")
        self.projection = project("mm_input_projection_weight")  # (vision hidden, text hidden)
        self.eps = self.vision_config.layer_norm_eps
        self.tokens = int(cfg.get("mm_tokens_per_image", 256))
        side = round(self.tokens**0.5)
        per_side = self.vision_config.patches_per_side
        if side * side != self.tokens or per_side % side:
            raise ModelLoadError(f"Gemma 3: {self.tokens} image tokens do not pool a {per_side}^2 patch grid")
        self.kernel = per_side // side
        self.image_token_id = int(cfg.get("image_token_index", cfg.get("image_token_id", 262144)))

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, mm_tokens_per_image, text hidden)."""
        states = self.tower.forward(pixel_values)
        batch, _, hidden = states.shape
        side = self.vision_config.patches_per_side
        grid = states.transpose(1, 2).reshape(batch, hidden, side, side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)
        normed = F.rms_norm(pooled, (hidden,), None, self.eps) * (1.0 + self.norm_weight)
        return normed @ self.projection


def load_gemma3_image_encoder(directory: Path) -> Gemma3ImageEncoder:
    from mistralrs_serve.models.hf_loader import load_safetensors

    cfg = json.loads((directory / "config.json").read_text())
    weights = load_safetensors(directory, torch.float32)
    return Gemma3ImageEncoder(cfg, weights)
