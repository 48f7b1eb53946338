"""POST /v1/embeddings (and the SDK's send_embedding_request): a request's
inputs checked and tokenized, its rows run by the model's EmbeddingEngine
(batched with other requests' rows), and the vectors shaped as OpenAI's list.

OpenAI's rules for `input`: not empty, no empty string, at most 2048 items.
Rows over the model's limit are a 400 naming `input` unless
`truncate_sequence` cuts them. `dimensions` is honoured only for models that
declare Matryoshka sizes (the `matryoshka_dimensions` option): the vector is
cut to that size and renormalized; anything else is a 400 naming it."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Any

import anyio
import numpy as np

from mistralrs_serve.engine.embedding_engine import EmbeddingEngine
from mistralrs_serve.entrypoints.openai.protocol import EmbeddingRequest, EmbeddingResponse
from mistralrs_serve.errors import InvalidRequestError

MAX_INPUTS = 2048  # OpenAI's limit on the items of one request
MAX_REQUEST_TOKENS = 300_000  # OpenAI's limit on one request's tokens, all inputs together


class EmbeddingServing:
    def __init__(
        self, engine: EmbeddingEngine, name: str, vocab_size: int, matryoshka: Sequence[int] = ()
    ) -> None:
        self.engine, self.name, self.vocab_size = engine, name, vocab_size
        self.dim = engine.embedder.dim
        self.matryoshka = sorted({int(d) for d in matryoshka if 0 < int(d) <= self.dim})

    def rows(self, req: EmbeddingRequest) -> list[list[int]]:
        """The token rows of the request's inputs, checked and (where asked) cut."""
        self._check_dimensions(req.dimensions)
        inputs = req.input
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            raise InvalidRequestError("input must not be empty", "input")
        if len(inputs) > MAX_INPUTS:
            raise InvalidRequestError(f"input has {len(inputs)} items; at most {MAX_INPUTS}", "input")
        if isinstance(inputs[0], int):
            inputs = [inputs]  # one row of token ids
        limit = self.engine.embedder.max_seq_length
        truncate = req.truncate_sequence
        if isinstance(inputs[0], str):
            texts: list[str] = inputs
            if any(t == "" for t in texts):
                raise InvalidRequestError("input must not contain an empty string", "input")
            try:
                rows = self.engine.embedder.tokenize(texts, truncate)
            except ValueError as e:  # sentence_embedder.InputTooLong
                raise InvalidRequestError(f"{e}; set truncate_sequence to cut it", "input") from None
        else:
            rows = [list(r) for r in inputs]
            for i, row in enumerate(rows):
                if not row:
                    raise InvalidRequestError(f"input[{i}] is an empty list of tokens", "input")
                if any(not 0 <= t < self.vocab_size for t in row):
                    raise InvalidRequestError(
                        f"input[{i}]: token ids must be in [0, {self.vocab_size})", "input"
                    )
                if len(row) > limit and not truncate:
                    raise InvalidRequestError(
                        f"input {i} has {len(row)} tokens; this model takes at most {limit}; "
                        "set truncate_sequence to cut it",
                        "input",
                    )
            rows = [r[:limit] for r in rows]
        total = sum(len(r) for r in rows)
        if total > MAX_REQUEST_TOKENS:
            raise InvalidRequestError(
                f"the inputs have {total} tokens; at most {MAX_REQUEST_TOKENS}", "input"
            )
        return rows

    def _check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None or (dimensions == self.dim and self.matryoshka):
            return
        if not self.matryoshka:
            raise InvalidRequestError(
                f"dimensions: model {self.name} has no Matryoshka sizes; it makes {self.dim}-dimensional "
                "vectors only (leave dimensions out)",
                "dimensions",
            )
        if dimensions not in self.matryoshka:
            sizes = ", ".join(map(str, self.matryoshka))
            raise InvalidRequestError(f"dimensions must be one of {sizes} for {self.name}", "dimensions")

    def body(self, req: EmbeddingRequest, rows: list[list[int]], vectors: np.ndarray) -> dict[str, Any]:
        """OpenAI's response object (as JSON-ready values)."""
        if req.dimensions is not None and req.dimensions < vectors.shape[1]:
            vectors = vectors[:, : req.dimensions]
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        data: list[dict[str, Any]] = []
        for i, v in enumerate(np.asarray(vectors, dtype=np.float32)):
            embedding: Any = (
                base64.b64encode(v.astype("<f4").tobytes()).decode()
                if req.encoding_format == "base64"
                else v.tolist()
            )
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        tokens = sum(len(r) for r in rows)
        return {
            "object": "list",
            "data": data,
            "model": self.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def create_async(self, req: EmbeddingRequest) -> dict[str, Any]:
        rows = await anyio.to_thread.run_sync(self.rows, req)  # tokenizing long lists takes a while
        vectors = await asyncio.wrap_future(self.engine.submit(rows))
        return self.body(req, rows, vectors)

    def create(self, req: EmbeddingRequest) -> EmbeddingResponse:
        rows = self.rows(req)
        return EmbeddingResponse.model_validate(self.body(req, rows, self.engine.submit(rows).result()))
