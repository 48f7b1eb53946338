"""RMSNorm, on torch or on the Triton kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class RMSNorm:
    """x / rms(x) * weight over the last dimension, computed in fp32 and cast back."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight
        self.eps = eps
        self.triton = False  # set by the model's use_triton()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton:
            from mistralrs_kernels import triton_ops

            out = triton_ops.rms_norm(x.contiguous(), self.weight, self.eps)
            assert isinstance(out, torch.Tensor)
            return out
        w = self.weight
        if x.dtype == w.dtype:
            # torch's kernel accumulates in fp32 and rounds once: bit-identical to
            # upcasting first, and 1.7x faster for a CPU decode row (14 vs 24 us)
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), w.float(), self.eps).to(x.dtype)

    def to(self, device: torch.device) -> None:
        self.weight = self.weight.to(device)
