"""Qwen2 / Qwen2.5: the Llama network with biases on the q, k and v projections."""

from mistralrs_serve.models.llama import LlamaForCausalLM
from mistralrs_serve.models.registry import Architecture

QWEN2 = Architecture(
    name="qwen2",
    hf_names=("Qwen2ForCausalLM",),
    gguf_names=("qwen2",),
    model=LlamaForCausalLM,
    attention_bias=True,
)
