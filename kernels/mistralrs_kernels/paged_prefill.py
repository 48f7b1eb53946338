"""Prefill and mixed attention over the paged KV cache: every sequence of a
step at once, each with its own number of new query tokens (1 for a decode,
a chunk for a prefill) and its own cached prefix.

Layout: q (T, H, D) with each sequence's query rows contiguous, in order
(`cu_query_lens` (S + 1,) gives their starts; rows past the last are padding
and left untouched); k_cache/v_cache (num_blocks, block_size, K, D) already
holding the new tokens; block_tables (S, max_blocks); context_lens (S,) the
positions cached after this step. Query row i of sequence s sits at position
context_lens[s] - q_len + i and attends to positions <= its own (causal).
One program per (sequence, BLOCK_M query rows, query head); online softmax
over BLOCK_N positions per iteration, stopping at the block's causal limit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_kernels._checks import FLOAT_DTYPES, check_tensor, need, next_power_of_2, same_device
from mistralrs_kernels.paged_attention import attend_tile

BLOCK_M = 16
BLOCK_N = 32


@triton.jit
def _paged_prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    tables_ptr,
    cu_ptr,
    ctx_ptr,
    scale,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_ptr + seq).to(tl.int64)
    q_len = tl.load(cu_ptr + seq + 1).to(tl.int64) - q_start
    if m_block * BLOCK_M < q_len:
        ctx = tl.load(ctx_ptr + seq).to(tl.int64)
        kv_head = head // (num_heads // num_kv_heads)
        m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = m < q_len
        d = tl.arange(0, BLOCK_D)
        d_mask = d < head_dim
        q_rows = (q_start + m) * num_heads + head
        q = tl.load(
            q_ptr + q_rows[:, None] * head_dim + d[None, :], mask=m_mask[:, None] & d_mask[None, :], other=0.0
        )
        q_pos = ctx - q_len + m  # absolute position of each query row
        # the last position any row of this block may see
        limit = tl.minimum(ctx, ctx - q_len + (m_block + 1) * BLOCK_M)
        n = tl.arange(0, BLOCK_N)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, limit, BLOCK_N):
            pos = start + n
            valid = pos < limit
            m_i, l_i, acc = attend_tile(
                q,
                k_cache_ptr,
                v_cache_ptr,
                tables_ptr + seq * max_blocks,
                pos,
                valid,
                valid[None, :] & (pos[None, :] <= q_pos[:, None]),  # causal
                kv_head,
                num_kv_heads,
                head_dim,
                block_size,
                scale,
                m_i,
                l_i,
                acc,
                BLOCK_D,
                PRECISION,
            )
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * head_dim + d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new query rows over its cached
    positions -> (T, H, D) in q's dtype (padding rows: zero, or `out`'s).

    max_query_len (the longest q_len) sizes the launch without a device sync."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32, torch.int64))
    check_tensor("cu_query_lens", cu_query_lens, ndim=1, dtypes=(torch.int32, torch.int64))
    check_tensor("context_lens", context_lens, ndim=1, dtypes=(torch.int32, torch.int64))
    same_device(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        block_tables=block_tables,
        cu_query_lens=cu_query_lens,
        context_lens=context_lens,
    )
    tokens, heads, d = q.shape
    _, block_size, kv_heads, cache_d = k_cache.shape
    seqs = context_lens.shape[0]
    need(
        k_cache.shape == v_cache.shape,
        f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ",
    )
    need(cache_d == d, f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} differ in head_dim")
    need(
        kv_heads > 0 and heads % kv_heads == 0,
        f"q's {heads} heads must be a multiple of the cache's {kv_heads}",
    )
    need(
        cu_query_lens.shape[0] == seqs + 1 and block_tables.shape[0] == seqs,
        f"cu_query_lens {tuple(cu_query_lens.shape)} needs {seqs + 1} entries and block_tables "
        f"{tuple(block_tables.shape)} {seqs} rows for context_lens {tuple(context_lens.shape)}",
    )
    need(q.dtype == k_cache.dtype, f"q ({q.dtype}) and the cache ({k_cache.dtype}) differ in dtype")
    need(max_query_len >= 0, f"max_query_len must be >= 0, got {max_query_len}")
    if out is None:
        out = torch.zeros_like(q)
    else:
        need(
            out.shape == q.shape and out.dtype == q.dtype,
            f"out {tuple(out.shape)} must be like q {tuple(q.shape)}",
        )
    if seqs == 0 or heads == 0 or tokens == 0 or max_query_len == 0:
        return out
    _paged_prefill_kernel[(seqs, triton.cdiv(max_query_len, BLOCK_M), heads)](
        q,
        k_cache,
        v_cache,
        out,
        block_tables,
        cu_query_lens,
        context_lens,
        scale,
        heads,
        kv_heads,
        d,
        block_size,
        block_tables.shape[1],
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, next_power_of_2(d)),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
