"""Dequantisation of GGUF tensor blocks into torch tensors.

Every block type a GGUF file of ours may hold (F32/F16/BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and the
k-quants Q2_K..Q6_K) is decoded with a few vectorised torch ops over all blocks at once, on any
device, with the byte layouts of ggml's `block_*` structs (ggml-common.h). Values are computed in
fp32 with ggml's order of operations, so they equal ggml's (and the `gguf` package's) bit for bit
before the cast to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from mistralrs_serve.errors import ModelLoadError, UnsupportedModelError
from mistralrs_serve.layers.linear import Q4Weight
from mistralrs_serve.models.gguf_file import GGML_TYPES, GGMLType, TensorInfo

# Blocks decoded per step: bounds the fp32 temporaries (a few of this many elements each, about
# 32 MiB apiece) however large the tensor, e.g. a 262k-row embedding.
_CHUNK_ELEMENTS = 1 << 23

Decoder = Callable[[torch.Tensor], torch.Tensor]


# --- bit fields ---


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    # (num_blocks, 1) fp32 from two little-endian bytes
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _fields(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., n) uint8 -> (..., 8 // width, n): the `width`-bit fields of each byte, lowest first."""
    # One scalar shift per field: 8x faster on CPU than one shift by a broadcast tensor of shifts.
    mask = (1 << width) - 1
    return torch.stack([(x >> shift) & mask for shift in range(0, 8, width)], dim=-2)


def _bits_in_order(x: torch.Tensor) -> torch.Tensor:
    """(num_blocks, n) uint8 -> (num_blocks, 8 n): bit i of the little-endian bit string at i."""
    return torch.stack([(x >> shift) & 1 for shift in range(8)], dim=-1).flatten(1)


def _centred(q: torch.Tensor, offset: float) -> torch.Tensor:
    """float(q) - offset for uint8 q: exact, and 6x faster on CPU than converting int8 values."""
    values = q.float()
    return values.sub_(offset) if offset else values


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # Low nibbles hold elements 0..15 of a block, high nibbles 16..31.
    return _fields(qs, 4).flatten(1)


# --- 32-element blocks: d (f16) [, m (f16)] [, qh (4 bytes)], qs ---


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    return _centred(_nibbles(blocks[:, 2:]), 8.0).mul_(_f16(blocks, 0))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    return _nibbles(blocks[:, 4:]).float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _five_bits(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    # element i: nibble i of qs (low nibbles first) with bit i of qh as its fifth bit
    return _nibbles(qs) | (_bits_in_order(qh) << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    return _centred(_five_bits(blocks[:, 2:6], blocks[:, 6:]), 16.0).mul_(_f16(blocks, 0))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    return _five_bits(blocks[:, 4:8], blocks[:, 8:]).float().mul_(_f16(blocks, 0)).add_(_f16(blocks, 2))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # flipping the sign bit maps int8 v to the uint8 v + 128
    return _centred(blocks[:, 2:] ^ 0x80, 128.0).mul_(_f16(blocks, 0))


# --- 256-element super-blocks (k-quants) ---
# Each super-block holds 8 sub-blocks of 32 or 16 of 16 elements, with small integer scales (and
# minimums) per sub-block under one or two f16 super-scales. Where 2-bit fields are packed four to a
# byte, a run of 32 bytes holds 128 elements: field j of byte l is element 32 j + l of that run.


def _scaled(
    scale: torch.Tensor, q: torch.Tensor, minimum: torch.Tensor | None = None, offset: float = 0.0
) -> torch.Tensor:
    """scale * (q - offset) [- minimum] with one scale (and minimum) per sub-block.

    scale, minimum: (n, S) fp32; q: (n, 256) uint8. In place on one fp32 temporary."""
    values = _centred(q.view(q.shape[0], scale.shape[1], -1), offset).mul_(scale.unsqueeze(-1))
    if minimum is not None:
        values.sub_(minimum.unsqueeze(-1))
    return values.flatten(1)


def _two_bit_runs(qs: torch.Tensor) -> torch.Tensor:
    # (n, 64) bytes, two runs of 32 -> (n, 256) 2-bit values in element order
    return _fields(qs.view(qs.shape[0], 2, 32), 2).flatten(1)


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # scales[16] (low nibble: scale, high: minimum), qs[64], d, dmin
    scales = blocks[:, :16]
    d, dmin = _f16(blocks, 80), _f16(blocks, 82)
    return _scaled(d * (scales & 0x0F).float(), _two_bit_runs(blocks[:, 16:80]), dmin * (scales >> 4).float())


def _q3_k_scales(packed: torch.Tensor) -> torch.Tensor:
    # 16 six-bit scales stored minus 32: low 4 bits are the nibbles of bytes 0..7 (low nibbles are
    # scales 0..7), high 2 bits are the 2-bit fields of bytes 8..11 (field j of byte b: scale 4 j + b).
    low = _fields(packed[:, :8], 4).flatten(1)
    high = _fields(packed[:, 8:12], 2).flatten(1)
    return (low | (high << 4)).to(torch.int16) - 32


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # hmask[32], qs[64], scales[12], d; a value is its 2 low bits minus 4 where its hmask bit is clear
    hmask, qs = blocks[:, :32], blocks[:, 32:96]
    d = _f16(blocks, 108)
    high = _fields(hmask, 1).flatten(1)  # bit m of byte l is element 32 m + l
    # low + 4 high - 4 is low - 4 (1 - high), kept unsigned until the float conversion
    q = _two_bit_runs(qs) | (high << 2)
    return _scaled(d * _q3_k_scales(blocks[:, 96:108]).float(), q, offset=4.0)


def _k4_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 8 six-bit scales and 8 six-bit minimums from 12 bytes, as fp32 (n, 8) each."""
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    # sub-blocks 0..3: low 6 bits of a (scale) and b (minimum); 4..7: a nibble of c below the
    # top 2 bits of a (scale) or b (minimum)
    scale = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], dim=1)
    minimum = torch.cat([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], dim=1)
    return scale.float(), minimum.float()


def _nibble_runs(qs: torch.Tensor) -> torch.Tensor:
    # (n, 128) bytes, four runs of 32: low nibbles are sub-block 2 r, high nibbles 2 r + 1
    return _fields(qs.view(qs.shape[0], 4, 32), 4).flatten(1)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # d, dmin, scales[12], qs[128]
    scale, minimum = _k4_scales(blocks[:, 4:16])
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    return _scaled(d * scale, _nibble_runs(blocks[:, 16:]), dmin * minimum)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # d, dmin, scales[12], qh[32], qs[128]; bit j of qh[l] is the fifth bit of element 32 j + l
    scale, minimum = _k4_scales(blocks[:, 4:16])
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    q = _nibble_runs(blocks[:, 48:]) | (_fields(blocks[:, 16:48], 1).flatten(1) << 4)
    return _scaled(d * scale, q, dmin * minimum)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # ql[128], qh[64], scales[16] (int8), d. Two halves of 128 elements: in half h, the nibbles of
    # ql[64 h .. 64 h + 64] give elements p (low) and 64 + p (high); the 2-bit fields of
    # qh[32 h .. 32 h + 32] give the top bits of element 32 j + l, minus 32 overall.
    n = blocks.shape[0]
    low = _fields(blocks[:, :128].view(n, 2, 64), 4).flatten(1)
    high = _fields(blocks[:, 128:192].view(n, 2, 32), 2).flatten(1)
    scale = _f16(blocks, 208) * blocks[:, 192:208].view(torch.int8).float()
    return _scaled(scale, low | (high << 4), offset=32.0)


DECODERS: dict[str, Decoder] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
}
_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def dequantize_blocks(type_name: str, blocks: torch.Tensor) -> torch.Tensor:
    """(num_blocks, type_size) uint8 blocks of a quantized type -> (num_blocks, block_size) fp32."""
    decode = DECODERS.get(type_name)
    if decode is None:
        raise UnsupportedModelError(f"GGML type {type_name} is not supported")
    return decode(blocks)


def dequantize(
    raw: np.ndarray, info: TensorInfo, dtype: torch.dtype, device: torch.device | str | None = None
) -> torch.Tensor:
    """Tensor `info` from its raw bytes, in `dtype` and torch shape order, decoded on `device`.

    Large tensors are decoded a chunk of blocks at a time into the result, so the fp32 temporaries
    stay small and the mapped bytes are never copied whole."""
    kind = GGML_TYPES[info.ggml_type]
    _check_length(raw, info, kind)
    if kind.name in _PLAIN:
        values = torch.from_numpy(raw.copy()).to(device=device).view(_PLAIN[kind.name])
        return values.reshape(info.shape).to(dtype)
    if kind.name not in DECODERS:
        raise UnsupportedModelError(f"tensor {info.name!r}: GGML type {kind.name} is not supported")
    num_blocks = raw.size // kind.type_size
    step = max(1, _CHUNK_ELEMENTS // kind.block_size)
    if num_blocks <= step:  # one chunk: its fp32 values are the result (before the cast)
        return _decode(raw, kind, 0, num_blocks, device).view(info.shape).to(dtype)
    out = torch.empty(num_blocks, kind.block_size, dtype=dtype, device=device)
    for first in range(0, num_blocks, step):
        last = min(first + step, num_blocks)
        out[first:last] = _decode(raw, kind, first, last, device)
    return out.view(info.shape)


def _decode(
    raw: np.ndarray, kind: GGMLType, first: int, last: int, device: torch.device | str | None
) -> torch.Tensor:
    """Blocks first..last of `raw` as (last - first, block_size) fp32 on `device`."""
    chunk = raw[first * kind.type_size : last * kind.type_size].reshape(-1, kind.type_size)
    # a copy: torch will not wrap the read-only map, and the bytes should not pin the file's pages
    return DECODERS[kind.name](torch.from_numpy(chunk.copy()).to(device=device))


def check_length(raw: np.ndarray, info: TensorInfo) -> None:
    """ModelLoadError unless `raw` holds exactly tensor `info`'s bytes (whole blocks)."""
    kind = GGML_TYPES.get(info.ggml_type)
    if kind is None:
        raise UnsupportedModelError(f"tensor {info.name!r}: GGML type {info.type_name} is not supported")
    _check_length(raw, info, kind)


def _check_length(raw: np.ndarray, info: TensorInfo, kind: GGMLType) -> None:
    num_elements = int(np.prod(info.shape)) if info.shape else 1
    if num_elements % kind.block_size:
        raise ModelLoadError(
            f"tensor {info.name!r}: {num_elements} elements are not whole {kind.name} blocks "
            f"of {kind.block_size}"
        )
    expected = num_elements // kind.block_size * kind.type_size
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != expected:
        raise ModelLoadError(
            f"tensor {info.name!r}: {kind.name} data of shape {info.shape} takes {expected} bytes, "
            f"got {raw.size} {raw.dtype} values"
        )


def unpack_q4(raw: np.ndarray, info: TensorInfo) -> Q4Weight:
    """A Q4_0/Q4_1 matrix as (q, scale, minimum), without dequantising."""
    kind = GGML_TYPES[info.ggml_type]
    _check_length(raw, info, kind)
    return unpack_q4_blocks(kind.name, raw, info.shape[0], info.shape[1])


def unpack_q4_blocks(type_name: str, raw: np.ndarray, rows: int, cols: int) -> Q4Weight:
    """(rows, cols) of Q4_0/Q4_1 blocks as (q, scale, minimum)."""
    type_size = 18 if type_name == "Q4_0" else 20
    blocks = torch.from_numpy(np.ascontiguousarray(raw).reshape(-1, type_size).copy())
    groups = cols // 32
    scale = _f16(blocks, 0)
    if type_name == "Q4_0":
        q, minimum = _nibbles(blocks[:, 2:]), -8.0 * scale
    else:
        q, minimum = _nibbles(blocks[:, 4:]), _f16(blocks, 2)
    return Q4Weight(q.view(rows, cols), scale.view(rows, groups), minimum.view(rows, groups))
