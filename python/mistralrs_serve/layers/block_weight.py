"""A GGUF-quantized weight matrix kept as the file's bytes (a view of the
memory-mapped file), so that loading copies nothing: the fused CPU forward
repacks the blocks in Rust (`_native.QuantMatrix.from_gguf`, no floats in
between), and only a path that needs dense weights (torch, a GPU) decodes
them, with torch, when it first runs. A fused q/k/v or gate/up projection is
its parts' rows stacked, each part keeping its own type (a Q4_K_M file mixes
Q4_K and Q6_K in one layer).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mistralrs_serve import _native

# the types the fused CPU forward reads straight from the blocks
FUSED_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


@dataclass(frozen=True)
class BlockPart:
    """Consecutive rows of one GGUF type: `raw` is (rows, bytes per row) uint8 as the
    file stores them; `order`, where set, the order the rows are read in (llama.cpp's
    q/k row permutation undone without a resident copy of the bytes)."""

    type_name: str
    raw: np.ndarray
    cols: int
    order: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return int(self.raw.shape[0])

    def ordered(self) -> np.ndarray:
        """The rows' bytes in `order` (a copy, for the caller's moment, where there is one)."""
        return self.raw if self.order is None else np.ascontiguousarray(self.raw[self.order])


@dataclass(frozen=True)
class BlockWeight:
    """A (rows, cols) matrix as GGUF blocks, in one or more parts of rows."""

    parts: tuple[BlockPart, ...]

    @staticmethod
    def of(type_name: str, raw: np.ndarray, rows: int, cols: int) -> BlockWeight:
        """A tensor's bytes (as the file stores it, row after row of blocks)."""
        return BlockWeight((BlockPart(type_name, raw.reshape(rows, -1), cols),))

    @property
    def shape(self) -> torch.Size:
        return torch.Size((sum(p.rows for p in self.parts), self.parts[0].cols))

    @property
    def type_names(self) -> tuple[str, ...]:
        return tuple(p.type_name for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(p.raw.nbytes for p in self.parts)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense (rows, cols) matrix in `dtype`, decoded with torch."""
        from mistralrs_serve.models.gguf_file import GGML_TYPES, TensorInfo
        from mistralrs_serve.models.gguf_quants import dequantize

        codes = {t.name: code for code, t in GGML_TYPES.items()}
        dense = [
            dequantize(
                p.ordered().reshape(-1),
                TensorInfo("weight", (p.rows, p.cols), codes[p.type_name], 0, p.raw.nbytes),
                dtype,
            )
            for p in self.parts
        ]
        return dense[0] if len(dense) == 1 else torch.cat(dense)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BlockWeight:
        """Reorder rows (undoing llama.cpp's q/k permutation): `fn` applied to the row
        numbers gives the order, kept beside the mapped bytes and applied when they are read."""
        (part,) = self.parts  # a tensor of the file: one part
        rows = torch.arange(part.rows) if part.order is None else torch.from_numpy(part.order)
        return BlockWeight((BlockPart(part.type_name, part.raw, part.cols, fn(rows).numpy()),))

    @staticmethod
    def concat(weights: list[BlockWeight]) -> BlockWeight:
        return BlockWeight(tuple(p for w in weights for p in w.parts))

    def release_pages(self) -> None:
        """Drop the file's pages under these bytes from this process's resident set
        (MADV_DONTNEED on the read-only mapping: they come back from the page cache
        if read again). Called once the blocks are repacked, so that a model holds
        its weights once, not twice."""
        for p in self.parts:
            _dont_need(p.raw)

    def fused(self) -> bool:
        """Whether every part's type has a kernel in the fused CPU forward."""
        return all(p.type_name in FUSED_TYPES for p in self.parts)

    def quant_matrix(self) -> _native.QuantMatrix | None:
        """The blocks repacked for the fused CPU forward; None when a part's type
        has no kernel there (Q2_K, Q3_K)."""
        if not self.fused():
            return None
        mats = [
            _native.QuantMatrix.from_gguf(p.type_name, np.ascontiguousarray(p.ordered()), p.rows, p.cols)
            for p in self.parts
        ]
        return mats[0] if len(mats) == 1 else _native.QuantMatrix.concat(mats)


def _dont_need(raw: np.ndarray) -> None:
    """madvise(MADV_DONTNEED) over the whole pages inside `raw` (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux") or raw.base is None or raw.flags.writeable:
        return  # a copy (not the mapped file): its pages are the data itself
    page = mmap.PAGESIZE
    start = raw.__array_interface__["data"][0]
    first, last = -(-start // page) * page, (start + raw.nbytes) // page * page
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return lib
