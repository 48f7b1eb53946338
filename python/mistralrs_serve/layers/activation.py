"""SwiGLU on a fused gate/up projection, on torch or on the Triton kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class SiluAndMul:
    """(..., 2I) -> (..., I): silu(gate) * up, gate the first half."""

    def __init__(self) -> None:
        self.triton = False  # set by the model's use_triton()

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.triton:
            from mistralrs_kernels import triton_ops

            return triton_ops.silu_mul(gate_up.contiguous())
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
