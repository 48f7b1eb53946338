"""Paged KV cache shared by many sequences, and the attention backend over it.

The cache is a pool of fixed-size blocks; a sequence owns a list of block
ids (its block table) and position p of the sequence lives at slot
block_table[p // block_size] * block_size + p % block_size. The scheduler
(Rust) decides tables and slots; this module only stores and attends.

Layout per layer and for k and v alike: [num_blocks, block_size,
num_kv_heads, head_dim], the layout the Triton kernels will read. All
layers live in one allocation (2, num_layers, num_blocks, ...) so that
copy-on-write of blocks is a single gather/scatter for every layer.

`PagedAttention` is built once per step from the scheduler's plan arrays and
implements `attend(layer_idx, q, k, v)` for the model. Everything that does
not depend on the layer (validation, grouping, gather indices, masks) is
done in `__init__`, so a layer call is only the cache write, the gathers and
the SDPA calls.

Measured on the 2-core dev box (AMD EPYC, 1 MiB L2 per core, 32 MiB L3,
torch 2.15 CPU, 2 threads), SmolLM2 shapes (9 heads, 3 kv heads, head_dim 64,
30 layers), fp32 cache, block_size 16, shuffled block tables, every layer
reading its own cache so KV comes from DRAM as in a real step
(bench/paged_attention.py; us per layer call, decode):

    batch x context   per-seq loop   grouped (default)   one padded call
    1 x 64                   53            53                 53
    1 x 1024                224           225                227
    8 x 64                  376           109 (3.5x)         113
    8 x 256                 661           325 (2.0x)         330
    8 x 1024               1803          1338 (1.35x)       1347
    8 x 64..1024           1228           895 (1.37x)       1339 (0.92x)
    32 x 64                1462           359 (4.1x)         361
    32 x 256               2594          1284 (2.0x)        1313
    32 x 1024              7454          5492 (1.36x)       8557 (0.87x)
    32 x 64..1024          5298          3635 (1.46x)       8062 (0.66x)

What each piece bought:

- Decode is bandwidth-bound: SDPA over n sequences costs ~n times one, so
  batching saves the per-call cost (~38 us: 2 gathers, SDPA dispatch,
  output copy) and nothing else; a padded (masked) key costs as much as a
  real one (~0.18 us per position). Grouping sorts decodes by context and
  pads a shorter one into the open group while that costs less than a call
  (DEFAULT_CALL_COST_TOKENS): 3.5-4x at short contexts, 1.3-1.5x at long
  or mixed ones. Padding everything into one call loses at batch 32 long or
  mixed contexts (0.66-0.87x of the loop): 2x the bytes for mixed contexts
  and a gather too big for the caches (next point).
- A group's gathered k+v stay under DEFAULT_MAX_CALL_BYTES (4 MiB), so the
  copy is still in cache when SDPA reads it: 32 x 1024 in 2-sequence calls
  5.5 ms vs one call 8.6 ms. 2 MiB was slower (more calls), 8 MiB erratic.
- The gather buffers are allocated once per step and reused by every group
  and layer (index_select(out=)): fresh multi-MB tensors come from mmap and
  page-fault on every call, 1.2-3x slower in some runs (8 x 256: 1115 vs
  338 us), the same in others.
- Gathering is worth it even when a sequence's blocks are consecutive: SDPA
  on a view of the cache (strided, from DRAM) was 1.4x slower at 1024
  positions than index_select into a buffer + SDPA on the copy.
  Block-granular index_select (a row per block) beats a token index and
  `t[idx]`; one index_select over k and v together (dim 1 of kv[:, layer])
  was 1.5x slower at 8 x 512 than two (dim-0 kernel).
- GQA for decode: the G = H / K query heads of one kv head act as its
  "query rows", q.view(n, K, G, D) against k (n, K, L, D), instead of
  enable_gqa (which expands k/v on CPU): 2-10% (8 x 1024: 1333 vs 1466 us).
- A prefill chunk that starts at position 0 attends over the step's own k/v
  (no gather) with is_causal=True: 4.05 vs 4.43 ms per layer for 512 tokens
  against gather + explicit mask. A mid-sequence chunk gathers its blocks
  and uses a bottom-right causal mask built once per step (bool, float and
  torch's causal_lower_right measured within 5%): 8.7 ms for 512 queries
  over 1024 keys.
- Per-step planning (validation, grouping, masks, in __init__): ~0.1 ms at
  batch 1, 0.2-0.9 ms at batch 32, against 30 layer calls per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from mistralrs_serve import _native
from mistralrs_serve.config import ModelConfig

DecodeMode = Literal["native", "triton", "group", "pad", "loop"]

# Padding positions worth one extra SDPA call in decode grouping: a shorter
# context joins the open (longer) group, padded and masked, while it is at
# most this much shorter. One call costs ~38 us (batch 8 x 64: loop 376 us,
# one call 109 us), one key position ~0.18 us (batch 1: 53 us at 64, 224 us
# at 1024), so break-even is ~200. Measured at 8/32/64 x 64..1024: 192 best
# or tied (8: 840 us vs 981 at 96 and 1169 ungrouped).
DEFAULT_CALL_COST_TOKENS = 192
# Most gathered k+v bytes per decode SDPA call (see the module docstring).
DEFAULT_MAX_CALL_BYTES = 4 << 20


# torch's CPU attention kernels run fp32 5-9x faster than bf16 (decode over
# 512 cached positions: 68 vs 380 us per layer): SDPA inputs are converted
# on the CPU
ATTN_DTYPE = torch.float32
# cache dtypes the Rust decode kernel reads
_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


class PagedKVCache:
    """Block pool of keys and values for every layer.

    `k[layer]` and `v[layer]` are contiguous [num_blocks, block_size,
    num_kv_heads, head_dim] tensors (views into one allocation `kv`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.config = cfg
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.num_kv_heads, self.head_dim = cfg.num_kv_heads, cfg.head_dim
        # zeros, not empty: padded decode groups read (masked) positions that
        # no sequence wrote; masked keys get weight 0, but 0 * NaN garbage in v
        # would still poison the output.
        self.kv = torch.zeros(
            (2, cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim),
            dtype=dtype,
            device=device,
        )
        self.k = self.kv[0]  # (num_layers, num_blocks, block_size, K, D); k[layer] is contiguous
        self.v = self.kv[1]
        # numpy views for the Rust kernels (bf16 as its int16 bits): the whole
        # cache (the fused forward) and each layer (decode attention)
        native = dtype in _NATIVE_DTYPES and self.kv.device.type == "cpu"
        bits = self.kv.view(torch.int16) if dtype == torch.bfloat16 else self.kv
        self.kv_np = bits.numpy() if native else None
        self.k_np = [bits[0, i].numpy() for i in range(cfg.num_layers)] if native else []
        self.v_np = [bits[1, i].numpy() for i in range(cfg.num_layers)] if native else []

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes over all layers, keys and values."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem

    @staticmethod
    def num_blocks_for_budget(
        cfg: ModelConfig, block_size: int, dtype: torch.dtype, budget_bytes: int
    ) -> int:
        """Most blocks that fit in budget_bytes (0 if not even one does)."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        return budget_bytes // PagedKVCache.bytes_per_block(cfg, block_size, dtype)

    def copy_blocks(self, pairs: np.ndarray) -> None:
        """Copy block src to block dst in every layer, for each (src, dst) row.

        All sources are read before any destination is written, so a block
        may be both a source and (of another pair) a destination; destinations
        must be distinct.
        """
        pairs = np.asarray(pairs)
        if pairs.size == 0:
            return
        if pairs.ndim != 2 or pairs.shape[1] != 2:
            raise ValueError(f"copy_blocks wants (k, 2) src/dst pairs, got shape {pairs.shape}")
        if pairs.min() < 0 or pairs.max() >= self.num_blocks:
            raise ValueError(f"copy_blocks: block ids must be in [0, {self.num_blocks})")
        if len(np.unique(pairs[:, 1])) != len(pairs):
            raise ValueError("copy_blocks: destination blocks must be distinct")
        idx = torch.from_numpy(pairs.astype(np.int64)).to(self.kv.device)
        self.kv[:, :, idx[:, 1]] = self.kv[:, :, idx[:, 0]]

    def store_triton(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Write rows of k/v (T, K, D) to their slots of one layer (Triton; slot -1: skipped)."""
        from mistralrs_kernels import triton_ops

        triton_ops.store_kv(
            k.to(self.dtype).contiguous(),
            v.to(self.dtype).contiguous(),
            self.k[layer_idx],
            self.v[layer_idx],
            slots,
            check_slots=False,
        )

    def decode_triton(
        self,
        layer_idx: int,
        q: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        max_context_len: int,
    ) -> torch.Tensor:
        """One query row per sequence (n, H, D) over one layer -> (n, H * D) in the cache's dtype."""
        from mistralrs_kernels import triton_ops

        o = triton_ops.paged_decode_attention(
            q.to(self.dtype).contiguous(),
            self.k[layer_idx],
            self.v[layer_idx],
            block_tables,
            context_lens,
            scale,
            max_context_len=max_context_len,
        )
        return o.view(len(q), -1)


@dataclass(frozen=True)
class _DecodeGroup:
    """Single-query sequences attended in one SDPA call, padded to `length`."""

    rows: slice | torch.Tensor  # their rows in q / the output
    blocks: torch.Tensor  # (n * max_blocks,) block ids, padding -> block 0
    num_seqs: int
    max_blocks: int
    length: int  # keys attended (max context in the group)
    mask: torch.Tensor | None  # (n, 1, 1, length) additive, None if all contexts equal


@dataclass(frozen=True)
class _NativeDecode:
    """Single-query sequences for the Rust kernel: it reads each table in place."""

    rows: slice | None  # their rows when they are all rows 0..n in order
    row_index: torch.Tensor  # (n,) their rows in q / the output
    block_tables: np.ndarray  # (n, max_blocks) int64, C-contiguous
    context_lens: np.ndarray  # (n,) int64
    # the Triton kernel's (block_tables, context_lens) int32 on the cache's device, max context
    triton: tuple[torch.Tensor, torch.Tensor, int] | None = None

    @staticmethod
    def build(
        starts: np.ndarray,
        ctxs: np.ndarray,
        tables: np.ndarray,
        block_size: int,
        device: torch.device,
        *,
        triton: bool = False,
    ) -> _NativeDecode:
        max_blocks = max(1, -(-int(ctxs.max()) // block_size))
        contiguous = bool(starts[0] == 0 and (np.diff(starts) == 1).all())
        block_tables = np.ascontiguousarray(tables[:, :max_blocks], dtype=np.int64)
        context_lens = np.ascontiguousarray(ctxs, dtype=np.int64)
        on_device = None
        if triton:
            on_device = (
                torch.from_numpy(block_tables.astype(np.int32)).to(device),
                torch.from_numpy(context_lens.astype(np.int32)).to(device),
                int(ctxs.max()),
            )
        return _NativeDecode(
            slice(0, len(starts)) if contiguous else None,
            torch.from_numpy(np.ascontiguousarray(starts, dtype=np.int64)).to(device),
            block_tables,
            context_lens,
            on_device,
        )


@dataclass(frozen=True)
class _Prefill:
    """A chunk of query_len > 1 tokens of one sequence."""

    rows: slice
    context_len: int
    blocks: torch.Tensor | None  # None: chunk starts at 0, attend over the step's own k/v
    mask: torch.Tensor | None  # (query_len, context_len) bool, bottom-right causal


class PagedAttention:
    """Attention backend of one step over a PagedKVCache.

    query_lens (S,), context_lens (S,), slot_mapping (T,), block_tables
    (S, max_blocks) as produced by the scheduler (see module docstring).
    Tokens [sum(query_lens), T) are padding: slot -1, output rows zero.
    Sequences' tokens are laid out contiguously in order.

    decode_mode picks how single-query sequences are batched: "group"
    (default, measured best), "pad" (one call padded to the longest context)
    or "loop" (one call per sequence; the baseline the bench compares with).
    """

    def __init__(
        self,
        cache: PagedKVCache,
        query_lens: np.ndarray,
        context_lens: np.ndarray,
        slot_mapping: np.ndarray,
        block_tables: np.ndarray,
        *,
        decode_mode: DecodeMode = "native",
        call_cost_tokens: int = DEFAULT_CALL_COST_TOKENS,
        max_call_bytes: int = DEFAULT_MAX_CALL_BYTES,
    ) -> None:
        self.cache = cache
        qlens = np.asarray(query_lens, dtype=np.int64)
        ctxs = np.asarray(context_lens, dtype=np.int64)
        slots = np.asarray(slot_mapping, dtype=np.int64)
        tables = np.asarray(block_tables, dtype=np.int64)
        if tables.ndim == 1 and tables.size == 0:
            tables = tables.reshape(len(qlens), 0)
        _validate(cache, qlens, ctxs, slots, tables)
        self.num_tokens = len(slots)
        self.num_query_tokens = int(qlens.sum())
        kv, d = cache.num_kv_heads, cache.head_dim
        self._kv_heads, self._head_dim = kv, d
        self._scale = 1.0 / float(d) ** 0.5

        dev = cache.kv.device
        self._device = dev
        # fp32 SDPA on the CPU (see ATTN_DTYPE); the cache's dtype on a GPU
        self._attn_dtype = ATTN_DTYPE if dev.type == "cpu" else cache.dtype
        if decode_mode == "native" and not cache.k_np:
            decode_mode = "group"  # no numpy views of this cache for the Rust kernel

        # cache write: the Triton store reads every token's slot (-1: padding) on the
        # device; index_copy_ takes the rows of k/v with a slot, and those slots
        self._slots_dev: torch.Tensor | None = None
        self._write_slots = self._write_rows = None
        if decode_mode == "triton":
            self._slots_dev = torch.from_numpy(slots).to(dev)
        else:
            written = slots >= 0
            self._write_slots = torch.from_numpy(slots[written]).to(dev)
            if not written.all():
                self._write_rows = torch.from_numpy(np.flatnonzero(written)).to(dev)

        starts = np.concatenate(([0], np.cumsum(qlens)[:-1])).astype(np.int64)
        bs = cache.block_size
        is_decode = qlens == 1
        # Triton with any prefill: one mixed kernel for every sequence of the step
        self._mixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None
        if decode_mode == "triton" and not is_decode.all():
            cu = np.concatenate(([0], np.cumsum(qlens))).astype(np.int32)
            self._mixed = (
                torch.from_numpy(np.ascontiguousarray(tables, dtype=np.int32)).to(dev),
                torch.from_numpy(cu).to(dev),
                torch.from_numpy(ctxs.astype(np.int32)).to(dev),
                int(qlens.max()),
            )
            is_decode = np.zeros_like(is_decode)  # nothing left for the paths below
            qlens_left = np.zeros_like(qlens)
        else:
            qlens_left = qlens
        self.decode_mode = decode_mode
        self._native_decode: _NativeDecode | None = None
        if decode_mode in ("native", "triton") and is_decode.any():
            self._native_decode = _NativeDecode.build(
                starts[is_decode], ctxs[is_decode], tables[is_decode], bs, dev, triton=decode_mode == "triton"
            )
        self.decode_groups = (
            []
            if decode_mode in ("native", "triton")
            else _decode_groups(
                starts[is_decode],
                ctxs[is_decode],
                tables[is_decode],
                bs,
                decode_mode,
                call_cost_tokens,
                max(1, max_call_bytes // (2 * kv * d * cache.kv.element_size())),
                self._attn_dtype,
                dev,
            )
        )
        self.prefills: list[_Prefill] = []
        for s in np.flatnonzero(~is_decode & (qlens_left > 0)):
            q_len, ctx, start = int(qlens[s]), int(ctxs[s]), int(starts[s])
            rows = slice(start, start + q_len)
            if q_len == ctx:
                self.prefills.append(_Prefill(rows, ctx, None, None))
                continue
            nb = -(-ctx // bs)
            blocks = torch.from_numpy(np.ascontiguousarray(tables[s, :nb])).to(dev)
            query_pos = torch.arange(ctx - q_len, ctx, device=dev).unsqueeze(1)
            mask = torch.arange(ctx, device=dev).unsqueeze(0) <= query_pos
            self.prefills.append(_Prefill(rows, ctx, blocks, mask))
        # gather buffers reused by every group and layer of the step: fresh
        # multi-MB tensors per call come from mmap and page-fault each time
        gathered = [len(g.blocks) for g in self.decode_groups] + [
            len(p.blocks) for p in self.prefills if p.blocks is not None
        ]
        buf_shape = (max(gathered, default=0), bs, kv, d)
        self._k_buf = torch.empty(buf_shape, dtype=cache.dtype, device=dev)
        self._v_buf = torch.empty(buf_shape, dtype=cache.dtype, device=dev)
        # decode-only step whose single group covers every row in order: no
        # gather of q rows / scatter of output rows needed
        self._direct = (
            not self.prefills
            and self._native_decode is None
            and len(self.decode_groups) == 1
            and isinstance(self.decode_groups[0].rows, slice)
            and self.num_query_tokens == self.num_tokens
        )

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (T, H, D), k/v (T, K, D) already rotated -> (T, H * D) in q.dtype."""
        cache = self.cache
        dtype, kv, d = cache.dtype, self._kv_heads, self._head_dim
        k_cache, v_cache = cache.k[layer_idx], cache.v[layer_idx]
        k_new, v_new = k.to(dtype), v.to(dtype)
        if self._slots_dev is not None:  # Triton: one kernel for k and v, padding slots skipped
            cache.store_triton(layer_idx, k_new, v_new, self._slots_dev)
        else:
            assert self._write_slots is not None
            written = self._write_rows
            if written is not None:  # padding rows have no slot
                k_new, v_new = k_new.index_select(0, written), v_new.index_select(0, written)
            k_cache.view(-1, kv, d).index_copy_(0, self._write_slots, k_new)
            v_cache.view(-1, kv, d).index_copy_(0, self._write_slots, v_new)

        num_tokens, num_heads = q.shape[0], q.shape[1]
        if self._mixed is not None:
            from mistralrs_kernels import triton_ops

            tables, cu, ctxs, max_q = self._mixed
            o = triton_ops.paged_prefill_attention(
                q.to(dtype).contiguous(), k_cache, v_cache, tables, cu, ctxs, self._scale, max_query_len=max_q
            )
            return o.view(num_tokens, num_heads * d).to(q.dtype)
        groups = num_heads // kv
        nat = self._native_decode
        all_decode = not self.prefills and self.num_query_tokens == num_tokens
        if nat is not None and nat.rows is not None and all_decode:
            return self._decode_native(layer_idx, nat, q).to(q.dtype)  # decode-only step
        qc = q.to(self._attn_dtype)
        if self._direct:
            return self._decode(self.decode_groups[0], qc, k_cache, v_cache, groups).to(q.dtype)

        padded = self.num_query_tokens != num_tokens
        shape = (num_tokens, num_heads * d)
        out = (torch.zeros if padded else torch.empty)(shape, dtype=self._attn_dtype, device=self._device)
        if nat is not None:
            rows_t = nat.row_index
            decoded = self._decode_native(layer_idx, nat, q.index_select(0, rows_t))
            out.index_copy_(0, rows_t, decoded.to(self._attn_dtype))
        for g in self.decode_groups:
            rows = g.rows
            if isinstance(rows, slice):
                out[rows] = self._decode(g, qc[rows], k_cache, v_cache, groups)
            else:
                out.index_copy_(0, rows, self._decode(g, qc.index_select(0, rows), k_cache, v_cache, groups))
        for p in self.prefills:
            q_s = qc[p.rows].transpose(0, 1)  # (H, q_len, D)
            if p.blocks is None:
                k_s = k[p.rows].to(self._attn_dtype).transpose(0, 1)
                v_s = v[p.rows].to(self._attn_dtype).transpose(0, 1)
                o = F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=True, enable_gqa=groups > 1)
            else:
                k_s = self._gather(k_cache, p.blocks, self._k_buf).view(-1, kv, d)[: p.context_len]
                v_s = self._gather(v_cache, p.blocks, self._v_buf).view(-1, kv, d)[: p.context_len]
                k_s, v_s = k_s.to(self._attn_dtype).transpose(0, 1), v_s.to(self._attn_dtype).transpose(0, 1)
                o = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=p.mask, enable_gqa=groups > 1)
            out[p.rows] = o.transpose(0, 1).reshape(-1, num_heads * d)
        return out.to(q.dtype)

    def _decode_native(self, layer_idx: int, nat: _NativeDecode, q: torch.Tensor) -> torch.Tensor:
        """q (n, H, D) of the decode rows -> (n, H * D), by the Rust kernel (fp32 out)
        or the Triton kernel (the cache's dtype out) over the cache."""
        if nat.triton is not None:
            tables, ctxs, max_ctx = nat.triton
            return self.cache.decode_triton(layer_idx, q, tables, ctxs, self._scale, max_ctx)
        qf = q.float().contiguous()
        out = torch.empty_like(qf)
        cache = self.cache
        _native.paged_decode_attention(
            qf.numpy(),
            cache.k_np[layer_idx],
            cache.v_np[layer_idx],
            nat.block_tables,
            nat.context_lens,
            self._scale,
            out.numpy(),
        )
        return out.view(len(qf), -1)

    def _decode(
        self, g: _DecodeGroup, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, groups: int
    ) -> torch.Tensor:
        """q (n, H, D) single queries of the group -> (n, H * D)."""
        n, kv, d = g.num_seqs, self._kv_heads, self._head_dim
        span = g.max_blocks * self.cache.block_size
        # k and v gathered apart: one index_select over both (dim 1 of kv[:, layer])
        # took 1.5x as long at batch 8 x 512 positions (a slower non-dim-0 kernel)
        k_g = self._gather(k_cache, g.blocks, self._k_buf).view(n, span, kv, d)
        v_g = self._gather(v_cache, g.blocks, self._v_buf).view(n, span, kv, d)
        if g.length != span:
            k_g, v_g = k_g[:, : g.length], v_g[:, : g.length]
        k_g, v_g = k_g.to(self._attn_dtype).transpose(1, 2), v_g.to(self._attn_dtype).transpose(1, 2)
        # the `groups` query heads sharing a kv head act as its query rows
        o = F.scaled_dot_product_attention(q.reshape(n, kv, groups, d), k_g, v_g, attn_mask=g.mask)
        return o.reshape(n, -1)

    @staticmethod
    def _gather(cache: torch.Tensor, blocks: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """cache[blocks] into the front of buf."""
        return torch.index_select(cache, 0, blocks, out=buf[: len(blocks)])


def _decode_groups(
    starts: np.ndarray,
    ctxs: np.ndarray,
    tables: np.ndarray,
    block_size: int,
    mode: DecodeMode,
    call_cost_tokens: int,
    max_call_positions: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[_DecodeGroup]:
    """Partition single-query sequences into SDPA calls (see module docstring)."""
    n = len(ctxs)
    if n == 0:
        return []
    if mode == "loop":
        parts = [np.array([i]) for i in range(n)]
    elif mode == "pad":
        parts = [np.arange(n)]
    else:
        # longest first, stable so equal contexts keep their order; a sequence
        # joins the open group while padding it to the group's length is
        # cheaper than a call of its own and the group's gathered k/v stay
        # under max_call_positions
        order = np.argsort(-ctxs, kind="stable")
        parts, current = [], [int(order[0])]
        for i in order[1:]:
            longest = int(ctxs[current[0]])
            fits = (len(current) + 1) * longest <= max_call_positions
            if fits and longest - ctxs[i] <= call_cost_tokens:
                current.append(i)
            else:
                parts.append(np.array(current))
                current = [i]
        parts.append(np.array(current))
    out = []
    for idx in parts:
        idx = np.sort(idx)  # row order: makes the rows a slice when they are consecutive
        c = ctxs[idx]
        length = int(c.max())
        max_blocks = -(-length // block_size)
        blocks = tables[idx, :max_blocks].copy()
        blocks[blocks < 0] = 0  # beyond a shorter sequence's table: masked, any block will do
        mask = None
        if (c != length).any():
            keep = torch.from_numpy(np.arange(length)[None, :] < c[:, None]).to(device)
            mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf"))
            mask = mask.view(len(idx), 1, 1, length)
        row_ids = starts[idx]
        rows: slice | torch.Tensor
        if (np.diff(row_ids) == 1).all():
            rows = slice(int(row_ids[0]), int(row_ids[-1]) + 1)
        else:
            rows = torch.from_numpy(row_ids).to(device)
        out.append(
            _DecodeGroup(
                rows, torch.from_numpy(blocks.reshape(-1)).to(device), len(idx), max_blocks, length, mask
            )
        )
    return out


def _validate(
    cache: PagedKVCache, qlens: np.ndarray, ctxs: np.ndarray, slots: np.ndarray, tables: np.ndarray
) -> None:
    """Cheap (per step, vectorised) consistency checks of a scheduler plan."""
    num_seqs = len(qlens)
    if len(ctxs) != num_seqs or tables.ndim != 2 or tables.shape[0] != num_seqs:
        raise ValueError(
            f"plan shapes disagree: query_lens {qlens.shape}, context_lens {ctxs.shape}, "
            f"block_tables {tables.shape}"
        )
    if slots.ndim != 1:
        raise ValueError(f"slot_mapping must be 1-D, got shape {slots.shape}")
    if num_seqs and (qlens.min() < 1 or (ctxs < qlens).any()):
        raise ValueError("every sequence needs query_len >= 1 and context_len >= query_len")
    num_query = int(qlens.sum())
    if num_query > len(slots):
        raise ValueError(f"query_lens sum to {num_query} tokens but slot_mapping has {len(slots)}")
    bs = cache.block_size
    needed = -(-ctxs // bs)
    if num_seqs and needed.max() > tables.shape[1]:
        raise ValueError(f"a context needs {needed.max()} blocks; block_tables has {tables.shape[1]} columns")
    used = np.arange(tables.shape[1])[None, :] < needed[:, None]
    if ((tables < 0) | (tables >= cache.num_blocks))[used].any():
        raise ValueError(f"block_tables: a used entry is outside [0, {cache.num_blocks})")
    if ((slots < -1) | (slots >= cache.num_blocks * bs)).any():
        raise ValueError(f"slot_mapping: slots must be -1 or in [0, {cache.num_blocks * bs})")
    # the slot of each sequence token must be where its position lives
    seq = np.repeat(np.arange(num_seqs), qlens)
    first = np.concatenate(([0], np.cumsum(qlens)[:-1]))
    pos = np.arange(num_query) - first[seq] + (ctxs - qlens)[seq]
    expected = tables[seq, pos // bs] * bs + pos % bs
    if (slots[:num_query] != expected).any():
        bad = int(np.flatnonzero(slots[:num_query] != expected)[0])
        raise ValueError(
            f"slot_mapping[{bad}] = {slots[bad]} but its position {pos[bad]} of sequence "
            f"{seq[bad]} lives at slot {expected[bad]}"
        )
    written = slots[slots >= 0]
    if len(np.unique(written)) != len(written):
        raise ValueError("slot_mapping writes a slot twice")
