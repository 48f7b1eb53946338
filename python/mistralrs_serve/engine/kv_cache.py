"""KV cache of one sequence in contiguous tensors (single-request path).

Layout per layer: (num_kv_heads, max_len, head_dim), so the first S
positions of a head are one contiguous slab that attention reads directly.
"""

from __future__ import annotations

import torch
from mistralrs_kernels import reference as ops

from mistralrs_serve.config import ModelConfig


class ContiguousKVCache:
    def __init__(self, cfg: ModelConfig, max_len: int, dtype: torch.dtype) -> None:
        shape = (cfg.num_layers, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.num_cached = 0  # positions filled before the current step
        self.num_new = 0  # tokens of the current step

    def begin_step(self, num_new: int) -> None:
        if self.num_cached + num_new > self.max_len:
            raise ValueError(
                f"KV cache holds {self.max_len} positions; step needs {self.num_cached + num_new}"
            )
        self.num_new = num_new

    def end_step(self) -> None:
        self.num_cached += self.num_new
        self.num_new = 0

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start, end = self.num_cached, self.num_cached + self.num_new
        self.k[layer_idx, :, start:end] = k.transpose(0, 1)
        self.v[layer_idx, :, start:end] = v.transpose(0, 1)
        q_t = q.transpose(0, 1).to(self.k.dtype)  # (H, T, D)
        out = ops.attention(q_t, self.k[layer_idx, :, :end], self.v[layer_idx, :, :end], start)
        return out.transpose(0, 1).reshape(q.shape[0], -1).to(q.dtype)  # (T, H * D)
