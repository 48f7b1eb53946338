"""Text embeddings as sentence-transformers computes them, from its model directory:
`modules.json` names the modules in order (the transformer, `Pooling`, optionally
`Normalize`), `1_Pooling/config.json` the pooling (mean, CLS, max, last token, mean
over sqrt(len)), `sentence_bert_config.json` the longest input (`max_seq_length`).
The transformer is the project's own BERT encoder (models/bert.py), or for a decoder
model (Qwen3-Embedding: last-token pooling) the Llama-family network run without a
cache (models/decoder_encoder.py); the tokenizer is the directory's tokenizer.json
with its special tokens ([CLS] ... [SEP], or the decoder's closing token).

Inputs are texts or token ids. Rows longer than `max_seq_length` are cut to it
where `truncate` allows, else refused; batches are formed from rows of similar length
(sorted), padded to their longest, so a row's vector does not depend on its neighbours
beyond float rounding."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import tokenizers
import torch

from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.models.bert import load_bert

POOLINGS = ("cls", "mean", "max", "lasttoken", "mean_sqrt_len")
# Padded tokens per forward call at most. The encoder's products run over the real
# tokens only (bert.py packs them), so padding costs only attention: large calls
# win (best of 15 here, 2 threads: 32 short sentences 407/s in calls of 512, 438/s
# in one of 4096; 256 sentences 397/s and 433/s). A call is a row at least.
BATCH_TOKENS = 4096


class InputTooLong(ValueError):
    """A row over the model's limit, with truncation off."""

    def __init__(self, index: int, length: int, limit: int) -> None:
        super().__init__(f"input {index} has {length} tokens; this model takes at most {limit}")
        self.index, self.length, self.limit = index, length, limit


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (rows, dim) float32
    token_counts: list[int]  # tokens each row took, special tokens included (usage)


class EncoderShape(Protocol):
    @property
    def hidden_size(self) -> int: ...

    @property
    def max_position_embeddings(self) -> int: ...


class Encoder(Protocol):
    """The transformer under the pooling: models/bert.py's encoder, or a decoder
    (models/decoder_encoder.py) whose last token pools."""

    @property
    def config(self) -> EncoderShape: ...

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...


class SentenceEmbedder:
    def __init__(
        self,
        encoder: Encoder,
        tokenizer: tokenizers.Tokenizer,
        pooling: str,
        normalize: bool,
        max_seq_length: int,
    ) -> None:
        if pooling not in POOLINGS:
            raise UnsupportedModelError(f"pooling {pooling!r}: one of {', '.join(POOLINGS)}")
        self.encoder, self.tokenizer = encoder, tokenizer
        self.pooling, self.normalize = pooling, normalize
        self.max_seq_length = min(max_seq_length, encoder.config.max_position_embeddings)
        self.dim = encoder.config.hidden_size
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.batch_tokens = BATCH_TOKENS
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad  # masked everywhere: any id will do
        self._truncating = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        self._truncating.enable_truncation(self.max_seq_length)

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids of each text, special tokens included; a text over the limit cut to
        it as sentence-transformers cuts (the closing special token kept) where `truncate`,
        else refused."""
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]
        over = [i for i, row in enumerate(rows) if len(row) > self.max_seq_length]
        if over and not truncate:
            raise InputTooLong(over[0], len(rows[over[0]]), self.max_seq_length)
        if over:
            cut = self._truncating.encode_batch([texts[i] for i in over], add_special_tokens=True)
            for i, e in zip(over, cut, strict=True):
                rows[i] = e.ids
        return rows

    def embed_texts(self, texts: Sequence[str], truncate: bool = True) -> Embeddings:
        """One vector per text, in order."""
        return self.embed_ids(self.tokenize(texts, truncate), truncate)

    def embed_ids(
        self, rows: Sequence[Sequence[int]], truncate: bool = True, batch_tokens: int = BATCH_TOKENS
    ) -> Embeddings:
        """One vector per row of token ids, taken as they are (no special tokens added), in
        order; a row over the limit cut to it where `truncate`, else refused."""
        limit = self.max_seq_length
        for i, row in enumerate(rows):
            if len(row) > limit and not truncate:
                raise InputTooLong(i, len(row), limit)
        ids = [list(row[:limit]) for row in rows]
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        start = 0
        while start < len(order):
            end, longest = start + 1, max(1, len(ids[order[start]]))
            # rows sorted by length: a batch grows while its padded size fits the budget
            while end < len(order) and (end - start + 1) * max(longest, len(ids[order[end]])) <= batch_tokens:
                longest = max(longest, len(ids[order[end]]))
                end += 1
            chosen = order[start:end]
            out[chosen] = self._batch([ids[i] for i in chosen])
            start = end
        return Embeddings(out, [len(row) for row in ids])

    def vectors(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """The (rows, dim) vectors of rows already within the limit (the engine's call)."""
        return self.embed_ids(rows, batch_tokens=self.batch_tokens).vectors

    def _batch(self, rows: list[list[int]]) -> np.ndarray:
        length = max(1, max(len(r) for r in rows))
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
            mask[i, : len(r)] = True
        hidden = self.encoder.forward(input_ids, mask)
        pooled = pool(hidden, mask, self.pooling)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
        return pooled.numpy()


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, H) states and the (B, L) mask of real tokens -> (B, H), as sentence-transformers pools."""
    m = mask[..., None].to(hidden.dtype)
    counts = m.sum(1).clamp(min=1e-9)
    if how == "cls":
        return hidden[:, 0]
    if how == "lasttoken":
        last = mask.sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    if how == "max":
        return hidden.masked_fill(~mask[..., None], -1e9).amax(1)
    total = (hidden * m).sum(1)
    return total / counts if how == "mean" else total / counts.sqrt()


def load_sentence_embedder(
    directory: Path,
    *,
    max_batch_tokens: int | None = None,
    max_seq_length: int | None = None,
    pooling: str | None = None,
    normalize: bool | None = None,
) -> SentenceEmbedder:
    """A sentence-transformers directory (modules.json with a Transformer, a Pooling and
    maybe a Normalize), or a plain BERT directory (mean pooling, normalized). The
    keywords override what the directory says (a server config's options)."""
    embedder = _load(directory)
    if pooling is not None:
        if pooling not in POOLINGS:
            raise UnsupportedModelError(f"pooling {pooling!r}: one of {', '.join(POOLINGS)}")
        embedder.pooling = pooling
    if normalize is not None:
        embedder.normalize = normalize
    if max_seq_length is not None:
        embedder.max_seq_length = min(max_seq_length, embedder.max_seq_length)
        embedder._truncating.enable_truncation(embedder.max_seq_length)
    if max_batch_tokens is not None:
        embedder.batch_tokens = max(1, max_batch_tokens)
    return embedder


def _load(directory: Path) -> SentenceEmbedder:
    modules_path = directory / "modules.json"
    pooling, normalize, max_len = "mean", True, 512
    if modules_path.is_file():
        modules = json.loads(modules_path.read_text())
        kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
        if (
            not kinds
            or kinds[0] != "Transformer"
            or any(k not in ("Pooling", "Normalize") for k in kinds[1:])
        ):
            raise UnsupportedModelError(
                f"{directory}: modules {kinds}: Transformer, Pooling and Normalize are supported"
            )
        normalize = "Normalize" in kinds
        pool_module = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
        if pool_module is not None:
            pooling = _pooling_of(json.loads((directory / pool_module["path"] / "config.json").read_text()))
    st_config = directory / "sentence_bert_config.json"
    if st_config.is_file():
        max_len = int(json.loads(st_config.read_text()).get("max_seq_length") or max_len)
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ModelLoadError(f"{directory}: no tokenizer.json")
    tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return SentenceEmbedder(_encoder(directory), tokenizer, pooling, normalize, max_len)


def _encoder(directory: Path) -> Encoder:
    """BERT for `model_type` bert, else a decoder of the Llama family."""
    config = directory / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type in (None, "bert"):
        return load_bert(directory)
    from mistralrs_serve.models.decoder_encoder import FAMILIES, load_decoder_encoder

    if model_type in FAMILIES:
        return load_decoder_encoder(directory)
    raise UnsupportedModelError(
        f"{directory}: model_type {model_type!r}: embedders are BERT encoders or decoders of "
        f"the families {', '.join(FAMILIES)}"
    )


def _pooling_of(cfg: dict[str, object]) -> str:
    if "pooling_mode" in cfg:
        mode = str(cfg["pooling_mode"])
        return {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}.get(mode, mode)
    chosen = [
        name
        for key, name in (
            ("pooling_mode_cls_token", "cls"),
            ("pooling_mode_mean_tokens", "mean"),
            ("pooling_mode_max_tokens", "max"),
            ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"),
            ("pooling_mode_lasttoken", "lasttoken"),
        )
        if cfg.get(key)
    ]
    if len(chosen) != 1:
        raise UnsupportedModelError(f"pooling modes {chosen or 'none'}: exactly one is supported")
    return chosen[0]
