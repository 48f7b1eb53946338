"""Load a model, its tokenizer and chat template from one GGUF file."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mistralrs_serve.config import ModelConfig
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.layers.block_weight import BlockWeight
from mistralrs_serve.layers.linear import AnyWeight, Q4Weight
from mistralrs_serve.models.gguf_file import GGUFFile
from mistralrs_serve.models.gguf_quants import DECODERS, check_length, dequantize
from mistralrs_serve.models.progress import progress
from mistralrs_serve.models.registry import Architecture, config_from_gguf, find_architecture
from mistralrs_serve.tokenizer.chat_template import load_chat_template
from mistralrs_serve.tokenizer.gguf_tokenizer import tokenizer_from_gguf
from mistralrs_serve.tokenizer.tokenizer import Tokenizer

# GGUF tensor names -> Hugging Face names (N is the layer index).
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
    "rope_factors_long.weight": "rope_factors_long",
    "rope_factors_short.weight": "rope_factors_short",
}
# Phi-3's LongRoPE divisors stay fp32: in bf16 a 128k-token position's angle would move by up to 0.4%
_FP32_TARGETS = ("rope_factors_long", "rope_factors_short")
_DENSE_TYPES = ("F32", "F16", "BF16")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp writes Mixtral as "llama" with expert tensors: our family of that name
_EXPERT_FAMILIES = {"llama": "mixtral"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str, arch: Architecture | None = None) -> str | None:
    """The Hugging Face name of a GGUF tensor (the family's own layer names first)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if not m:
        return None
    module = (arch.gguf_layer_names if arch else {}).get(m.group(2)) or _LAYER_NAMES.get(m.group(2))
    return f"model.layers.{m.group(1)}.{module}.{m.group(3)}" if module else None


def unpermute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order for interleaved RoPE: back to rotate-halves."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[GGUFFile, Architecture, ModelConfig]:
    gguf = GGUFFile(path)
    arch_name = gguf.architecture
    try:
        arch = find_architecture(gguf_name=arch_name)
        if arch_name in _EXPERT_FAMILIES and gguf.metadata.get(f"{arch_name}.expert_count"):
            arch = find_architecture(name=_EXPERT_FAMILIES[arch_name])
        cfg = config_from_gguf(gguf.metadata, arch, gguf.tensors.keys())
    except ModelLoadError as e:  # unsupported architecture, invalid config: say which file
        raise type(e)(f"{path}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: GGUF metadata lacks or garbles a model setting ({e})") from e
    return gguf, arch, cfg


def load_gguf_weights(
    gguf: GGUFFile, arch: Architecture, cfg: ModelConfig, dtype: torch.dtype
) -> dict[str, AnyWeight]:
    """Weights under Hugging Face names. Quantized matrices stay the file's blocks
    (`BlockWeight`, views of the mapped file: decoded or repacked by whoever uses
    them); other tensors are decoded now."""
    weights: dict[str, AnyWeight] = {}
    for name, info in progress(list(gguf.tensors.items()), "loading GGUF tensors", "tensor"):
        target = hf_name(name, arch)
        if target is None:
            continue
        try:
            w: AnyWeight
            if len(info.shape) == 2 and info.type_name not in _DENSE_TYPES:
                check_length(gguf.raw(name), info)
                if info.type_name not in DECODERS:  # refused now, not at the first forward
                    raise UnsupportedModelError(
                        f"tensor {name!r}: GGML type {info.type_name} is not supported"
                    )
                w = BlockWeight.of(info.type_name, gguf.raw(name), *info.shape)
            else:
                w = dequantize(gguf.raw(name), info, torch.float32 if target in _FP32_TARGETS else dtype)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{gguf.path}: {e}") from e
        heads = _permuted_heads(arch, cfg, target)
        if heads:
            w = _unpermute(w, heads)
        weights[target] = arch.gguf_fixup(target, w, cfg) if arch.gguf_fixup else w
    return weights


def _permuted_heads(arch: Architecture, cfg: ModelConfig, target: str) -> int:
    if not arch.gguf_permuted_qk:
        return 0
    return cfg.num_heads if ".q_proj." in target else cfg.num_kv_heads if ".k_proj." in target else 0


def _unpermute(w: AnyWeight, heads: int) -> AnyWeight:
    if isinstance(w, Q4Weight | BlockWeight):
        return w.map_rows(lambda t: unpermute_qk(t, heads))
    return unpermute_qk(w, heads)


def load_gguf_tokenizer(gguf: GGUFFile, chat_template_override: str | None) -> Tokenizer:
    backend, special = tokenizer_from_gguf(gguf.metadata, str(gguf.path))
    template = load_chat_template(
        override=chat_template_override,
        model_dir=None,
        gguf_metadata=gguf.metadata,
        tokenizer_config=None,
        bos_token=special.bos_token,
        eos_token=special.eos_token,
    )
    return Tokenizer(backend, special, template)
