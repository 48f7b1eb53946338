"""A vision-language model's image side from llama.cpp's multimodal projector
file (the `mmproj` GGUF its converter writes beside the text GGUF), for the two
families models/vision.py serves:

- `clip.projector_type` "gemma3": the SigLIP tower (`v.patch_embd`,
  `v.position_embd`, `v.blk.N.{ln1,attn_q,attn_k,attn_v,attn_out,ln2,ffn_up,
  ffn_down}`, `v.post_ln`) and the projector (`mm.input_projection` as
  transformers keeps it, (vision width, text width); `mm.soft_emb_norm` stored
  as 1 + weight). Image tokens: (image_size / patch_size / 4)^2 unless
  `clip.vision.projector.scale_factor` says otherwise.
- "qwen2.5vl_merger": the two temporal slices of the patch convolution
  (`v.patch_embd.weight`, `.weight.1`), q/k/v split out of the fused
  projection, RMSNorms `ln1`/`ln2`, the SiLU-gated MLP, the merger's norm
  (`v.post_ln`) and layers (`mm.0`, `mm.2`). Full attention in the blocks
  where (index + 1) is a multiple of `clip.vision.n_wa_pattern`; windows of
  112 pixels and 2 x 2 merges unless `clip.vision.window_size` and
  `spatial_merge_size` say otherwise (llama.cpp writes neither for it).

The tensors go back under the Hugging Face names, so the encoders are the same
code as for a Hugging Face directory. Image mean and std come from the file;
the placeholder tokens are found in the text GGUF's vocabulary by their text.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mistralrs_serve.config import ModelConfig
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.models.gguf_file import GGUFFile
from mistralrs_serve.models.gguf_quants import dequantize
from mistralrs_serve.models.vision import Gemma3Vision, QwenVLVision, VisionModel
from mistralrs_serve.tokenizer.tokenizer import Tokenizer

GEMMA3_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
QWEN_VL_IMAGE_TOKEN = "<|image_pad|>"
_SIGLIP_LAYER = {
    "ln1": "layer_norm1",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
_QWEN_LAYER = {
    "ln1": "norm1",
    "ln2": "norm2",
    "attn_out": "attn.proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class _Projector:
    """The open mmproj file: metadata by short key, tensors decoded to float32."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = GGUFFile(path)
        if self.file.get("general.architecture") != "clip":
            raise ModelLoadError(f"{path}: not a multimodal projector (general.architecture is not 'clip')")

    def meta(self, key: str, default: Any = None) -> Any:
        value = self.file.get(f"clip.vision.{key}", default)
        if value is None:
            raise ModelLoadError(f"{self.path}: metadata clip.vision.{key} is missing")
        return value

    def tensor(self, name: str) -> torch.Tensor:
        info = self.file.tensors.get(name)
        if info is None:
            raise ModelLoadError(f"{self.path}: tensor {name!r} is missing")
        return dequantize(self.file.raw(name), info, torch.float32)

    def names(self) -> list[str]:
        return list(self.file.tensors)

    def preprocessor(self) -> dict[str, Any]:
        return {
            "image_mean": [float(x) for x in self.meta("image_mean")][:3],
            "image_std": [float(x) for x in self.meta("image_std")][:3],
        }


def _token_id(tokenizer: Tokenizer, text: str, path: Path) -> int:
    token_id = tokenizer.backend.token_to_id(text)
    if token_id is None:
        raise ModelLoadError(f"{path}: the text model's vocabulary has no {text!r} token for images")
    return int(token_id)


def _rename(
    proj: _Projector, layer_names: dict[str, str], prefix: str, head: Callable[[str], str | None]
) -> dict[str, torch.Tensor]:
    """Every tensor under its Hugging Face name: `v.blk.N.<part>.<kind>` by
    `layer_names`, the others by `head` (None: handled by the caller)."""
    out = {}
    for name in proj.names():
        parts = name.split(".")
        if parts[:2] == ["v", "blk"] and parts[3] in layer_names:
            out[f"{prefix}{parts[2]}.{layer_names[parts[3]]}.{parts[-1]}"] = proj.tensor(name)
        elif (target := head(name)) is not None:
            out[target] = proj.tensor(name)
    return out


def _gemma3(proj: _Projector, tokenizer: Tokenizer, text: ModelConfig) -> VisionModel:
    tower = "vision_tower.vision_model."
    heads = {
        "v.patch_embd.weight": tower + "embeddings.patch_embedding.weight",
        "v.patch_embd.bias": tower + "embeddings.patch_embedding.bias",
        "v.position_embd.weight": tower + "embeddings.position_embedding.weight",
        "v.post_ln.weight": tower + "post_layernorm.weight",
        "v.post_ln.bias": tower + "post_layernorm.bias",
        "mm.input_projection.weight": "multi_modal_projector.mm_input_projection_weight",
    }
    weights = _rename(proj, _SIGLIP_LAYER, tower + "encoder.layers.", heads.get)
    weights["multi_modal_projector.mm_soft_emb_norm.weight"] = proj.tensor("mm.soft_emb_norm.weight") - 1.0
    image_size, patch = int(proj.meta("image_size")), int(proj.meta("patch_size"))
    per_side = image_size // patch // int(proj.meta("projector.scale_factor", 4))
    boi, eoi, image = (_token_id(tokenizer, t, proj.path) for t in GEMMA3_TOKENS)
    cfg = {
        "vision_config": {
            "hidden_size": int(proj.meta("embedding_length")),
            "intermediate_size": int(proj.meta("feed_forward_length")),
            "num_hidden_layers": int(proj.meta("block_count")),
            "num_attention_heads": int(proj.meta("attention.head_count")),
            "image_size": image_size,
            "patch_size": patch,
            "layer_norm_eps": float(proj.meta("attention.layer_norm_epsilon", 1e-6)),
        },
        "mm_tokens_per_image": per_side * per_side,
        "boi_token_index": boi,
        "eoi_token_index": eoi,
        "image_token_index": image,
    }
    _check_width(proj, text, weights["multi_modal_projector.mm_input_projection_weight"].shape[1])
    size = {"height": image_size, "width": image_size}
    return Gemma3Vision(cfg, weights, tokenizer, {**proj.preprocessor(), "size": size})


def _qwen_vl(proj: _Projector, tokenizer: Tokenizer, text: ModelConfig) -> VisionModel:
    heads = {
        "v.post_ln.weight": "visual.merger.ln_q.weight",
        "mm.0.weight": "visual.merger.mlp.0.weight",
        "mm.0.bias": "visual.merger.mlp.0.bias",
        "mm.2.weight": "visual.merger.mlp.2.weight",
        "mm.2.bias": "visual.merger.mlp.2.bias",
    }
    weights = _rename(proj, _QWEN_LAYER, "visual.blocks.", heads.get)
    depth = int(proj.meta("block_count"))
    for i in range(depth):
        for kind in ("weight", "bias"):
            parts = [proj.tensor(f"v.blk.{i}.attn_{x}.{kind}") for x in "qkv"]
            weights[f"visual.blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    frames = [proj.tensor("v.patch_embd.weight"), proj.tensor("v.patch_embd.weight.1")]
    weights["visual.patch_embed.proj.weight"] = torch.stack(frames, dim=2)
    pattern = int(proj.meta("n_wa_pattern"))
    hidden = int(proj.meta("embedding_length"))
    out_hidden = int(proj.meta("projection_dim"))
    cfg = {
        "vision_config": {
            "hidden_size": hidden,
            "num_heads": int(proj.meta("attention.head_count")),
            "depth": depth,
            "patch_size": int(proj.meta("patch_size")),
            "temporal_patch_size": 2,
            "spatial_merge_size": int(proj.meta("spatial_merge_size", 2)),
            "window_size": int(proj.meta("window_size", 112)),
            "fullatt_block_indexes": [i for i in range(depth) if (i + 1) % pattern == 0],
            "out_hidden_size": out_hidden,
        },
        "image_token_id": _token_id(tokenizer, QWEN_VL_IMAGE_TOKEN, proj.path),
    }
    _check_width(proj, text, out_hidden)
    return QwenVLVision(cfg, weights, tokenizer, proj.preprocessor())


def _check_width(proj: _Projector, text: ModelConfig, width: int) -> None:
    if width != text.hidden_size:
        raise ModelLoadError(
            f"{proj.path}: the projector gives {width}-wide embeddings; the text model is "
            f"{text.hidden_size} wide (is this the mmproj of another model?)"
        )


FAMILIES = {"gemma3": _gemma3, "qwen2.5vl_merger": _qwen_vl}


def load_mmproj(path: Path, tokenizer: Tokenizer, text: ModelConfig) -> VisionModel:
    """The vision model of an mmproj GGUF, for the text model `text` with `tokenizer`."""
    proj = _Projector(path)
    kind = proj.file.get("clip.projector_type") or proj.file.get("clip.vision.projector_type")
    family = FAMILIES.get(str(kind))
    if family is None:
        raise UnsupportedModelError(
            f"{path}: projector type {kind!r} is not supported (supported: {', '.join(FAMILIES)})"
        )
    return family(proj, tokenizer, text)
