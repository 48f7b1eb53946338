"""Rotary position embedding with positions per token, neox or GPT-J layout."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_kernels._checks import FLOAT_DTYPES, check_tensor, need, next_power_of_2, same_device


@triton.jit
def _rope_kernel(
    x_ptr,
    out_ptr,
    pos_ptr,
    cache_ptr,
    num_heads,
    head_dim,
    max_pos,
    NEOX: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = head_dim // 2
    i = tl.arange(0, HALF_BLOCK)
    mask = i < half
    pos = tl.load(pos_ptr + token).to(tl.int64)
    pos = tl.minimum(tl.maximum(pos, 0), max_pos - 1)  # the launcher rejects bad positions
    cos = tl.load(cache_ptr + pos * head_dim + i, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * head_dim + half + i, mask=mask, other=0.0).to(tl.float32)
    base = (token * num_heads + head) * head_dim
    if NEOX:
        first, second = i, i + half
    else:
        first, second = 2 * i, 2 * i + 1
    x1 = tl.load(x_ptr + base + first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + base + second, mask=mask, other=0.0).to(tl.float32)
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + base + first, (x1 * cos - x2 * sin).to(ty), mask=mask)
    tl.store(out_ptr + base + second, (x2 * cos + x1 * sin).to(ty), mask=mask)


def rope(
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    neox: bool = True,
    check_positions: bool = True,
) -> torch.Tensor:
    """x (T, heads, D) rotated at positions (T,); cos_sin_cache (max_pos, D) holds
    cos in its first D/2 columns and sin in the rest. neox rotates the halves
    of each head, GPT-J interleaved pairs. check_positions reads the positions'
    range back to the host (a device sync); the kernel clamps them either way."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("positions", positions, ndim=1, dtypes=(torch.int32, torch.int64))
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=FLOAT_DTYPES)
    same_device(x=x, positions=positions, cos_sin_cache=cos_sin_cache)
    tokens, heads, d = x.shape
    need(d % 2 == 0, f"head_dim must be even, got x {tuple(x.shape)}")
    need(
        positions.shape[0] == tokens,
        f"positions {tuple(positions.shape)} must have one entry per token of x {tuple(x.shape)}",
    )
    need(
        cos_sin_cache.shape[1] == d,
        f"cos_sin_cache {tuple(cos_sin_cache.shape)} must have head_dim {d} columns",
    )
    if check_positions and tokens:
        lo, hi = int(positions.min()), int(positions.max())
        need(
            lo >= 0 and hi < cos_sin_cache.shape[0],
            f"positions must be in [0, {cos_sin_cache.shape[0]}), got [{lo}, {hi}]",
        )
    out = torch.empty_like(x)
    if tokens and heads:
        _rope_kernel[(tokens, heads)](
            x,
            out,
            positions,
            cos_sin_cache,
            heads,
            d,
            cos_sin_cache.shape[0],
            NEOX=neox,
            HALF_BLOCK=next_power_of_2(d // 2),
        )
    return out
