"""Decoder models as embedders (models/decoder_encoder.py): the Llama-family network
without a cache against transformers' base models on tiny random weights built here,
and last-token pooling through a sentence-transformers directory as Qwen3-Embedding
ships one (Transformer, Pooling lasttoken, Normalize)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mistralrs_serve.errors import UnsupportedModelError
from mistralrs_serve.models.decoder_encoder import load_decoder_encoder
from mistralrs_serve.models.sentence_embedder import load_sentence_embedder

VOCAB = 96


# the shape every tiny model here shares
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)


def _tiny(directory: Path, family: str) -> Any:
    import transformers

    common = COMMON
    if family == "qwen3":
        config: Any = transformers.Qwen3Config(head_dim=16, **common)
        arch = "Qwen3ForCausalLM"
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
        arch = "Qwen2ForCausalLM"
    else:
        config = transformers.LlamaConfig(**common)
        arch = "LlamaForCausalLM"
    config.architectures = [arch]
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    if family == "qwen2":  # random biases, so that their use is checked
        for layer in model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.zeros((len(lengths), max(lengths)), dtype=torch.int64)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    gen = torch.Generator().manual_seed(seed)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=gen)
        mask[i, :n] = True
    return ids, mask


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama"])
def test_hidden_states_match_transformers(tmp_path: Path, family: str) -> None:
    hf = _tiny(tmp_path, family)
    ours = load_decoder_encoder(tmp_path)
    lengths = [7, 2, 13, 1]
    ids, mask = _batch(lengths)
    got = ours.forward(ids, mask)
    for i, n in enumerate(lengths):  # each row alone: transformers' own positions and no padding
        with torch.no_grad():
            want = hf(input_ids=ids[i : i + 1, :n]).last_hidden_state[0]
        diff = (got[i, :n] - want).abs().max().item()
        assert diff <= 2e-4, (family, i, diff)


def _sentence_transformers_dir(directory: Path) -> None:
    """The files sentence-transformers reads beside the model (as Qwen3-Embedding has them),
    and a word-level tokenizer that closes each row with an end token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<end>": 1} | {f"w{i}": i for i in range(2, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A <end>", special_tokens=[("<end>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    (directory / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_lasttoken": True})
    )
    (directory / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))


def test_last_token_pooling_as_qwen3_embedding(tmp_path: Path) -> None:
    hf = _tiny(tmp_path, "qwen3")
    _sentence_transformers_dir(tmp_path)
    embedder = load_sentence_embedder(tmp_path)
    assert embedder.pooling == "lasttoken" and embedder.normalize
    texts = ["w5 w9 w3", "w7", "w2 w4 w6 w8 w10 w12 w14"]
    rows = embedder.tokenize(texts)
    assert all(r[-1] == 1 for r in rows)  # the closing token is what pools
    got = embedder.embed_texts(texts).vectors
    for i, row in enumerate(rows):
        with torch.no_grad():
            last = hf(input_ids=torch.tensor([row])).last_hidden_state[0, -1]
        want = (last / last.norm()).numpy()
        np.testing.assert_allclose(got[i], want, atol=2e-5)


def test_other_families_are_refused(tmp_path: Path) -> None:
    import transformers

    config = transformers.Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=16)
    transformers.AutoModel.from_config(config).save_pretrained(tmp_path, safe_serialization=True)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "architectures": ["Gemma3ForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="decoder embedders"):
        load_decoder_encoder(tmp_path)
