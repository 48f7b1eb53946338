"""Grammar masking: logits of tokens whose bit is 0 become -inf."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_kernels._checks import FLOAT_DTYPES, check_tensor, need, same_device


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, mask_ptr, vocab, words, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ids = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = ids < vocab
    word = tl.load(mask_ptr + row * words + ids // 32, mask=inside, other=0)
    allowed = ((word >> (ids % 32)) & 1) != 0
    ptrs = logits_ptr + row * vocab + ids
    logits = tl.load(ptrs, mask=inside, other=0.0)
    tl.store(ptrs, tl.where(allowed, logits, float("-inf")), mask=inside)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits (B, V); bitmask (B, ceil(V / 32)) int32, bit i % 32 of
    word i // 32 set where token i is allowed (the layout of the Rust grammar loop)."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("bitmask", bitmask, ndim=2, dtypes=(torch.int32,))
    same_device(logits=logits, bitmask=bitmask)
    rows, vocab = logits.shape
    need(
        bitmask.shape == (rows, (vocab + 31) // 32),
        f"bitmask {tuple(bitmask.shape)} must be ({rows}, {(vocab + 31) // 32}) "
        f"for logits {tuple(logits.shape)}",
    )
    block = 1024
    if rows and vocab:
        _apply_token_bitmask_kernel[(rows, triton.cdiv(vocab, block))](
            logits, bitmask, vocab, bitmask.shape[1], BLOCK=block
        )
