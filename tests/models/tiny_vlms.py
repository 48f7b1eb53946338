"""Tiny random-weight vision-language checkpoints, built with transformers and saved
the way `save_pretrained` saves them, with the tiny test tokenizer (tiny_models.py)
plus each family's special tokens, a chat template that places image parts the way
the family's published template does, and a preprocessor_config.json sized for
the tiny towers:

- Gemma 3: SigLIP tower of 56 x 56 pixels in 7-pixel patches, pooled to 16 image
  tokens; one sliding layer (window 16) and one global layer.
- Qwen2.5-VL: the windowed ViT with one full-attention block, multimodal rotary
  sections (2, 2, 2); pictures resized within 56 x 56 .. 28 x 28 x 64 pixels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tiny_models as tm
import torch

GEMMA3_TOKENS = [
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<start_of_turn>",
    "<end_of_turn>",
]
# Gemma 3's turn format; an image part is written as the begin-of-image token
GEMMA3_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}<start_of_image>{% elif p.type == 'text' %}{{ p.text }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN_VL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# ChatML; an image part is the vision start, one image pad, the vision end
QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif p.type == 'text' %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(extra: list[str]) -> tuple[Any, dict[str, int]]:
    tok = tm.build_tokenizer()
    tok.add_special_tokens(extra)
    return tok, {t: tok.token_to_id(t) for t in extra}


def _save(
    directory: Path, model: Any, tok: Any, template: str, eos: str, preprocessor: dict[str, Any]
) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(str(directory / "tokenizer.json"))
    tok_cfg = {"eos_token": eos, "bos_token": None, "chat_template": template}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (directory / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def gemma3(directory: Path, layer_types: tuple[str, ...] = ("sliding_attention", "full_attention")) -> Any:
    """A tiny Gemma3ForConditionalGeneration saved in `directory`; returns the model (fp32, eval).
    Scores are scaled by head_dim (as llama.cpp assumes for GGUF files)."""
    import transformers

    tok, ids = _tokenizer(GEMMA3_TOKENS)
    text = dict(
        vocab_size=tok.get_vocab_size() + 3,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
        query_pre_attn_scalar=24,
        sliding_window=16,
        layer_types=list(layer_types),
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=56,
        patch_size=7,
        hidden_act="gelu_pytorch_tanh",
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=16,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # the projector starts at zero: give it values
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.2)
        model.model.multi_modal_projector.mm_soft_emb_norm.weight.normal_(std=0.2)
    preprocessor = {
        "size": {"height": 56, "width": 56},
        "image_seq_length": 16,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    _save(directory, model, tok, GEMMA3_TEMPLATE, "<end_of_turn>", preprocessor)
    return model


def qwen_vl(directory: Path) -> Any:
    """A tiny Qwen2_5_VLForConditionalGeneration saved in `directory`; returns the model (fp32, eval)."""
    import transformers

    tok, ids = _tokenizer(QWEN_VL_TOKENS)
    text = dict(
        vocab_size=tok.get_vocab_size() + 3,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [2, 2, 2]},
    )
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=40,
        num_heads=4,
        out_hidden_size=48,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,  # 2 x 2 merge groups per window: small grids still hold several
        fullatt_block_indexes=[1],
    )
    config = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    preprocessor = {
        "min_pixels": 56 * 56,
        "max_pixels": 28 * 28 * 64,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    _save(directory, model, tok, QWEN_VL_TEMPLATE, "<|im_end|>", preprocessor)
    return model
