"""SwiGLU of a fused gate/up projection: silu(gate) * up."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_kernels._checks import FLOAT_DTYPES, check_tensor, need


@triton.jit
def _silu_mul_kernel(in_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(in_ptr + row * 2 * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(in_ptr + row * 2 * n_cols + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2I) -> (..., I)."""
    check_tensor("gate_up", gate_up, dtypes=FLOAT_DTYPES)
    need(
        gate_up.dim() >= 1 and gate_up.shape[-1] % 2 == 0,
        f"gate_up's last dim must be even, got {tuple(gate_up.shape)}",
    )
    n = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], n))
    rows = gate_up.numel() // (2 * n) if n else 0
    block = 1024
    if rows and n:
        _silu_mul_kernel[(rows, triton.cdiv(n, block))](gate_up, out, n, BLOCK=block)
    return out
