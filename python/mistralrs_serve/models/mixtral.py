"""Mixtral: the Mistral decoder with a top-k mixture of SwiGLU experts in every
layer (the decoder and expert layer are qwen3_moe.py's, without q/k norms).

Routing is a softmax over the chosen experts' logits, scaled in fp32. llama.cpp
writes Mixtral GGUFs as architecture "llama" with expert tensors (and the llama
q/k row order); gguf_loader sends such files here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mistralrs_serve.models.qwen3_moe import EXPERT_GGUF_NAMES, MoeForCausalLM, gguf_moe_extra, moe_extra
from mistralrs_serve.models.registry import Architecture


class MixtralForCausalLM(MoeForCausalLM):
    fp32_router_weights = True


def _hf_extra(cfg: Mapping[str, Any]) -> dict[str, Any]:
    num_experts = int(cfg.get("num_local_experts", cfg.get("num_experts", 0)) or 0)
    return moe_extra(
        num_experts,
        int(cfg.get("num_experts_per_tok", 0)),
        int(cfg["intermediate_size"]),
        True,
        range(int(cfg["num_hidden_layers"])),
        ("num_local_experts", "num_experts_per_tok"),
    )


MIXTRAL = Architecture(
    name="mixtral",
    hf_names=("MixtralForCausalLM",),
    gguf_names=(),  # never its own GGUF name: "llama" files with experts
    model=MixtralForCausalLM,
    gguf_permuted_qk=True,
    sliding_window=True,
    hf_extra=_hf_extra,
    gguf_extra=gguf_moe_extra,
    gguf_layer_names=EXPERT_GGUF_NAMES,
)
