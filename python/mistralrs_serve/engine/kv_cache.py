"""The paged KV cache: one pool of fixed-size blocks that every sequence's keys
and values live in, for every layer. The scheduler (Rust) decides which block
holds which positions; this module only stores them. Attention over the cache
is `layers.attention.PagedAttention`."""

from __future__ import annotations

import numpy as np
import torch

from mistralrs_serve.config import ModelConfig

# cache dtypes the Rust kernels read (bf16 as its int16 bits)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


class PagedKVCache:
    """Keys and values of every layer in one allocation `kv`:
    (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim), so that
    copy-on-write of blocks is one gather/scatter for every layer. Position p of
    a sequence lives at slot block_table[p // block_size] * block_size + p % block_size.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.config = cfg
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        # zeros, not empty: padded decode groups read (masked) positions that no
        # sequence wrote, and 0 * NaN garbage in v would poison the output
        self.kv = torch.zeros(
            (2, cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim),
            dtype=dtype,
            device=device,
        )
        self.k = self.kv[0]  # (num_layers, num_blocks, block_size, K, D); k[layer] is contiguous
        self.v = self.kv[1]
        # numpy views for the Rust kernels: the whole cache (the fused forward) and each layer
        native = dtype in _NATIVE_DTYPES and self.kv.device.type == "cpu"
        bits = self.kv.view(torch.int16) if dtype == torch.bfloat16 else self.kv
        self.kv_np = bits.numpy() if native else None
        self.k_np = [bits[0, i].numpy() for i in range(cfg.num_layers)] if native else []
        self.v_np = [bits[1, i].numpy() for i in range(cfg.num_layers)] if native else []

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers, keys and values."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    @staticmethod
    def num_blocks_for_budget(
        cfg: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int
    ) -> int:
        """Most blocks that fit in budget_bytes (0 if not even one does)."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        return budget_bytes // PagedKVCache.bytes_per_block(cfg, block_size, dtype)

    def copy_blocks(self, pairs: np.ndarray) -> None:
        """Copy block src to block dst in every layer, for each (src, dst) row.

        All sources are read before any destination is written, so a block
        may be both a source and (of another pair) a destination; destinations
        must be distinct.
        """
        pairs = np.asarray(pairs)
        if pairs.size == 0:
            return
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError(f"copy_blocks wants (k, 2) src/dst pairs, got shape {pairs.shape}")
        if pairs.min() < 0 or pairs.max() >= self.num_blocks:
            raise ValueError(f"copy_blocks: block ids must be in [0, {self.num_blocks})")
        if len(np.unique(pairs[:, 1])) != len(pairs):
            raise ValueError("copy_blocks: destination blocks must be distinct")
        idx = torch.from_numpy(pairs.astype(np.int64)).to(self.kv.device)
        self.kv[:, :, idx[:, 1]] = self.kv[:, :, idx[:, 0]]
