"""Load a model from a directory in Hugging Face layout.

Expected files: config.json, *.safetensors (one file or shards with an
index), tokenizer.json, tokenizer_config.json; optional
generation_config.json and chat_template.jinja.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from mistralrs_serve.config import ModelConfig
from mistralrs_serve.errors import ModelLoadError
from mistralrs_serve.models.progress import progress
from mistralrs_serve.models.registry import config_from_hf, find_architecture
from mistralrs_serve.tokenizer.chat_template import load_chat_template
from mistralrs_serve.tokenizer.tokenizer import Tokenizer, special_tokens_from_hf


def read_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise ModelLoadError(f"{path}: file is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


# Vision-language checkpoints whose text model is a family here: the text model's
# architecture. Their text settings sit in `text_config` (or at the top, as older
# Qwen2-VL files have them), their text weights under `language_model` (or beside
# the vision tower's); `text_weights` renames those and leaves the vision parts out.
MULTIMODAL_TEXT = {
    "Gemma3ForConditionalGeneration": "Gemma3ForCausalLM",
    "Qwen2VLForConditionalGeneration": "Qwen2ForCausalLM",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2ForCausalLM",
}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "visual.")


def text_part(raw: dict[str, Any]) -> dict[str, Any]:
    """config.json's text model: itself, or a vision-language checkpoint's text_config."""
    names = raw.get("architectures") or []
    if not names or names[0] not in MULTIMODAL_TEXT:
        return raw
    text = raw.get("text_config")
    merged = {**raw, **text} if isinstance(text, dict) else dict(raw)
    merged.pop("text_config", None)
    merged.pop("vision_config", None)
    merged["architectures"] = [MULTIMODAL_TEXT[names[0]]]
    return merged


def text_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A vision-language checkpoint's text weights under the causal LM's names (a text
    checkpoint's come back as they are)."""
    out = {}
    for name, tensor in weights.items():
        for old, new in (
            ("language_model.model.", "model."),
            ("model.language_model.", "model."),
            ("language_model.lm_head.", "lm_head."),
        ):
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        if not name.removeprefix("model.").startswith(VISION_PREFIXES):
            out[name] = tensor
    return out


def read_hf_config(model_dir: Path, *, base_models: bool = False) -> ModelConfig:
    """The text model's settings. `base_models`: also a checkpoint saved without its head
    (`Qwen3Model`), read as its causal LM (`Qwen3ForCausalLM`), as embedders are."""
    raw = text_part(read_json(model_dir / "config.json", required=True))
    names = raw.get("architectures") or []
    if not names:
        raise ModelLoadError(f"{model_dir / 'config.json'}: no 'architectures' entry")
    name = str(names[0])
    if base_models and name.endswith("Model") and not name.endswith("ForCausalLM"):
        name = name.removesuffix("Model") + "ForCausalLM"
    try:
        return config_from_hf(raw, find_architecture(hf_name=name))
    except ModelLoadError as e:  # unsupported architecture, invalid config: say which file
        raise type(e)(f"{model_dir / 'config.json'}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{model_dir / 'config.json'}: missing or invalid setting {e}") from e


def load_safetensors(
    model_dir: Path, dtype: torch.dtype, only: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's shards in `dtype`; with `only`, the names it takes
    (read one by one, so the rest never leave the file)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in model_dir.iterdir())) or "nothing"
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights (found: {found})")
    weights: dict[str, torch.Tensor] = {}
    for f in progress(files, "loading safetensors shards", "file"):
        try:
            if only is None:
                weights.update({k: v.to(dtype) for k, v in load_file(f).items()})
                continue
            with safe_open(str(f), framework="pt") as shard:
                weights.update({k: shard.get_tensor(k).to(dtype) for k in shard.keys() if only(k)})  # noqa: SIM118 (no __iter__)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f}: cannot read safetensors ({e})") from e
    return weights


def is_vision_weight(name: str) -> bool:
    """A vision-language checkpoint's vision tower or projector tensor."""
    return name.removeprefix("model.").startswith(VISION_PREFIXES)


def generation_eos_ids(model_dir: Path) -> list[int]:
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        value = read_json(model_dir / name, required=False).get("eos_token_id")
        ids += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    return ids


def load_hf_tokenizer(model_dir: Path, chat_template_override: str | None) -> Tokenizer:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise ModelLoadError(f"{path}: tokenizer file is missing")
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception on bad files
        raise ModelLoadError(f"{path}: cannot load tokenizer ({e})") from e
    tok_cfg = read_json(model_dir / "tokenizer_config.json", required=False)
    special = special_tokens_from_hf(backend, tok_cfg, generation_eos_ids(model_dir))
    template = load_chat_template(
        override=chat_template_override,
        model_dir=model_dir,
        gguf_metadata=None,
        tokenizer_config=tok_cfg,
        bos_token=special.bos_token,
        eos_token=special.eos_token,
    )
    return Tokenizer(backend, special, template)


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """Sampling defaults the model's authors chose (generation_config.json)."""
    raw = read_json(model_dir / "generation_config.json", required=False)
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    defaults = {k: raw[k] for k in keys if raw.get(k) is not None}
    if raw.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults
