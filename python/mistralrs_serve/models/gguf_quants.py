"""Dequantisation of GGUF tensor blocks into torch tensors.

The formats of the default model (Q4_0, Q4_1, Q8_0, F16/BF16/F32) run as a
handful of vectorised torch ops on the memory-mapped bytes. The k-quants
(Q4_K, Q5_K, Q6_K and friends) go through the `gguf` package's numpy code:
correct, slower, and used by no default model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mistralrs_serve.errors import UnsupportedModelError
from mistralrs_serve.layers.linear import Q4Weight
from mistralrs_serve.models.gguf_file import GGML_TYPES, TensorInfo

Q4_TYPES = ("Q4_0", "Q4_1")


def _blocks(raw: np.ndarray, type_size: int) -> torch.Tensor:
    # (num_blocks, type_size) uint8; torch warns on read-only buffers, copying is what we want anyway
    return torch.from_numpy(raw.reshape(-1, type_size).copy())


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    # (num_blocks, 1) fp32 from two little-endian bytes
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # Low nibbles hold elements 0..15 of a block, high nibbles 16..31.
    return torch.cat([qs & 0x0F, qs >> 4], dim=1).float()


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8.0)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]) + _f16(blocks, 2)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    return _f16(blocks, 0) * blocks[:, 2:].view(torch.int8).float()


_FAST: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_VIA_GGUF = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def dequantize(raw: np.ndarray, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """Tensor `info` from its raw bytes, in `dtype` and torch shape order."""
    kind = GGML_TYPES[info.ggml_type]
    if kind.name in _PLAIN:
        values = torch.from_numpy(raw.copy()).view(_PLAIN[kind.name])
    elif kind.name in _FAST:
        values = _FAST[kind.name](_blocks(raw, kind.type_size))
    elif kind.name in _VIA_GGUF:
        values = torch.from_numpy(_dequantize_with_gguf(raw, info))
    else:
        raise UnsupportedModelError(f"tensor {info.name!r}: GGML type {kind.name} is not supported")
    return values.reshape(info.shape).to(dtype)


def _dequantize_with_gguf(raw: np.ndarray, info: TensorInfo) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return gguf_dequantize(raw, GGMLQuantizationType(info.ggml_type)).astype(np.float32)


def unpack_q4(raw: np.ndarray, info: TensorInfo) -> Q4Weight:
    """A Q4_0/Q4_1 matrix as (q, scale, minimum), without dequantising."""
    kind = GGML_TYPES[info.ggml_type]
    blocks = _blocks(raw, kind.type_size)
    rows, groups = info.shape[0], info.shape[1] // kind.block_size
    scale = _f16(blocks, 0)
    if kind.name == "Q4_0":
        q, minimum = _nibbles(blocks[:, 2:]), -8.0 * scale
    else:
        q, minimum = _nibbles(blocks[:, 4:]), _f16(blocks, 2)
    return Q4Weight(q.to(torch.uint8).view(info.shape), scale.view(rows, groups), minimum.view(rows, groups))
