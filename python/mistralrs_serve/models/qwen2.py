"""Qwen2 / Qwen2.5: the Llama network with biases on the q, k and v projections.
Also Qwen2-VL's and Qwen2.5-VL's text model (llama.cpp's "qwen2vl"), whose
multimodal rotary sections come from `rope.dimension_sections`."""

from mistralrs_serve.models.llama import LlamaForCausalLM
from mistralrs_serve.models.registry import Architecture

QWEN2 = Architecture(
    name="qwen2",
    hf_names=("Qwen2ForCausalLM",),
    gguf_names=("qwen2", "qwen2vl"),
    model=LlamaForCausalLM,
    attention_bias=True,
)
