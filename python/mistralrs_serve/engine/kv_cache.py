"""The paged KV cache: one pool of fixed-size blocks that every sequence's keys
and values live in, for every layer. The scheduler (Rust) decides which block
holds which positions; this module only stores them. Attention over the cache
is `layers.attention.PagedAttention`.

A model whose layers mix windows (Gemma: sliding and global layers) can split its
layers into KV groups (`KVLayout`): a block then holds one group's layers, each group
has its own block table per sequence, and a windowed group's tables give their
blocks back behind the window while a global group's keep them (the scheduler's
`kv_groups`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mistralrs_serve.config import ModelConfig


@dataclass(frozen=True)
class KVLayout:
    """Per layer its KV group and its place in a block of the cache; per group the
    window its layers attend within (None: a group of global layers)."""

    places: tuple[tuple[int, int], ...]
    windows: tuple[int | None, ...]

    @staticmethod
    def single(num_layers: int, window: int | None = None) -> KVLayout:
        """Every layer in one group, in order: a block holds every layer."""
        return KVLayout(tuple((0, i) for i in range(num_layers)), (window,))

    @staticmethod
    def by_window(layer_windows: list[int | None]) -> KVLayout:
        """The layers of each window (None: global) in groups as large as the fewest
        layers of any window, in the order the windows first appear: Gemma-3-270M's 15
        sliding and 3 global layers make five sliding groups and a global one, of 3
        layers each. One window: a single group."""
        by: dict[int | None, list[int]] = {}
        for i, w in enumerate(layer_windows):
            by.setdefault(w, []).append(i)
        if len(by) <= 1:
            return KVLayout.single(len(layer_windows), next(iter(by), None))
        size = min(len(layers) for layers in by.values())
        places: dict[int, tuple[int, int]] = {}
        windows: list[int | None] = []
        for w, layers in by.items():
            for start in range(0, len(layers), size):
                for place, layer in enumerate(layers[start : start + size]):
                    places[layer] = (len(windows), place)
                windows.append(w)
        return KVLayout(tuple(places[i] for i in range(len(layer_windows))), tuple(windows))

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def cache_layers(self) -> int:
        """Layers one block holds: the most places a group takes."""
        return 1 + max((place for _, place in self.places), default=0)

    def blocks_for(self, tokens: int, block_size: int, chunk: int) -> int:
        """Blocks one sequence of `tokens` holds at most while computed in chunks of
        `chunk` tokens (the least pool `max_tokens` gives it in)."""
        every = -(-tokens // block_size)
        held = [every if w is None else min(every, -(-(w + chunk) // block_size) + 1) for w in self.windows]
        return sum(held)

    def max_tokens(self, num_blocks: int, block_size: int, chunk: int) -> int:
        """The longest sequence the pool holds alone while computing it in chunks of
        `chunk` tokens: a windowed group keeps its window and a chunk, a global one all."""
        windowed = [w for w in self.windows if w is not None]
        held = sum(-(-(w + chunk) // block_size) + 1 for w in windowed)
        global_groups = self.num_groups - len(windowed)
        if global_groups == 0:
            return num_blocks * block_size if held <= num_blocks else 0
        return max(0, (num_blocks - held) // global_groups * block_size)


# cache dtypes the Rust kernels read (bf16 as its int16 bits)
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


class PagedKVCache:
    """Keys and values of every layer in one allocation `kv`:
    (2, cache_layers, num_blocks, block_size, num_kv_heads, head_dim), so that
    copy-on-write of blocks is one gather/scatter for every layer. Position p of
    a sequence lives at slot block_table[p // block_size] * block_size + p % block_size.
    With a `layout` of several KV groups, a block holds one group's layers at their
    places (cache_layers of them), and each group has its own tables and slots.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        layout: KVLayout | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.config = cfg
        self.layout = layout or KVLayout.single(cfg.num_layers)
        if len(self.layout.places) != cfg.num_layers:
            raise ValueError(f"a KV layout of {len(self.layout.places)} layers for {cfg.num_layers}")
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        layers = self.layout.cache_layers
        # zeros, not empty: padded decode groups read (masked) positions that no
        # sequence wrote, and 0 * NaN garbage in v would poison the output
        self.kv = torch.zeros(
            (2, layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim),
            dtype=dtype,
            device=device,
        )
        self.k = self.kv[0]  # (cache_layers, num_blocks, block_size, K, D); k[place] is contiguous
        self.v = self.kv[1]
        # numpy views for the Rust kernels: the whole cache (the fused forward) and each place
        native = dtype in _NATIVE_DTYPES and self.kv.device.type == "cpu"
        bits = self.kv.view(torch.int16) if dtype == torch.bfloat16 else self.kv
        self.kv_np = bits.numpy() if native else None
        self.k_np = [bits[0, i].numpy() for i in range(layers)] if native else []
        self.v_np = [bits[1, i].numpy() for i in range(layers)] if native else []

    @staticmethod
    def bytes_per_block(
        cfg: ModelConfig, block_size: int, dtype: torch.dtype, cache_layers: int | None = None
    ) -> int:
        """Bytes one block takes over the layers it holds (every layer by default), keys
        and values."""
        elem = torch.empty((), dtype=dtype).element_size()
        layers = cfg.num_layers if cache_layers is None else cache_layers
        return 2 * layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    @staticmethod
    def num_blocks_for_budget(
        cfg: ModelConfig,
        block_size: int,
        dtype: torch.dtype,
        budget_bytes: int,
        cache_layers: int | None = None,
    ) -> int:
        """Most blocks that fit in budget_bytes (0 if not even one does)."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        return budget_bytes // PagedKVCache.bytes_per_block(cfg, block_size, dtype, cache_layers)

    def copy_blocks(self, pairs: np.ndarray) -> None:
        """Copy block src to block dst in every layer (place), for each (src, dst) row.

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
