"""The tiny vision-language checkpoints of tiny_vlms.py as llama.cpp's converter
writes them: the text model as its GGUF ("gemma3"; Qwen2.5-VL's as "qwen2vl"
with its rotary sections), and the vision tower and projector as an `mmproj`
GGUF (general.architecture "clip"): the gguf package's tensor names for the
MMPROJ architecture, Gemma 3's soft-embedding norm stored as 1 + weight and its
input projection under `mm.input_projection.weight` untransposed, Qwen2.5-VL's
patch convolution split into its two frames and its fused q/k/v into three,
`clip.vision.n_wa_pattern` for the full-attention blocks. Tensors are F32
(llama.cpp stores some as F16: F16 reading is the GGUF reader's, tested apart).
The tiny Qwen tower's 56-pixel windows are written as `clip.vision.window_size`,
a key llama.cpp reads for other projectors (its Qwen2.5-VL files go without it,
meaning 112)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tiny_models as tm
import tokenizers
import torch
from mistralrs_serve.models.hf_loader import text_part, text_weights
from safetensors.numpy import load_file, save_file
from test_gemma import write_gemma_gguf
from tiny_vlms import GEMMA3_TEMPLATE, QWEN_VL_TEMPLATE


def _text_dir(vlm_dir: Path, out: Path) -> Path:
    """The text model alone in flat Hugging Face layout (what the text GGUF is written from)."""
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads((vlm_dir / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(text_part(raw)))
    weights = {k: torch.from_numpy(v) for k, v in load_file(str(vlm_dir / "model.safetensors")).items()}
    save_file({k: v.numpy() for k, v in text_weights(weights).items()}, str(out / "model.safetensors"))
    return out


def write_text_gguf(vlm_dir: Path, path: Path) -> Path:
    raw = json.loads((vlm_dir / "config.json").read_text())
    tok = tokenizers.Tokenizer.from_file(str(vlm_dir / "tokenizer.json"))
    text = _text_dir(vlm_dir, path.parent / (path.stem + "-text"))
    if raw["model_type"] == "gemma3":
        return write_gemma_gguf(text, path, tok=tok, eos_token="<end_of_turn>", chat_template=GEMMA3_TEMPLATE)
    return tm.write_gguf_from_hf(
        text, path, arch_name="qwen2vl", tok=tok, eos_token="<|im_end|>", chat_template=QWEN_VL_TEMPLATE
    )


def _hub_name(name: str) -> str:
    """transformers 5 saves the tower as `vision_tower.`; the hub (and llama.cpp) name it
    `vision_tower.vision_model.`."""
    name = name.removeprefix("model.")
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name.replace("_weight", ".weight")


def _vision_tensors(raw: dict[str, Any], weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import gguf

    depth = raw["vision_config"].get("num_hidden_layers") or raw["vision_config"]["depth"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, depth)
    out: dict[str, np.ndarray] = {}
    for hf, t in weights.items():
        name = _hub_name(hf)
        if not name.startswith(("vision_tower.", "multi_modal_projector.", "visual.")) or ".head." in name:
            continue
        if name == "visual.patch_embed.proj.weight":  # (C, 3, 2, P, P): one conv per frame
            out["v.patch_embd.weight"], out["v.patch_embd.weight.1"] = t[:, :, 0], t[:, :, 1]
            continue
        if ".attn.qkv." in name:
            for part, piece in zip("qkv", np.split(t, 3), strict=True):
                target = names.get_name(name.replace(".qkv.", f".{part}."), try_suffixes=(".weight", ".bias"))
                assert target is not None, name
                out[target] = piece
            continue
        if "soft_emb_norm" in name:
            t = t + 1
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert target is not None, name
        out[target] = t
    return out


def write_mmproj(vlm_dir: Path, path: Path) -> Path:
    import gguf

    raw = json.loads((vlm_dir / "config.json").read_text())
    pre = json.loads((vlm_dir / "preprocessor_config.json").read_text())
    vision = raw["vision_config"]
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_uint32("clip.vision.projection_dim", raw["text_config"]["hidden_size"])
    w.add_uint32("clip.vision.patch_size", vision["patch_size"])
    w.add_uint32("clip.vision.embedding_length", vision["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", vision["intermediate_size"])
    w.add_array("clip.vision.image_mean", pre["image_mean"])
    w.add_array("clip.vision.image_std", pre["image_std"])
    if raw["model_type"] == "gemma3":
        w.add_string("clip.projector_type", "gemma3")
        w.add_uint32("clip.vision.image_size", vision["image_size"])
        w.add_uint32("clip.vision.block_count", vision["num_hidden_layers"])
        w.add_uint32("clip.vision.attention.head_count", vision["num_attention_heads"])
        w.add_float32("clip.vision.attention.layer_norm_epsilon", vision.get("layer_norm_eps", 1e-6))
        w.add_bool("clip.use_gelu", True)
        per_side = vision["image_size"] // vision["patch_size"]
        scale = per_side // round(raw["mm_tokens_per_image"] ** 0.5)
        if scale != 4:
            w.add_uint32("clip.vision.projector.scale_factor", scale)
    else:
        w.add_string("clip.projector_type", "qwen2.5vl_merger")
        w.add_uint32("clip.vision.image_size", 560)
        w.add_uint32("clip.vision.block_count", vision["depth"])
        w.add_uint32("clip.vision.attention.head_count", vision["num_heads"])
        w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
        w.add_bool("clip.use_silu", True)
        w.add_uint32("clip.vision.n_wa_pattern", vision["fullatt_block_indexes"][0] + 1)
        w.add_uint32("clip.vision.window_size", vision["window_size"])
    tensors = _vision_tensors(raw, load_file(str(vlm_dir / "model.safetensors")))
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
