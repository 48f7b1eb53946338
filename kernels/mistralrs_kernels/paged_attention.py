"""Decode attention over the paged KV cache (one query token per sequence).

Layout: q (S, H, D); k_cache/v_cache (num_blocks, block_size, K, D) with
H a multiple of K (GQA); block_tables (S, max_blocks); context_lens (S,).
Split-K (flash-decoding): each sequence's context is cut into partitions of
`partition_size` positions, one program per (sequence, head, partition)
writes its softmax max, sum and unnormalised output, and a second kernel
merges the partitions, so a long context still fills the GPU at batch 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_kernels._checks import FLOAT_DTYPES, check_tensor, need, next_power_of_2, same_device

DEFAULT_PARTITION_SIZE = 512


@triton.jit
def _paged_decode_partial_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    tables_ptr,
    ctx_ptr,
    max_ptr,
    sum_ptr,
    acc_ptr,
    scale,
    num_heads,
    num_kv_heads,
    head_dim,
    max_blocks,
    num_partitions,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCKS_PER_PARTITION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = tl.program_id(2)
    kv_head = head // (num_heads // num_kv_heads)
    ctx = tl.load(ctx_ptr + seq)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    q = tl.load(q_ptr + (seq * num_heads + head) * head_dim + d, mask=d_mask, other=0.0).to(tl.float32)
    n = tl.arange(0, BLOCK_SIZE)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first_block = part * BLOCKS_PER_PARTITION
    for j in range(BLOCKS_PER_PARTITION):
        logical = first_block + j
        pos = logical * BLOCK_SIZE + n
        valid = pos < ctx
        if logical * BLOCK_SIZE < ctx:
            physical = tl.load(tables_ptr + seq * max_blocks + logical).to(tl.int64)
            rows = (physical * BLOCK_SIZE + n) * num_kv_heads + kv_head
            offs = rows[:, None] * head_dim + d[None, :]
            kv_mask = valid[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
    stat = (seq * num_heads + head) * num_partitions + part
    tl.store(max_ptr + stat, m_i)
    tl.store(sum_ptr + stat, l_i)
    tl.store(acc_ptr + stat * head_dim + d, acc, mask=d_mask)


@triton.jit
def _paged_decode_merge_kernel(
    max_ptr,
    sum_ptr,
    acc_ptr,
    out_ptr,
    head_dim,
    num_partitions,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # seq * num_heads + head
    p = tl.arange(0, BLOCK_P)
    p_mask = p < num_partitions
    m = tl.load(max_ptr + row * num_partitions + p, mask=p_mask, other=float("-inf"))
    sums = tl.load(sum_ptr + row * num_partitions + p, mask=p_mask, other=0.0)
    m_all = tl.max(m, axis=0)
    w = tl.where(p_mask & (m > float("-inf")), tl.exp(m - m_all), 0.0)
    total = tl.sum(w * sums, axis=0)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    acc = tl.load(
        acc_ptr + (row * num_partitions + p)[:, None] * head_dim + d[None, :],
        mask=p_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    out = tl.sum(w[:, None] * acc, axis=0) / total
    tl.store(out_ptr + row * head_dim + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_context_len: int | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
) -> torch.Tensor:
    """softmax(q k^T * scale) v for each sequence over its cached positions -> (S, H, D) in q's dtype.

    max_context_len bounds the partitions launched (pass it to avoid a device sync)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32, torch.int64))
    check_tensor("context_lens", context_lens, ndim=1, dtypes=(torch.int32, torch.int64))
    same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens)
    seqs, heads, d = q.shape
    _, block_size, kv_heads, cache_d = k_cache.shape
    need(
        k_cache.shape == v_cache.shape,
        f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ",
    )
    need(cache_d == d, f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} differ in head_dim")
    need(
        kv_heads > 0 and heads % kv_heads == 0,
        f"q's {heads} heads must be a multiple of the cache's {kv_heads}",
    )
    need(block_size & (block_size - 1) == 0, f"block_size must be a power of 2, got {block_size}")
    need(
        block_tables.shape[0] == seqs and context_lens.shape[0] == seqs,
        f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
        f"need {seqs} rows",
    )
    need(
        partition_size % block_size == 0 and partition_size > 0,
        f"partition_size ({partition_size}) must be a positive multiple of block_size ({block_size})",
    )
    if max_context_len is None:
        max_context_len = int(context_lens.max()) if seqs else 0
        need(seqs == 0 or int(context_lens.min()) >= 1, "every context length must be >= 1")
    need(
        max_context_len <= block_tables.shape[1] * block_size,
        f"a context of {max_context_len} needs more blocks than "
        f"block_tables' {block_tables.shape[1]} columns",
    )
    out = torch.empty_like(q)
    if seqs == 0 or heads == 0:
        return out
    partitions = max(1, triton.cdiv(max_context_len, partition_size))
    stats = torch.empty((seqs, heads, partitions), dtype=torch.float32, device=q.device)
    sums = torch.empty_like(stats)
    acc = torch.empty((seqs, heads, partitions, d), dtype=torch.float32, device=q.device)
    block_d = next_power_of_2(d)
    _paged_decode_partial_kernel[(seqs, heads, partitions)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        stats,
        sums,
        acc,
        scale,
        heads,
        kv_heads,
        d,
        block_tables.shape[1],
        partitions,
        BLOCK_SIZE=block_size,
        BLOCK_D=block_d,
        BLOCKS_PER_PARTITION=partition_size // block_size,
    )
    _paged_decode_merge_kernel[(seqs * heads,)](
        stats, sums, acc, out, d, partitions, BLOCK_P=next_power_of_2(partitions), BLOCK_D=block_d
    )
    return out
