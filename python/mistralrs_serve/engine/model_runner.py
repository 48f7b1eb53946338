"""The seam between the engine and the model. `ModelRunner.execute(plan)` runs one
scheduled step and returns the logits of its sampled rows; `sample` turns them
into tokens. The runner owns the device, the paged KV cache, the forward path
chosen for this model and device (forward_paths.py), and the samplers: the Rust
one on the host, the Triton one where the logits are on a GPU.

A runner for models that do not generate (models.interface.EmbeddingModel)
would take the same plans and return pooled vectors instead of sampling; none
exists yet.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from mistralrs_serve import _native
from mistralrs_serve.config import EngineConfig
from mistralrs_serve.engine.cuda_graphs import DecodeGraphs
from mistralrs_serve.engine.device_sampler import SampledTokens, can_sample_on_device, sample_on_device
from mistralrs_serve.engine.forward_paths import (
    ForwardPath,
    FusedPath,
    GraphPath,
    RowBuffer,
    TorchPath,
    TritonPath,
)
from mistralrs_serve.engine.kv_cache import KVLayout, PagedKVCache
from mistralrs_serve.engine.media import StepMedia
from mistralrs_serve.models.loader import LoadedModel

if TYPE_CHECKING:
    from mistralrs_serve.engine.sequence import Sequence

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """EngineConfig.device: "auto" is the first GPU when torch sees one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU (use --device cpu)")
    return device


class ModelRunner:
    """Runs scheduled steps of one model on one device."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        self.config = config
        self.model = loaded.model
        self.device = resolve_device(config.device)
        if self.model.device != self.device:
            self.model.to(self.device)
        self.use_triton = config.triton if config.triton is not None else self.device.type == "cuda"
        # a vision-language model's steps may carry images: the torch paths take them
        self.takes_media = loaded.vision is not None
        self.multimodal_rope = bool(loaded.config.rope_scaling.mrope_section)
        model_len = loaded.config.max_position_embeddings
        self.max_model_len = min(model_len, config.max_model_len or model_len)
        self.kv_layout = self._kv_layout()
        self.cache = self._allocate_cache()
        self.path = self._choose_path()
        self.sample_rows = RowBuffer()  # the rows the host sampler writes in place
        # Every path reads a windowed layer's blocks from the window's first on (captured
        # decodes only run contexts within the window; the fused forward's tiles from the
        # multiple of 8 before it, so its blocks must be whole multiples of 8), so the
        # scheduler may free those behind it.
        fused_reads_behind = isinstance(self.path, FusedPath) and config.block_size % 8 != 0
        self.kv_window = None if fused_reads_behind else self.model.kv_window()
        # the scheduler's KV groups: [] for one (with kv_window)
        self.kv_groups: list[int | None] = (
            list(self.kv_layout.windows) if self.kv_layout.num_groups > 1 else []
        )
        self.num_kv_tokens = self.kv_layout.max_tokens(
            self.cache.num_blocks, config.block_size, config.max_num_batched_tokens
        )

    def _kv_layout(self) -> KVLayout:
        """KV groups by window where the layers mix windows (Gemma), so the sliding
        layers' blocks go back behind their window: on the CPU paths (Triton's kernels
        and the CUDA graphs take one table), with blocks of whole multiples of 8 (the
        fused tiles' unit), freeing behind windows on, and a budget in which one sequence
        can grow at least as long as in one group. Else one group."""
        config, cfg = self.config, self.model.config
        single = KVLayout.single(cfg.num_layers)
        if not config.free_kv_behind_window or self.use_triton or config.block_size % 8:
            return single
        layout = KVLayout.by_window(self.model.layer_windows())
        if layout.num_groups == 1:
            return single
        budget, bs, chunk = config.kv_cache_mb << 20, config.block_size, config.max_num_batched_tokens

        def longest(lay: KVLayout) -> int:
            blocks = PagedKVCache.num_blocks_for_budget(cfg, bs, self.model.dtype, budget, lay.cache_layers)
            return min(lay.max_tokens(blocks, bs, chunk), self.max_model_len)

        return layout if longest(layout) >= longest(single) else single

    def _allocate_cache(self) -> PagedKVCache:
        """As many blocks as the budget holds, in the model's compute dtype: keys and
        values come out of its matmuls, so a wider cache would only read more bytes."""
        cfg, block_size, dtype = self.model.config, self.config.block_size, self.model.dtype
        layers = self.kv_layout.cache_layers
        budget = self.config.kv_cache_mb << 20
        num_blocks = PagedKVCache.num_blocks_for_budget(cfg, block_size, dtype, budget, layers)
        cache = PagedKVCache(cfg, num_blocks, block_size, dtype, self.device, self.kv_layout)
        groups = self.kv_layout.num_groups
        logger.info(
            "KV cache on %s: %d blocks of %d tokens (%d tokens, %d MiB, %s)%s%s",
            self.device,
            num_blocks,
            block_size,
            num_blocks * block_size,
            num_blocks * PagedKVCache.bytes_per_block(cfg, block_size, dtype, layers) >> 20,
            str(dtype).removeprefix("torch."),
            f"; {groups} KV groups of {layers} layers by window" if groups > 1 else "",
            "; Triton kernels" if self.use_triton else "",
        )
        return cache

    def _choose_path(self) -> ForwardPath:
        """CUDA graphs (with Triton on CUDA, by default), else Triton, else the
        model's fused CPU forward where it has one, else torch."""
        if self.use_triton:
            eager = TritonPath(self.model, self.cache)
            on_cuda = self.device.type == "cuda"
            wanted = self.config.cuda_graphs if self.config.cuda_graphs is not None else on_cuda
            if not wanted:
                return eager
            max_context = min(self.max_model_len, self.config.cuda_graph_max_context)
            graphs = DecodeGraphs(
                self.model, self.cache, self.config.max_num_seqs, max_context, capture=on_cuda
            )
            return GraphPath(graphs, eager)
        if self.device.type == "cpu" and self.config.native_forward and not self.takes_media:
            places = None if self.kv_layout.num_groups == 1 else self.kv_layout.places
            fused = self.model.fused_forward(self.cache.kv_np, places)
            if fused is not None:
                return FusedPath(fused)
        # decode now every weight still kept as the model file's blocks (the torch path would
        # on its first step): from here on nothing reads the mapped file, which may then be
        # replaced, truncated or removed (a read past a truncated mapping is a SIGBUS)
        self.model.to(self.device)
        return TorchPath(self.model, self.cache)

    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads, by whichever path runs it."""
        return self.path.decode_weight_bytes()

    def execute(self, plan: _native.StepPlan, media: StepMedia | None = None) -> torch.Tensor:
        """Run one step: its block copies, then the model; fp32 logits of its sampled rows.
        media: the step's images (engine/media.py)."""
        self.cache.copy_blocks(plan.copy_ops)
        return self.path.forward(plan, media)

    def _sampled_rows(self, logits: np.ndarray, rows: list[int]) -> np.ndarray:
        """logits[rows] for the sampler to write in place. The step's logits are its own and
        read once, so when the rows are its first ones in order (every choice a row of its
        own, the usual step) they are sampled where they are, with no copy (12.6 MB a step
        at 64 rows of a 49k vocabulary); otherwise a copy (a row may serve several choices),
        in memory kept from step to step (RowBuffer says why)."""
        if logits.dtype != np.float32 or logits.ndim != 2:
            return np.ascontiguousarray(logits[rows], dtype=np.float32)
        n = len(rows)
        if logits.flags.c_contiguous and logits.flags.writeable and rows == list(range(n)):
            return logits[:n]
        out = self.sample_rows.rows(n, logits.shape[1])
        # mode="clip" writes straight into `out` ("raise" copies through a buffer of its own);
        # the rows are the step's own, always in range
        return np.take(logits, rows, axis=0, out=out, mode="clip")

    def sample(
        self,
        logits: torch.Tensor,
        rows: list[int],
        seqs: list[Sequence],
        bitmask: np.ndarray | None,
        histories: _native.Scheduler,
    ) -> SampledTokens:
        """One token for each seqs[i] from logits row rows[i] (a row may serve several
        choices), under its grammar's bitmask row. `histories` holds each sequence's
        prompt and generated ids, which the penalties and DRY read in place."""
        if self.use_triton and all(can_sample_on_device(s.request.params) for s in seqs):
            return sample_on_device(logits, rows, seqs, bitmask, histories)
        logits_np = self._sampled_rows(logits.cpu().numpy(), rows)
        if bitmask is not None:
            _native.apply_token_bitmask(logits_np, bitmask)
        return SampledTokens(
            *_native.sample(
                logits_np,
                [s.native for s in seqs],
                [s.num_output_tokens for s in seqs],
                histories,
                [s.seq_id for s in seqs],
            )
        )
