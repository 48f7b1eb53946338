"""Gated MLP activations on a fused gate/up projection: SwiGLU (torch or the Triton kernel) and GELU."""

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


class GeluAndMul:
    """(..., 2I) -> (..., I): gelu(gate) * up, gate the first half (Gemma's MLP); `approximate`
    is torch's: "tanh" (gelu_pytorch_tanh) or "none" (exact erf)."""

    def __init__(self, approximate: str = "tanh") -> None:
        self.approximate = approximate
        self.triton = False  # no Triton kernel: torch on every device

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up
