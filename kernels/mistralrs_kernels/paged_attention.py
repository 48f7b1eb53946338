"""Decode attention over the paged KV cache (one query token per sequence).

Layout: q (S, H, D); k_cache/v_cache (num_blocks, block_size, K, D) with
H a multiple of K (GQA); block_tables (S, max_blocks); context_lens (S,).
Split-K (flash-decoding): each sequence's context is cut into partitions of
`partition_size` positions, one program per (sequence, kv head, partition)
writes the softmax max, sum and unnormalised output of the query heads that
share the kv head, and a second kernel merges the partitions, so a long
context still fills the GPU at batch 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_kernels._checks import FLOAT_DTYPES, check_tensor, need, next_power_of_2, same_device

DEFAULT_PARTITION_SIZE = 512
# positions per iteration of a program (several cache blocks)
TILE_POSITIONS = 64


@triton.jit
def attend_tile(
    q,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    pos,
    valid,
    seen,
    kv_head,
    num_kv_heads,
    head_dim,
    block_size,
    scale,
    m_i,
    l_i,
    acc,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One online-softmax step of paged attention: the rows of q (R, BLOCK_D)
    over the cache positions `pos` (N,) of the sequence whose block table
    starts at table_ptr; `valid` (N,) are the positions to read, `seen`
    (R, N) those each row attends to. Returns the updated running max, sum
    and unnormalised output."""
    d = tl.arange(0, BLOCK_D)
    physical = tl.load(table_ptr + pos // block_size, mask=valid, other=0).to(tl.int64)
    rows = (physical * block_size + pos % block_size) * num_kv_heads + kv_head
    offs = rows[:, None] * head_dim + d[None, :]
    kv_mask = valid[:, None] & (d < head_dim)[None, :]
    k = tl.load(k_cache_ptr + offs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (R, N)
    s = tl.where(seen, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # a row that has seen nothing yet keeps a -inf max: exp(-inf - -inf) would be NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    v = tl.load(v_cache_ptr + offs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc


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
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILES_PER_PARTITION: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program per (sequence, kv head, partition): the G query heads that
    share the kv head are the rows of one tl.dot (padded to BLOCK_G >= 16),
    so each key and value is read once for all of them; BLOCK_N positions
    (several cache blocks) per iteration."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)
    groups = num_heads // num_kv_heads
    ctx = tl.load(ctx_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    g_mask = g < groups
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    heads = kv_head * groups + g
    q = tl.load(
        q_ptr + (seq * num_heads + heads)[:, None] * head_dim + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t in range(TILES_PER_PARTITION):
        start = (part * TILES_PER_PARTITION + t) * BLOCK_N
        if start < ctx:
            pos = start + n
            valid = pos < ctx
            m_i, l_i, acc = attend_tile(
                q,
                k_cache_ptr,
                v_cache_ptr,
                tables_ptr + seq * max_blocks,
                pos,
                valid,
                tl.broadcast_to(valid[None, :], (BLOCK_G, BLOCK_N)),  # every head row sees them all
                kv_head,
                num_kv_heads,
                head_dim,
                BLOCK_SIZE,
                scale,
                m_i,
                l_i,
                acc,
                BLOCK_D,
                PRECISION,
            )
    stat = (seq * num_heads + heads) * num_partitions + part
    tl.store(max_ptr + stat, m_i, mask=g_mask)
    tl.store(sum_ptr + stat, l_i, mask=g_mask)
    tl.store(acc_ptr + stat[:, None] * head_dim + d[None, :], acc, mask=g_mask[:, None] & d_mask[None, :])


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
    partition_size: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v for each sequence over its cached positions -> (S, H, D) in q's dtype.

    max_context_len bounds the partitions launched (pass it to avoid a device sync).
    partition_size: positions per program; by default the largest power of 2
    up to 512 that still gives the GPU two programs per multiprocessor."""
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
    if max_context_len is None:
        max_context_len = int(context_lens.max()) if seqs else 0
        need(seqs == 0 or int(context_lens.min()) >= 1, "every context length must be >= 1")
    if partition_size is None:
        partition_size = _auto_partition_size(q, seqs * kv_heads, max_context_len, block_size)
    need(
        partition_size >= 16
        and partition_size & (partition_size - 1) == 0
        and partition_size % block_size == 0,
        f"partition_size ({partition_size}) must be a power of 2, >= 16 and a multiple of "
        f"block_size ({block_size})",
    )
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
    block_d = max(16, next_power_of_2(d))
    block_n = min(TILE_POSITIONS, partition_size)
    _paged_decode_partial_kernel[(seqs, kv_heads, partitions)](
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
        BLOCK_G=max(16, next_power_of_2(heads // kv_heads)),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        TILES_PER_PARTITION=partition_size // block_n,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    _paged_decode_merge_kernel[(seqs * heads,)](
        stats, sums, acc, out, d, partitions, BLOCK_P=next_power_of_2(partitions), BLOCK_D=block_d
    )
    return out


def _auto_partition_size(q: torch.Tensor, rows: int, max_context_len: int, block_size: int) -> int:
    """Halve the partition (from 512, down to 64 or one block) while (sequence,
    kv head, partition) programs would not give each multiprocessor two: at
    batch 1 a long context is what fills the GPU."""
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 1
    size = DEFAULT_PARTITION_SIZE
    floor = max(TILE_POSITIONS, block_size)
    while size // 2 >= floor and rows * triton.cdiv(max(max_context_len, 1), size) < 2 * sms:
        size //= 2
    return size
