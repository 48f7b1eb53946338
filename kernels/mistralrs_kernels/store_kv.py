"""Scatter a step's new keys and values into the paged cache by slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_kernels._checks import FLOAT_DTYPES, check_tensor, need, next_power_of_2, same_device


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, row_len, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot >= 0:  # -1: a padding token, stored nowhere
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < row_len
        k = tl.load(k_ptr + token * row_len + cols, mask=mask)
        v = tl.load(v_ptr + token * row_len + cols, mask=mask)
        tl.store(k_cache_ptr + slot * row_len + cols, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + slot * row_len + cols, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    check_slots: bool = True,
) -> None:
    """k/v (T, K, D) into k_cache/v_cache (num_blocks, block_size, K, D) at
    slot_mapping (T,) (slot = block * block_size + offset; -1 skips the token).
    check_slots reads the slots' range back to the host (a device sync); pass
    False only for slots validated already (the engine checks its plans)."""
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("v_cache", v_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int32, torch.int64))
    same_device(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    need(k.shape == v.shape, f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    need(
        k_cache.shape == v_cache.shape,
        f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ",
    )
    need(
        k.shape[1:] == k_cache.shape[2:],
        f"k {tuple(k.shape)} does not fit k_cache {tuple(k_cache.shape)} (K, D)",
    )
    need(
        slot_mapping.shape[0] == k.shape[0],
        f"slot_mapping {tuple(slot_mapping.shape)} needs one slot per token of k {tuple(k.shape)}",
    )
    tokens = k.shape[0]
    if tokens == 0:
        return
    if check_slots:
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        need(lo >= -1 and hi < num_slots, f"slot_mapping must be -1 or in [0, {num_slots}), got [{lo}, {hi}]")
    row_len = k.shape[1] * k.shape[2]
    block = min(1024, next_power_of_2(row_len))
    _store_kv_kernel[(tokens, triton.cdiv(row_len, block))](
        k, v, k_cache, v_cache, slot_mapping, row_len, BLOCK=block
    )
