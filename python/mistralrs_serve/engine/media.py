"""Prompts with images: where each image's embeddings go in the prompt, and what
one step of the model needs of them.

A request's `PromptMedia` is fixed when its prompt is checked: per image the
first prompt position of its placeholder tokens, the embeddings that replace
them (one row per token, from the family's vision encoder), a digest that keeps
prompts differing only in their images apart in the prefix cache, and whether
the image's tokens attend to each other both ways (Gemma 3). A model with
multimodal rotary positions (Qwen2-VL) also gets each prompt token's three
rotary positions and the shift of every later token.

Each step, `step_media` gathers from the requests in the plan the rows whose
embeddings are replaced, the bidirectional position ranges of each sequence
and, where the model rotates by three positions, those of every token: the
`StepMedia` the forward path hands to the model and the attention backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mistralrs_serve.layers.attention_plan import Spans


@dataclass(frozen=True)
class PlacedImage:
    """One image of a prompt: its embeddings stand at positions start..start + len."""

    start: int
    embeddings: torch.Tensor  # (tokens, text hidden), on the CPU
    key: int  # a 64-bit digest of the picture, for the prefix cache
    bidirectional: bool  # its tokens see each other both ways (Gemma 3)

    @property
    def end(self) -> int:
        return self.start + self.embeddings.shape[0]


@dataclass(frozen=True)
class PromptMedia:
    images: tuple[PlacedImage, ...]
    # (3, prompt length) temporal/row/column rotary positions (multimodal rotary models),
    # and what a position past the prompt adds to itself in all three
    rope_positions: np.ndarray | None = None
    rope_delta: int = 0

    def spans(self) -> list[tuple[int, int, int, bool]]:
        """The scheduler's content spans (start, end, key, whole)."""
        return [(im.start, im.end, im.key, im.bidirectional) for im in self.images]

    def rope_at(self, positions: np.ndarray) -> np.ndarray:
        """(3, len(positions)) rotary positions of prompt or generated positions."""
        assert self.rope_positions is not None
        prompt_len = self.rope_positions.shape[1]
        inside = positions < prompt_len
        out = np.repeat((positions + self.rope_delta)[None, :], 3, axis=0)
        out[:, inside] = self.rope_positions[:, positions[inside]]
        return out


@dataclass(frozen=True)
class StepMedia:
    """What the model and its attention need of a step's images (see module doc)."""

    rows: torch.Tensor | None  # (R,) rows of the step's tokens whose embeddings are replaced
    embeddings: torch.Tensor | None  # (R, hidden)
    # per sequence of the plan, the position ranges [start, end) whose tokens attend both ways
    bidirectional: Spans
    rope_positions: torch.Tensor | None  # (3, T) for a multimodal rotary model, else None

    @property
    def has_bidirectional(self) -> bool:
        return any(self.bidirectional)


def step_media(
    query_lens: np.ndarray,
    context_lens: np.ndarray,
    num_tokens: int,
    media: Sequence[PromptMedia | None],
    multimodal_rope: bool,
    device: torch.device,
) -> StepMedia:
    """The StepMedia of a plan whose i-th sequence's prompt media is media[i] (None:
    text only). A chunk takes the rows of every image it overlaps; a position past
    a prompt's images takes none."""
    rows: list[np.ndarray] = []
    pieces: list[torch.Tensor] = []
    bidirectional: list[tuple[tuple[int, int], ...]] = []
    rope = np.zeros((3, num_tokens), dtype=np.int64) if multimodal_rope else None
    row = 0
    for q_len, ctx, m in zip(query_lens.tolist(), context_lens.tolist(), media, strict=True):
        first = ctx - q_len
        spans: list[tuple[int, int]] = []
        if m is not None:
            for im in m.images:
                lo, hi = max(first, im.start), min(ctx, im.end)
                if lo < hi:
                    rows.append(np.arange(row + lo - first, row + hi - first))
                    pieces.append(im.embeddings[lo - im.start : hi - im.start])
                if im.bidirectional and im.start < ctx:
                    spans.append((im.start, im.end))
        bidirectional.append(tuple(spans))
        if rope is not None:
            positions = np.arange(first, ctx)
            use = m is not None and m.rope_positions is not None
            rope[:, row : row + q_len] = m.rope_at(positions) if use else positions  # type: ignore[union-attr]
        row += q_len
    row_t = emb_t = None
    if rows:
        row_t = torch.from_numpy(np.concatenate(rows)).to(device)
        emb_t = torch.cat(pieces).to(device)
    rope_t = None if rope is None else torch.from_numpy(rope).to(device)
    return StepMedia(row_t, emb_t, tuple(bidirectional), rope_t)
