"""Random-weight Llama models in Hugging Face layout, for benchmarks where
only the shapes matter (bandwidth, kernel speed): `random:1b` has the shape
of Llama 3.2 1B (1.24 B parameters, 2.5 GB in bf16), `random:tiny` a few MB
for a CPU smoke run. Built on the GPU when there is one (seconds), saved as
safetensors with a word-level tokenizer that covers the whole vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SIZES: dict[str, dict[str, Any]] = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "tiny": dict(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    ),
}


def save_random_llama(directory: Path, size: str, seed: int = 0) -> Path:
    """Write config.json, model.safetensors (bf16), tokenizer.json and
    tokenizer_config.json of a random Llama of `size` into `directory`."""
    import tokenizers
    import transformers
    from tokenizers import models, pre_tokenizers

    if size not in SIZES:
        raise ValueError(f"unknown random model size {size!r}; known: {', '.join(SIZES)}")
    shape = SIZES[size]
    vocab = shape["vocab_size"]
    config = transformers.LlamaConfig(
        **shape,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=vocab - 1,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    words = {f"t{i}": i for i in range(vocab - 1)} | {"</s>": vocab - 1}
    tok = tokenizers.Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "add_bos_token": False}
        )
    )
    return directory
