"""Argument checks shared by the launchers: a ValueError that names the
argument and shows the shapes, before any kernel runs."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def need(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_tensor(
    name: str,
    t: torch.Tensor,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    contiguous: bool = True,
) -> None:
    need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        need(t.dim() == ndim, f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None:
        need(t.dtype in dtypes, f"{name} must be one of {dtypes}, got {t.dtype} (shape {tuple(t.shape)})")
    if contiguous:
        need(
            t.is_contiguous(),
            f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}",
        )


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    need(len(set(devices.values())) == 1, f"tensors are on different devices: {devices}")


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
