"""Attention over the paged KV cache: the interface models call, and the backend
that implements it for one step, choosing the kernel: the Rust decode kernel on
the CPU, Triton's on a GPU with Triton, torch's SDPA otherwise and for prefill
chunks off Triton. The figures behind each choice are in bench/README.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from mistralrs_serve import _native
from mistralrs_serve.layers.attention_plan import (
    DecodeGroup,
    KernelDecode,
    Prefill,
    Spans,
    decode_groups,
    mixed_triton,
    prefills,
    validate_plan,
    visibility,
)

if TYPE_CHECKING:
    from mistralrs_serve.engine.kv_cache import PagedKVCache

# "native": the Rust decode kernel (needs the cache's numpy views; else "group");
# "triton": the Triton store, decode and prefill kernels; "group": SDPA calls.
AttentionKernel = Literal["native", "triton", "group"]

# A shorter context joins an open decode group (padded and masked) while it is
# at most this much shorter: one SDPA call costs about as much as ~200 key
# positions (38 us vs 0.18 us each); 192 measured best at batch 8-64.
DEFAULT_CALL_COST_TOKENS = 192
# Most gathered k+v bytes per decode SDPA call: the copy is still in cache when
# SDPA reads it (batch 32 x 1024: 5.5 ms in 4 MiB calls vs 8.6 ms in one).
DEFAULT_MAX_CALL_BYTES = 4 << 20
# torch's CPU attention runs fp32 5-9x faster than bf16 (68 vs 380 us per layer
# over 512 positions), so SDPA inputs are converted on the CPU
ATTN_DTYPE = torch.float32


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends, where it differs from plain causal softmax attention
    scaled by 1/sqrt(head_dim): a sliding window (a query at position i sees keys
    at positions i - window + 1 .. i, as transformers masks it), another scale
    (Gemma's query_pre_attn_scalar), and tanh soft-capping of the scores
    (Gemma 2's `cap * tanh(s / cap)`)."""

    window: int | None = None
    scale: float | None = None
    softcap: float | None = None


PLAIN = LayerAttention()


class AttentionBackend(Protocol):
    """Stores a step's keys/values and attends over everything cached."""

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        how: LayerAttention = PLAIN,
    ) -> torch.Tensor:
        """q (T, H, D), k/v (T, K, D) already rotated -> (T, H * D)."""
        ...


def windowed_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    first_query_pos: int,
    first_key_pos: int,
    how: LayerAttention,
    spans: tuple[tuple[int, int], ...] = (),
) -> torch.Tensor:
    """Causal attention of one sequence's queries q (Tq, H, D) over its keys and
    values k/v (Tk, K, D) in fp32, with `how`'s window, scale and soft-cap;
    positions count from the sequence's start. Inside each of `spans` queries see
    every key of the span (then the window applies, as transformers composes
    Gemma 3's masks). -> (Tq, H * D)."""
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[2]
    groups = heads // kv_heads
    qf = q.float().reshape(q.shape[0], kv_heads, groups, d)  # (Tq, K, G, D)
    scores = torch.einsum("qkgd,tkd->kgqt", qf, k.float())  # (K, G, Tq, Tk)
    scores = scores * (how.scale if how.scale is not None else d**-0.5)
    if how.softcap is not None:
        scores = torch.tanh(scores / how.softcap) * how.softcap
    visible = visibility(first_query_pos, q.shape[0], first_key_pos, k.shape[0], spans, q.device, how.window)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.einsum("kgqt,tkd->qkgd", probs, v.float())  # (Tq, K, G, D)
    return out.reshape(q.shape[0], heads * d)


def store_kv_triton(
    cache: PagedKVCache, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write rows of k/v (T, K, D) to their slots of one layer (slot -1: skipped)."""
    from mistralrs_kernels import triton_ops

    triton_ops.store_kv(
        k.to(cache.dtype).contiguous(),
        v.to(cache.dtype).contiguous(),
        cache.k[layer_idx],
        cache.v[layer_idx],
        slots,
        check_slots=False,
    )


def decode_triton(
    cache: PagedKVCache,
    layer_idx: int,
    q: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
) -> torch.Tensor:
    """One query row per sequence (n, H, D) over one layer -> (n, H * D) in the cache's dtype."""
    from mistralrs_kernels import triton_ops

    o = triton_ops.paged_decode_attention(
        q.to(cache.dtype).contiguous(),
        cache.k[layer_idx],
        cache.v[layer_idx],
        block_tables,
        context_lens,
        scale,
        max_context_len=max_context_len,
    )
    return o.view(len(q), -1)


class PagedAttention:
    """The attention backend of one step over a PagedKVCache, built from the
    scheduler's query_lens (S,), context_lens (S,), slot_mapping (T,) and
    block_tables (S, max_blocks). Sequences' tokens are laid out contiguously in
    order; tokens [sum(query_lens), T) are padding: slot -1, output rows zero.
    Everything that does not depend on the layer is planned here, once per step.

    call_cost_tokens and max_call_bytes tune how "group" batches decodes into
    SDPA calls: -1 gives one call per sequence, a huge value one padded call.
    `bidirectional`: per sequence, position ranges whose tokens attend to each
    other both ways (Gemma 3's images; engine/media.py), masked into its chunks.
    """

    def __init__(
        self,
        cache: PagedKVCache,
        query_lens: np.ndarray,
        context_lens: np.ndarray,
        slot_mapping: np.ndarray,
        block_tables: np.ndarray,
        *,
        decode_mode: AttentionKernel = "native",
        call_cost_tokens: int = DEFAULT_CALL_COST_TOKENS,
        max_call_bytes: int = DEFAULT_MAX_CALL_BYTES,
        bidirectional: Spans | None = None,
    ) -> None:
        qlens = np.asarray(query_lens, dtype=np.int64)
        ctxs = np.asarray(context_lens, dtype=np.int64)
        slots = np.asarray(slot_mapping, dtype=np.int64)
        tables = np.asarray(block_tables, dtype=np.int64)
        if tables.ndim == 1 and tables.size == 0:
            tables = tables.reshape(len(qlens), 0)
        validate_plan(cache, qlens, ctxs, slots, tables)
        if decode_mode == "native" and not cache.k_np:
            decode_mode = "group"  # no numpy views of this cache for the Rust kernel
        self.cache, self.decode_mode = cache, decode_mode
        self.num_tokens, self.num_query_tokens = len(slots), int(qlens.sum())
        self._scale = 1.0 / float(cache.head_dim) ** 0.5
        self._device = dev = cache.kv.device
        # fp32 SDPA on the CPU (see ATTN_DTYPE); the cache's dtype on a GPU
        self._attn_dtype = ATTN_DTYPE if dev.type == "cpu" else cache.dtype
        self._plan_writes(slots)

        starts = np.concatenate(([0], np.cumsum(qlens)[:-1])).astype(np.int64)
        # per sequence (first row, query_len, context_len, block table, bidirectional spans)
        # for layers with a window or soft-cap (LayerAttention), which attend one by one
        spans = bidirectional if bidirectional is not None and any(bidirectional) else None
        per_seq = spans if spans is not None else [()] * len(qlens)
        self._sequences = list(
            zip(starts.tolist(), qlens.tolist(), ctxs.tolist(), tables, per_seq, strict=True)
        )
        self._max_context = int(ctxs.max(initial=0))
        is_decode = qlens == 1
        self._mixed = None
        # the mixed Triton kernel is causal only: a step with bidirectional spans takes SDPA
        if decode_mode == "triton" and not is_decode.all() and spans is None:
            self._mixed = mixed_triton(qlens, ctxs, tables, dev)
            is_decode = np.zeros_like(is_decode)  # the mixed kernel covers every sequence
        self._kernel_decode = None
        if decode_mode != "group" and is_decode.any():
            sel = (starts[is_decode], ctxs[is_decode], tables[is_decode], cache.block_size, dev)
            self._kernel_decode = KernelDecode.build(*sel, triton=decode_mode == "triton")
        self.decode_groups: list[DecodeGroup] = []
        if decode_mode == "group":
            position_bytes = 2 * cache.num_kv_heads * cache.head_dim * cache.kv.element_size()
            self.decode_groups = decode_groups(
                starts[is_decode],
                ctxs[is_decode],
                tables[is_decode],
                cache.block_size,
                call_cost_tokens,
                max(1, max_call_bytes // position_bytes),
                self._attn_dtype,
                dev,
            )
        self.prefills: list[Prefill] = []
        if self._mixed is None:
            self.prefills = prefills(qlens, ctxs, tables, starts, cache.block_size, dev, spans)
        self._allocate_gather_buffers()
        # decode-only step whose single group covers every row in order: no
        # gather of q rows / scatter of output rows needed
        self._direct = (
            not self.prefills
            and self._kernel_decode is None
            and len(self.decode_groups) == 1
            and isinstance(self.decode_groups[0].rows, slice)
            and self.num_query_tokens == self.num_tokens
        )

    def _plan_writes(self, slots: np.ndarray) -> None:
        """The cache write: the Triton store reads every token's slot (-1: padding) on
        the device; index_copy_ takes the rows of k/v with a slot, and those slots."""
        dev = self._device
        self._slots_dev: torch.Tensor | None = None
        self._write_slots: torch.Tensor | None = None
        self._write_rows: torch.Tensor | None = None
        if self.decode_mode == "triton":
            self._slots_dev = torch.from_numpy(slots).to(dev)
            return
        written = slots >= 0
        self._write_slots = torch.from_numpy(slots[written]).to(dev)
        if not written.all():
            self._write_rows = torch.from_numpy(np.flatnonzero(written)).to(dev)

    def _allocate_gather_buffers(self) -> None:
        """Reused by every group and layer of the step: fresh multi-MB tensors per
        call come from mmap and page-fault each time (up to 3x slower)."""
        cache = self.cache
        gathered = [len(g.blocks) for g in self.decode_groups] + [
            len(p.blocks) for p in self.prefills if p.blocks is not None
        ]
        shape = (max(gathered, default=0), cache.block_size, cache.num_kv_heads, cache.head_dim)
        self._k_buf = torch.empty(shape, dtype=cache.dtype, device=self._device)
        self._v_buf = torch.empty(shape, dtype=cache.dtype, device=self._device)

    def attend(
        self,
        layer_idx: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        how: LayerAttention = PLAIN,
    ) -> torch.Tensor:
        """q (T, H, D), k/v (T, K, D) already rotated -> (T, H * D) in q.dtype."""
        self._store(layer_idx, k, v)
        if how.window is not None and self._max_context <= how.window:
            how = LayerAttention(None, how.scale, how.softcap)  # every key is inside the window
        if how.window is not None or how.softcap is not None:
            return self._attend_each(layer_idx, q, how).to(q.dtype)
        scale = self._scale if how.scale is None else how.scale
        num_tokens, num_heads, d = q.shape
        mixed = self._mixed
        if mixed is not None:
            from mistralrs_kernels import triton_ops

            cache = self.cache
            o = triton_ops.paged_prefill_attention(
                q.to(cache.dtype).contiguous(),
                cache.k[layer_idx],
                cache.v[layer_idx],
                mixed.block_tables,
                mixed.cu_query_lens,
                mixed.context_lens,
                scale,
                max_query_len=mixed.max_query_len,
            )
            return o.view(num_tokens, num_heads * d).to(q.dtype)
        kd = self._kernel_decode
        all_decode = not self.prefills and self.num_query_tokens == num_tokens
        if kd is not None and kd.rows is not None and all_decode:
            return self._decode_kernel(layer_idx, kd, q, scale).to(q.dtype)  # decode-only step
        return self._attend_torch(layer_idx, q, k, v, scale).to(q.dtype)

    def _store(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        cache = self.cache
        k_new, v_new = k.to(cache.dtype), v.to(cache.dtype)
        if self._slots_dev is not None:  # Triton: one kernel for k and v, padding slots skipped
            store_kv_triton(cache, layer_idx, k_new, v_new, self._slots_dev)
            return
        assert self._write_slots is not None
        written = self._write_rows
        if written is not None:  # padding rows have no slot
            k_new, v_new = k_new.index_select(0, written), v_new.index_select(0, written)
        kv, d = cache.num_kv_heads, cache.head_dim
        cache.k[layer_idx].view(-1, kv, d).index_copy_(0, self._write_slots, k_new)
        cache.v[layer_idx].view(-1, kv, d).index_copy_(0, self._write_slots, v_new)

    def _attend_each(self, layer_idx: int, q: torch.Tensor, how: LayerAttention) -> torch.Tensor:
        """Sequence by sequence in fp32 over the keys its queries may see: slower than
        the batched paths, and the only one with windows and soft-capping."""
        cache, bs = self.cache, self.cache.block_size
        kv, d = cache.num_kv_heads, cache.head_dim
        out = torch.zeros((q.shape[0], q.shape[1] * d), dtype=torch.float32, device=self._device)
        for start, q_len, ctx, table, spans in self._sequences:
            first_q = ctx - q_len
            first_k = 0 if how.window is None else max(0, first_q - how.window + 1)
            b0, b1 = first_k // bs, -(-ctx // bs)
            blocks = torch.from_numpy(np.ascontiguousarray(table[b0:b1])).to(self._device)
            lo, hi = first_k - b0 * bs, ctx - b0 * bs
            k_s = cache.k[layer_idx].index_select(0, blocks).view(-1, kv, d)[lo:hi]
            v_s = cache.v[layer_idx].index_select(0, blocks).view(-1, kv, d)[lo:hi]
            rows = slice(start, start + q_len)
            out[rows] = windowed_softmax_attention(q[rows], k_s, v_s, first_q, first_k, how, spans)
        return out

    def _attend_torch(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Decode groups and prefill chunks by SDPA, kernel decodes by the kernel."""
        k_cache, v_cache = self.cache.k[layer_idx], self.cache.v[layer_idx]
        kv, d = self.cache.num_kv_heads, self.cache.head_dim
        num_tokens, num_heads = q.shape[0], q.shape[1]
        groups = num_heads // kv
        qc = q.to(self._attn_dtype)
        if self._direct:
            return self._decode(self.decode_groups[0], qc, k_cache, v_cache, groups, scale)
        padded = self.num_query_tokens != num_tokens
        shape = (num_tokens, num_heads * d)
        out = (torch.zeros if padded else torch.empty)(shape, dtype=self._attn_dtype, device=self._device)
        kd = self._kernel_decode
        if kd is not None:
            decoded = self._decode_kernel(layer_idx, kd, q.index_select(0, kd.row_index), scale)
            out.index_copy_(0, kd.row_index, decoded.to(self._attn_dtype))
        for g in self.decode_groups:
            rows = g.rows
            if isinstance(rows, slice):
                out[rows] = self._decode(g, qc[rows], k_cache, v_cache, groups, scale)
            else:
                decoded = self._decode(g, qc.index_select(0, rows), k_cache, v_cache, groups, scale)
                out.index_copy_(0, rows, decoded)
        for p in self.prefills:
            q_s = qc[p.rows].transpose(0, 1)  # (H, q_len, D)
            if p.blocks is None:
                k_s = k[p.rows].to(self._attn_dtype).transpose(0, 1)
                v_s = v[p.rows].to(self._attn_dtype).transpose(0, 1)
                o = F.scaled_dot_product_attention(
                    q_s,
                    k_s,
                    v_s,
                    attn_mask=p.mask,
                    is_causal=p.mask is None,
                    enable_gqa=groups > 1,
                    scale=scale,
                )
            else:
                k_s = self._gather(k_cache, p.blocks, self._k_buf).view(-1, kv, d)[: p.context_len]
                v_s = self._gather(v_cache, p.blocks, self._v_buf).view(-1, kv, d)[: p.context_len]
                k_s, v_s = k_s.to(self._attn_dtype).transpose(0, 1), v_s.to(self._attn_dtype).transpose(0, 1)
                o = F.scaled_dot_product_attention(
                    q_s, k_s, v_s, attn_mask=p.mask, enable_gqa=groups > 1, scale=scale
                )
            out[p.rows] = o.transpose(0, 1).reshape(-1, num_heads * d)
        return out

    def _decode_kernel(self, layer_idx: int, kd: KernelDecode, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q (n, H, D) of the decode rows -> (n, H * D), by the Rust kernel (fp32 out)
        or the Triton kernel (the cache's dtype out) over the cache."""
        if kd.triton is not None:
            tables, ctxs, max_ctx = kd.triton
            return decode_triton(self.cache, layer_idx, q, tables, ctxs, max_ctx, scale)
        qf = q.float().contiguous()
        out = torch.empty_like(qf)
        cache = self.cache
        _native.paged_decode_attention(
            qf.numpy(),
            cache.k_np[layer_idx],
            cache.v_np[layer_idx],
            kd.block_tables,
            kd.context_lens,
            scale,
            out.numpy(),
        )
        return out.view(len(qf), -1)

    def _decode(
        self,
        g: DecodeGroup,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        groups: int,
        scale: float,
    ) -> torch.Tensor:
        """q (n, H, D) single queries of the group -> (n, H * D)."""
        n, kv, d = g.num_seqs, self.cache.num_kv_heads, self.cache.head_dim
        span = g.max_blocks * self.cache.block_size
        # k and v gathered apart: one index_select over both (dim 1 of kv[:, layer])
        # took 1.5x as long at batch 8 x 512 positions (a slower non-dim-0 kernel)
        k_g = self._gather(k_cache, g.blocks, self._k_buf).view(n, span, kv, d)
        v_g = self._gather(v_cache, g.blocks, self._v_buf).view(n, span, kv, d)
        if g.length != span:
            k_g, v_g = k_g[:, : g.length], v_g[:, : g.length]
        k_g, v_g = k_g.to(self._attn_dtype).transpose(1, 2), v_g.to(self._attn_dtype).transpose(1, 2)
        # the `groups` query heads sharing a kv head act as its query rows: 2-10%
        # faster than enable_gqa, which expands k/v on the CPU
        o = F.scaled_dot_product_attention(
            q.reshape(n, kv, groups, d), k_g, v_g, attn_mask=g.mask, scale=scale
        )
        return o.reshape(n, -1)

    @staticmethod
    def _gather(cache: torch.Tensor, blocks: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """cache[blocks] into the front of buf (block-granular index_select: faster
        than SDPA over a strided view of the cache, 1.4x at 1024 positions)."""
        return torch.index_select(cache, 0, blocks, out=buf[: len(blocks)])
