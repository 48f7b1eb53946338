"""Linear layers that keep 4-bit weights 4-bit where that is faster.

Measured on the default model (2 cores, bf16 activations, torch 2.15):
torch's int4 CPU kernel beats a dense bf16 matmul for few rows (decode:
30 vs 34 us for 576x1536, 0.8 vs 2.4 ms for the 49152x576 head) and loses
for many (prefill of 512 rows: 5.5 vs 2.1 ms), so 4-bit weights are kept in
both forms and each call picks by row count.

A quantized source (GGUF blocks, `block_weight.BlockWeight`, or a
`Q4Weight`) becomes dense only when a torch call first needs it: a model on
the fused CPU forward reads its repacked blocks alone, and holds no dense copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mistralrs_serve import _native
from mistralrs_serve.layers.block_weight import BlockWeight

# Rows above which the dense bf16 matmul wins (measured crossover: 8-16).
INT4_MAX_ROWS = 8
GROUP_SIZE = 32
INT4_ROW_TILE = 16


@dataclass(frozen=True)
class Q4Weight:
    """Affine 4-bit weight in groups of 32 along the input dim: w = scale * q + minimum.

    q (out, in) uint8 in 0..15; scale and minimum (out, in // 32) fp32.
    """

    q: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        out, cols = self.q.shape
        groups = self.q.view(out, cols // GROUP_SIZE, GROUP_SIZE).float()
        w = groups * self.scale.unsqueeze(-1) + self.minimum.unsqueeze(-1)
        return w.view(out, cols).to(dtype)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Q4Weight:
        """Apply a reordering of dim 0 (e.g. undoing a q/k permutation) to every part."""
        return Q4Weight(fn(self.q), fn(self.scale), fn(self.minimum))

    @staticmethod
    def concat(parts: list[Q4Weight]) -> Q4Weight:
        return Q4Weight(*(torch.cat([getattr(p, n) for p in parts]) for n in ("q", "scale", "minimum")))


AnyWeight = torch.Tensor | Q4Weight | BlockWeight


def has_int4_kernel() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Linear:
    """y = x W^T + b over 2-D x (rows, in)."""

    def __init__(self, weight: AnyWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        self.bias = None if bias is None else bias.to(dtype)
        self.dtype = dtype
        # the quantized source, until a torch call needs the dense (and int4) forms
        self.source: Q4Weight | BlockWeight | None = None if isinstance(weight, torch.Tensor) else weight
        self._weight = weight.to(dtype) if isinstance(weight, torch.Tensor) else None
        self._packed4: tuple[torch.Tensor, torch.Tensor] | None = None
        self._quant: _native.QuantMatrix | None = None
        self.shape = weight.shape

    @property
    def weight(self) -> torch.Tensor:
        """The dense weights in the layer's dtype (decoded from the source on first use)."""
        if self._weight is None:
            self._materialize()
        assert self._weight is not None
        return self._weight

    @property
    def int4(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """torch's packed 4-bit copy, where the source is 4-bit and the kernel applies."""
        if self._weight is None:
            self._materialize()
        return self._packed4

    @int4.setter
    def int4(self, packed: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Replace (or with None, turn off) the packed 4-bit copy."""
        if self._weight is None:
            self._materialize()
        self._packed4 = packed

    def _materialize(self) -> None:
        src = self.source
        assert src is not None
        q4 = src if isinstance(src, Q4Weight) else _as_q4(src)
        # torch's packing needs whole tiles of 16 output rows (e.g. a 32001-row head has none).
        tiles = q4 is not None and q4.shape[0] % INT4_ROW_TILE == 0
        if q4 is not None and tiles and self.dtype == torch.bfloat16 and has_int4_kernel():
            self._packed4 = _pack_int4(q4)
        self._weight = (q4 if q4 is not None else src).dequantize(self.dtype)

    def to(self, device: torch.device) -> None:
        """Move in place; the packed 4-bit copy is a CPU kernel's and stays behind."""
        self._weight = self.weight.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        if device.type != "cpu":
            self._packed4 = self.source = self._quant = None

    def has_quant_matrix(self) -> bool:
        """Whether quant_matrix() (without requantize) gives a matrix, told
        without building it."""
        if self._quant is not None or isinstance(self.source, Q4Weight):
            return True
        return isinstance(self.source, BlockWeight) and self.source.fused()

    def quant_matrix(self, requantize: bool = False) -> _native.QuantMatrix | None:
        """The weights repacked for the fused CPU forward (models/llama_native.py),
        built once and shared by every engine on this model: from the GGUF blocks or
        the 4-bit source, or with `requantize`, the dense weights quantized to 8 bits
        per block of 32. None for dense weights without `requantize`, and for block
        types the fused forward has no kernel for."""
        if self._quant is None and isinstance(self.source, BlockWeight):
            self._quant = self.source.quant_matrix()
        elif self._quant is None and isinstance(self.source, Q4Weight):
            w = self.source
            self._quant = _native.QuantMatrix.from_q4(
                w.q.contiguous().numpy(),
                w.scale.float().contiguous().numpy(),
                w.minimum.float().contiguous().numpy(),
            )
        if self._quant is None and requantize:
            self._quant = _native.QuantMatrix.quantize_q8(self.weight.float().contiguous().numpy())
        return self._quant

    @property
    def out_features(self) -> int:
        return int(self.shape[0])

    def decode_bytes(self) -> int:
        """Bytes one decode step (a single row) reads from this layer's weights."""
        parts = list(self.int4) if self.int4 is not None else [self.weight]
        parts += [] if self.bias is None else [self.bias]
        return sum(t.numel() * t.element_size() for t in parts)

    def __call__(self, x: torch.Tensor, int4_rows: torch.Tensor | None = None) -> torch.Tensor:
        """int4_rows: in a step that prefills, the rows (decodes, at most
        INT4_MAX_ROWS, maybe none) that take the 4-bit kernel; the rest go dense. A
        row's result is the same in any batch for either kernel, but the two
        kernels round differently: this keeps a decode's numerics (and so its
        greedy tokens) independent of what else runs in its step."""
        if self.int4 is None:
            return F.linear(x, self.weight, self.bias)
        if int4_rows is None:
            return self._int4(x) if x.shape[0] <= INT4_MAX_ROWS else F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias)
        if len(int4_rows):
            y.index_copy_(0, int4_rows, self._int4(x.index_select(0, int4_rows)))
        return y

    def _int4(self, x: torch.Tensor) -> torch.Tensor:
        assert self.int4 is not None
        packed, scales_zeros = self.int4
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_zeros)
        return y if self.bias is None else y + self.bias


def int4_rows(query_lens: np.ndarray) -> torch.Tensor | None:
    """A step's `int4_rows` for `Linear` (see its __call__), from the plan's query
    lengths: prefill rows never take the 4-bit kernel; decode rows do when the step
    has at most INT4_MAX_ROWS of them. So a decode computes the same whatever else
    is in its step, and up to that many concurrent requests decode greedily exactly
    as each would alone. None for a decode-only step: the row-count rule says the same."""
    is_decode = query_lens == 1
    num_decodes = int(is_decode.sum())
    if num_decodes == len(query_lens):
        return None
    if num_decodes > INT4_MAX_ROWS:
        return torch.empty(0, dtype=torch.int64)
    last_rows = np.cumsum(query_lens) - 1
    return torch.from_numpy(np.ascontiguousarray(last_rows[is_decode], dtype=np.int64))


def concat_weights(parts: list[AnyWeight]) -> AnyWeight:
    """Fuse projections that read the same input (q/k/v, gate/up) into one."""
    q4 = [p for p in parts if isinstance(p, Q4Weight)]
    if len(q4) == len(parts):
        return Q4Weight.concat(q4)
    blocks = [p for p in parts if isinstance(p, BlockWeight)]
    if len(blocks) == len(parts):
        return BlockWeight.concat(blocks)
    return torch.cat(
        [p.float() if isinstance(p, torch.Tensor) else p.dequantize(torch.float32) for p in parts]
    )


def _as_q4(w: BlockWeight) -> Q4Weight | None:
    """Q4_0/Q4_1 blocks as (q, scale, minimum), for torch's int4 kernel; None otherwise."""
    if any(p.type_name not in ("Q4_0", "Q4_1") for p in w.parts):
        return None
    from mistralrs_serve.models.gguf_quants import unpack_q4_blocks

    return Q4Weight.concat([unpack_q4_blocks(p.type_name, p.ordered(), p.rows, p.cols) for p in w.parts])


def _pack_int4(w: Q4Weight) -> tuple[torch.Tensor, torch.Tensor]:
    # torch's kernel computes (q - 8) * scale + zero, so zero = minimum + 8 * scale.
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 1)
    zero = w.minimum + 8 * w.scale
    scales_zeros = torch.stack([w.scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16)
    return packed, scales_zeros  # scales_zeros: (in // 32, out, 2)
