"""What the engine needs of a model family. A family is a file in models/ whose
class satisfies `CausalLM`, plus an `Architecture` entry (registry.py) that
names the class: the engine's runner calls nothing else."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from mistralrs_serve.config import ModelConfig
from mistralrs_serve.layers.attention import AttentionBackend, LayerAttention

if TYPE_CHECKING:
    from mistralrs_serve.engine.media import StepMedia

# per layer, its KV group and its place in a cache block (engine/kv_cache.KVLayout.places)
KVPlaces = tuple[tuple[int, int], ...]


class FusedForward(Protocol):
    """A whole step in one native call over the paged cache (the Llama family's
    is models/llama_native.py): every token a row with its own position, slot and
    block table; a prefill chunk's rows attend causally together."""

    weight_bytes: int  # what one decode step reads
    vocab: int

    def forward(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        block_tables: np.ndarray,
        context_lens: np.ndarray,
        logit_rows: np.ndarray,
        out: np.ndarray | None = None,
    ) -> torch.Tensor:
        """fp32 logits (len(logit_rows), vocab); block_tables and context_lens per row. With
        `out` (a C-contiguous fp32 array of that shape) they are written there, and the
        tensor shares its memory."""
        ...


class CausalLM(Protocol):
    """Token ids and positions in, logits of the selected rows out.

    A family that serves as a vision-language model's text model (Llama's
    network, so Qwen2; Gemma) also takes `media`: image embeddings that replace
    the rows of their placeholder tokens, and multimodal rotary positions
    (engine/media.py). The runner passes it only on steps that have images.
    """

    config: ModelConfig
    dtype: torch.dtype
    device: torch.device

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        logits_indices: torch.Tensor,
        int4_rows: torch.Tensor | None = None,
        media: StepMedia | None = None,
    ) -> torch.Tensor:
        """input_ids/positions (T,) -> fp32 logits (len(logits_indices), vocab).
        int4_rows: the rows of a mixed step that take the 4-bit kernel (layers.linear)."""
        ...

    def to(self, device: torch.device | str) -> CausalLM:
        """Move every weight, in place."""
        ...

    def use_triton(self) -> None:
        """Run the layers that have Triton kernels on them from now on."""
        ...

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads."""
        ...

    def fused_forward(self, kv: np.ndarray | None, kv_layout: KVPlaces | None = None) -> FusedForward | None:
        """The family's fused native step over the cache `kv` (PagedKVCache.kv_np), each
        layer at its (KV group, place) of `kv_layout` (None: one group, in order), or
        None where it has none or it does not apply (device, weights, CPU)."""
        ...

    def layer_windows(self) -> list[int | None]:
        """Each layer's sliding window (None: it sees every key), for the KV groups."""
        ...

    def kv_window(self) -> int | None:
        """The window of keys every layer attends within, or None where a layer sees
        them all: with one, the scheduler frees a sequence's KV blocks behind it."""
        ...


def every_layer_window(hows: Iterable[LayerAttention]) -> int | None:
    """The widest window when every layer has one (what the cache must keep), else None."""
    windows = [how.window for how in hows]
    bounded = [w for w in windows if w is not None]
    return max(bounded) if bounded and len(bounded) == len(windows) else None


class EmbeddingModel(Protocol):
    """Room for families that do not generate (embedding models): a runner for
    them would run the same plans but pool hidden states instead of sampling.
    Nothing implements it yet."""

    config: ModelConfig

    def embed(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionBackend,
        query_lens: torch.Tensor,
    ) -> torch.Tensor:
        """One pooled vector per sequence of the step: (len(query_lens), hidden)."""
        ...
