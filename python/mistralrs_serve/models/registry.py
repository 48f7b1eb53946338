"""Architectures we run, and how to read their configs from HF and GGUF files.

Adding a model family: a file in models/ with its `CausalLM` class and an
`Architecture` naming it, listed in `_architectures` below."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from mistralrs_serve.config import ModelConfig, RopeScaling
from mistralrs_serve.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

    from mistralrs_serve.layers.linear import AnyWeight
    from mistralrs_serve.models.interface import CausalLM


@dataclass(frozen=True)
class Architecture:
    name: str
    hf_names: tuple[str, ...]  # config.json "architectures"
    gguf_names: tuple[str, ...]  # general.architecture
    # builds the model from its config, its weights by HF name, and the compute dtype
    model: Callable[[ModelConfig, Mapping[str, AnyWeight], torch.dtype], CausalLM]
    attention_bias: bool = False
    qk_norm: bool = False
    # llama.cpp's converter reorders q/k rows of "llama" tensors for its
    # interleaved RoPE; we rotate halves (HF layout) and undo that order.
    gguf_permuted_qk: bool = False
    # whether the family runs sliding-window layers; a family that does not is
    # kept inside the window of a config that has one (max_position_embeddings)
    sliding_window: bool = False
    # ModelConfig fields (and `extra`) the family reads beyond the common ones:
    # from config.json, and from GGUF metadata through `get(key, default)`,
    # which prefixes the file's architecture name, with the file's tensor names
    hf_extra: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    gguf_extra: Callable[[Callable[[str, Any], Any], Collection[str]], dict[str, Any]] | None = None
    # GGUF layer tensor names (blk.N.<name>) beyond gguf_loader's table, and
    # their Hugging Face module names (model.layers.N.<module>)
    gguf_layer_names: Mapping[str, str] = field(default_factory=dict)
    # a GGUF tensor as the family's HF-named weight expects it (llama.cpp's
    # converter changes some: Gemma's norms are stored as 1 + weight)
    gguf_fixup: Callable[[str, AnyWeight, ModelConfig], AnyWeight] | None = None


def _architectures() -> tuple[Architecture, ...]:
    from mistralrs_serve.models import gemma, llama, mistral, mixtral, phi3, qwen2, qwen3, qwen3_moe, smollm3

    return (
        llama.LLAMA,
        qwen2.QWEN2,
        qwen3.QWEN3,
        mistral.MISTRAL,
        mistral.MINISTRAL,
        mistral.MINISTRAL3,
        smollm3.SMOLLM3,
        qwen3_moe.QWEN3_MOE,
        mixtral.MIXTRAL,
        gemma.GEMMA2,
        gemma.GEMMA3,
        phi3.PHI3,
    )


def find_architecture(
    *, hf_name: str | None = None, gguf_name: str | None = None, name: str | None = None
) -> Architecture:
    """By config.json name, GGUF name, or our own (ModelConfig.architecture)."""
    for arch in _architectures():
        if hf_name in arch.hf_names or gguf_name in arch.gguf_names or name == arch.name:
            return arch
    known = sorted(n for a in _architectures() for n in (a.hf_names if hf_name else a.gguf_names))
    raise UnsupportedModelError(
        f"architecture {hf_name or gguf_name or name!r} is not supported (supported: {', '.join(known)})"
    )


def config_from_hf(cfg: Mapping[str, Any], arch: Architecture) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (transformers 4.x and 5.x keys)."""
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true (biases on the MLP projections) is not supported")
    heads = int(cfg["num_attention_heads"])
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window and not arch.sliding_window:
        # No sliding-window attention in this family: stay inside the window instead.
        max_pos = min(max_pos, int(window))
    config = ModelConfig(
        architecture=arch.name,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=RopeScaling.from_dict(rope),
        max_position_embeddings=max_pos,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch.attention_bias or bool(cfg.get("attention_bias", False)),
        qk_norm=arch.qk_norm,
        sliding_window=int(window) if window and arch.sliding_window else None,
    )
    return replace(config, **arch.hf_extra(cfg)) if arch.hf_extra else config


def config_from_gguf(meta: Mapping[str, Any], arch: Architecture, tensors: Collection[str]) -> ModelConfig:
    """ModelConfig from GGUF metadata and the file's tensor names (whether lm_head
    is stored, whether q/k/v biases are: optional in llama.cpp's "llama")."""
    a = meta["general.architecture"]
    has_output, has_qkv_bias = "output.weight" in tensors, "blk.0.attn_q.bias" in tensors

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{a}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling = {
        "rope_type": get("rope.scaling.type", "default"),
        "factor": get("rope.scaling.factor", 1.0),
        "original_max_position_embeddings": get("rope.scaling.original_context_length", 8192),
        # Qwen2-VL's multimodal rotary (llama.cpp writes four sections, the last 0)
        "mrope_section": [int(x) for x in get("rope.dimension_sections", ()) if int(x)],
    }
    if scaling["rope_type"] == "none":
        scaling["rope_type"] = "default"
    window = get("attention.sliding_window")
    config = ModelConfig(
        architecture=arch.name,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=RopeScaling.from_dict(scaling),
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings=not has_output,
        attention_bias=arch.attention_bias or has_qkv_bias,
        qk_norm=arch.qk_norm,
        sliding_window=int(window) if arch.sliding_window and window else None,
    )
    return replace(config, **arch.gguf_extra(get, tensors)) if arch.gguf_extra else config
