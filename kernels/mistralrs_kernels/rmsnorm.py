"""RMSNorm over the last dimension, optionally fused with the residual add."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mistralrs_kernels._checks import FLOAT_DTYPES, check_tensor, need, next_power_of_2, same_device


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row.to(tl.int64) * n_cols + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(residual_out_ptr + offs, x.to(residual_out_ptr.dtype.element_ty), mask=mask)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.rsqrt(mean_sq + eps) * w
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x (..., N) -> RMSNorm(x) * weight, fp32 inside. With residual: h = x + residual,
    returns (RMSNorm(h) * weight, h)."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES)
    need(
        x.dim() >= 1 and x.shape[-1] == weight.shape[0],
        f"x {tuple(x.shape)} and weight {tuple(weight.shape)} differ in N",
    )
    need(eps > 0, f"eps must be > 0, got {eps}")
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES)
        need(residual.shape == x.shape, f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
        same_device(x=x, weight=weight, residual=residual)
    else:
        same_device(x=x, weight=weight)
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x) if residual is not None else out
    if rows:
        _rms_norm_kernel[(rows,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            residual_out,
            n,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=next_power_of_2(n),
        )
    return (out, residual_out) if residual is not None else out
