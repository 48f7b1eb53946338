"""Qwen3: the Llama network with an RMSNorm on each query and key head before RoPE."""

from mistralrs_serve.models.llama import LlamaForCausalLM
from mistralrs_serve.models.registry import Architecture

QWEN3 = Architecture(
    name="qwen3",
    hf_names=("Qwen3ForCausalLM",),
    gguf_names=("qwen3",),
    model=LlamaForCausalLM,
    qk_norm=True,
)
