"""Torch reference implementations of the ops the kernels provide.

Shapes use T for tokens, H for query heads, K for key/value heads, D for the
head dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in fp32 and cast back."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves of the last dimension: x (T, heads, D), cos/sin (T, 1, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused projection: (..., 2I) -> (..., I)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Causal attention of T new queries over S = start_pos + T keys.

    q (H, T, D); k, v (K, S, D) with H a multiple of K. Query i sits at
    position start_pos + i and sees keys 0..start_pos + i.
    """
    num_queries, num_keys = q.shape[1], k.shape[1]
    gqa = q.shape[0] != k.shape[0]
    if num_queries == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if start_pos == 0:
        # top-left causal alignment is right when nothing precedes the queries
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    rows = torch.arange(num_queries).unsqueeze(1) + start_pos
    mask = torch.arange(num_keys).unsqueeze(0) <= rows  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
