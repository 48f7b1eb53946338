//! One thread's share of a decoder step. Every thread runs every phase and
//! meets the others at the barrier between phases: per-row work (norms,
//! quantization, rotary, cache writes, attention merges, SwiGLU) on the
//! thread's own rows; pieces of matrix products and attention units to
//! whichever thread is free (see [`Worker::claim`]).
//!
//! SAFETY (every `unsafe` block here): phases are separated by the barrier;
//! within a phase a thread writes only its own rows (`mine`), output row
//! groups (`product_of`) or attention units, and reads what the previous
//! phases finished.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::ops::{add_rows, gelu_tanh_mul, rms_norm, rope, swiglu};
use super::step::{Shared, Step, Unit};
use super::{Activation, Decoder, KvStore, LayerWeights};
use crate::attention::{attend_tile, merge_segments, segment_len, TileQuery, TileScratch};
use crate::attention::{SEGMENT, TILE_ROWS};
use crate::quant::{gemm_into, QMatrix, GROUP_ROWS};

/// A thread's state through one step.
pub(super) struct Worker<'a, T> {
    model: &'a Decoder,
    st: &'a Step<'a, T>,
    tid: usize,
    /// The step's rows this thread owns in the per-row phases.
    mine: Range<usize>,
    /// Index of this thread's next shared phase in `st.claims`.
    phase: usize,
    /// A normed row (hidden, or a head for the q/k norms).
    normed: Vec<f32>,
    /// A row's SwiGLU output.
    act: Vec<f32>,
    tile_scratch: TileScratch,
}

impl<'a, T: KvStore> Worker<'a, T> {
    pub(super) fn new(model: &'a Decoder, st: &'a Step<'a, T>, tid: usize) -> Self {
        let s = model.shape;
        Self {
            model,
            st,
            tid,
            mine: (tid * st.n / st.threads)..((tid + 1) * st.n / st.threads),
            phase: 0,
            normed: vec![0f32; s.hidden.max(s.head_dim)],
            act: vec![0f32; s.intermediate],
            tile_scratch: TileScratch::default(),
        }
    }

    /// Every layer for the step's rows, then the wanted rows' logits.
    pub(super) fn run(mut self) {
        let model = self.model;
        for l in &model.layers {
            self.layer(l);
        }
        // every thread's rows are final only after the last residual add
        self.st.barrier.wait();
        self.logits();
    }

    fn layer(&mut self, l: &LayerWeights) {
        let (st, bufs) = (self.st, &self.st.bufs);
        self.norm_rows(&l.attn_norm, &l.qkv);
        st.barrier.wait();
        self.product(&l.qkv, &bufs.qkv);
        // the layer's place in a block of its KV group
        let k_off = l.kv.1 * st.layer_elems;
        let v_off = (self.model.cache_layers() + l.kv.1) * st.layer_elems;
        for r in self.mine.clone() {
            self.qkv_row(r, l, (k_off, v_off));
        }
        st.barrier.wait();
        self.attention(k_off, v_off, l);
        st.barrier.wait();
        self.merge_attention(&l.o);
        st.barrier.wait();
        self.product(&l.o, &bufs.proj);
        self.add_proj(l.o_bias.as_deref(), l.post_attn_norm.as_deref());
        self.norm_rows(&l.ffn_norm, &l.gate_up);
        st.barrier.wait();
        self.product(&l.gate_up, &bufs.gate_up);
        self.gated_rows(&l.down);
        st.barrier.wait();
        self.product(&l.down, &bufs.proj);
        self.add_proj(None, l.post_ffn_norm.as_deref());
    }

    /// Rows `r` of the hidden states.
    #[inline]
    fn x_rows(&self, r: Range<usize>) -> &'a mut [f32] {
        let hidden = self.model.shape.hidden;
        unsafe { self.st.x.range(r.start * hidden, r.len() * hidden) }
    }

    /// Row `r` of the activations, quantized as the input of matrix `w`.
    #[inline]
    fn quantize(&self, r: usize, x: &[f32], w: &QMatrix) {
        unsafe {
            self.st
                .bufs
                .acts
                .quantize_as(r, x, w.cols, w.per_super_rows())
        }
    }

    /// RMSNorm of my rows of x, quantized as the input of matrix `w`.
    fn norm_rows(&mut self, norm: &[f32], w: &QMatrix) {
        let s = self.model.shape;
        let x = self.x_rows(self.mine.clone());
        for (r, xr) in self.mine.clone().zip(x.chunks_exact(s.hidden)) {
            rms_norm(xr, norm, s.eps, &mut self.normed);
            self.quantize(r, &self.normed[..s.hidden], w);
        }
    }

    /// The shared counter of the next shared phase (every thread runs the
    /// phases in the same order): its work goes out piece by piece to
    /// whichever thread is free, so a busy or slow core does not hold the
    /// other at the barrier.
    fn claim(&mut self) -> &'a AtomicUsize {
        let st: &'a Step<'a, T> = self.st;
        let counter = &st.claims[self.phase];
        self.phase += 1;
        counter
    }

    /// `out = acts W^T` over the step's rows, then wait for the others.
    fn product(&mut self, w: &QMatrix, out: &Shared<f32>) {
        self.product_of(w, self.st.n, out);
    }

    /// `out = acts W^T` for `n` activation rows, in pieces of whole groups
    /// of 16 output rows (the matrix layout's unit), then wait for the
    /// others.
    fn product_of(&mut self, w: &QMatrix, n: usize, out: &Shared<f32>) {
        let (st, next) = (self.st, self.claim());
        // pieces of at most an eighth of a thread's share, whole groups
        // (long runs of memory for the prefetcher, few atomics), shrinking
        // with what is left so that the threads finish together
        let longest = (w.rows / (8 * st.threads))
            .next_multiple_of(GROUP_ROWS)
            .max(GROUP_ROWS);
        loop {
            let start = next.load(Ordering::Relaxed);
            if start >= w.rows {
                break;
            }
            let piece = ((w.rows - start) / (2 * st.threads))
                .next_multiple_of(GROUP_ROWS)
                .clamp(GROUP_ROWS, longest);
            let end = (start + piece).min(w.rows);
            if next
                .compare_exchange_weak(start, end, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let r = start..end;
            unsafe { gemm_into(w, st.bufs.acts, n, r.clone(), out.0.add(r.start), w.rows) };
        }
        st.barrier.wait();
    }

    /// Row `r`'s q, k and v: bias, per-head norms and rotary; its key and
    /// value into the cache at `(k_off, v_off)` + its slot, its queries to
    /// the attention's input.
    fn qkv_row(&mut self, r: usize, l: &LayerWeights, (k_off, v_off): (usize, usize)) {
        let (s, st) = (self.model.shape, self.st);
        let (h, d) = (s.num_heads, s.head_dim);
        let (q_len, kv_len) = (h * d, s.num_kv_heads * d);
        let qkv_rows = q_len + 2 * kv_len;
        let half = d / 2;
        let row = unsafe { st.bufs.qkv.range(r * qkv_rows, qkv_rows) };
        if let Some(bias) = &l.qkv_bias {
            row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        }
        let (cos, sin) = match (l.rope_table, st.local) {
            (1, Some((cos, sin))) => (cos, sin),
            _ => (st.cos, st.sin),
        };
        let (cos, sin) = (&cos[r * half..][..half], &sin[r * half..][..half]);
        let (qk, v) = row.split_at_mut(q_len + kv_len);
        for (i, head) in qk.chunks_exact_mut(d).enumerate() {
            if let Some(w) = if i < h { &l.q_norm } else { &l.k_norm } {
                self.normed[..d].copy_from_slice(head);
                rms_norm(&self.normed[..d], w, s.eps, head);
            }
            rope(head, cos, sin);
        }
        let slot = st.slots[l.kv.0 * st.n + r] as usize * kv_len;
        let k_dst = unsafe { st.kv.range(k_off + slot, kv_len) };
        let v_dst = unsafe { st.kv.range(v_off + slot, kv_len) };
        k_dst
            .iter_mut()
            .zip(&qk[q_len..])
            .for_each(|(dst, &src)| *dst = T::from_f32(src));
        v_dst
            .iter_mut()
            .zip(v.iter())
            .for_each(|(dst, &src)| *dst = T::from_f32(src));
        unsafe { st.bufs.q.range(r * q_len, q_len) }.copy_from_slice(&qk[..q_len]);
    }

    /// The layer's attention units, in any order, to whichever thread is
    /// free: a row's arithmetic is its own (see `attend_tile`).
    fn attention(&mut self, k_off: usize, v_off: usize, l: &LayerWeights) {
        let st = self.st;
        let k_layer = unsafe { &*st.kv.range(k_off, st.layer_elems) };
        let v_layer = unsafe { &*st.kv.range(v_off, st.layer_elems) };
        let next = self.claim();
        loop {
            let u = next.fetch_add(1, Ordering::Relaxed);
            let Some(unit) = st.units.get(u) else { break };
            self.attend_unit(unit, k_layer, v_layer, l);
        }
    }

    /// One unit: the rows of its tile that reach its segment, for its kv heads.
    /// Under a `window`, a row whose keys start past the segment gives it a part
    /// that weighs nothing (max -inf, sum 0), and the others start where theirs do.
    #[inline]
    fn attend_unit(&mut self, unit: &Unit, k_layer: &[T], v_layer: &[T], l: &LayerWeights) {
        let (st, window) = (self.st, l.window);
        let q_len = self.model.shape.num_heads * self.model.shape.head_dim;
        let plen = segment_len(st.attn_shape);
        let rows = unit.first_row..unit.first_row + unit.rows;
        let first = unit.segment * SEGMENT;
        let mut ends = [0usize; TILE_ROWS];
        let mut outs = [std::ptr::null_mut(); TILE_ROWS];
        // a tile's contexts grow by one a row, so the rows that
        // reach this segment are its last ones
        let reach =
            rows.start + st.context_lens[rows.clone()].partition_point(|&c| c as usize <= first);
        let mut starts = [first; TILE_ROWS];
        let mut count = 0;
        for r in reach..rows.end {
            let ctx = st.context_lens[r] as usize;
            let part = unsafe {
                st.bufs
                    .parts
                    .0
                    .add((st.first_part[r] + unit.segment) * plen)
            };
            let start = window.map_or(first, |w| ctx.saturating_sub(w).max(first));
            let end = ctx.min(first + SEGMENT);
            if start >= end {
                // (the rows after it neither: their windows start later still)
                self.weightless_parts(part, unit);
                continue;
            }
            (starts[count], ends[count], outs[count]) = (start, end, part);
            count += 1;
        }
        if count == 0 {
            return;
        }
        let tile = TileQuery {
            table: &st.block_tables[(l.kv.0 * st.n + reach) * st.max_blocks..][..st.max_blocks],
            first,
            ends: &ends[..count],
            starts: window.map(|_| &starts[..count]),
            q: unsafe { &*st.bufs.q.range(reach * q_len, count * q_len) },
            scale: st.scale,
            softcap: st.softcap,
        };
        // SAFETY: this unit alone writes its rows' parts for its kv head.
        unsafe {
            attend_tile(
                st.attn_shape,
                &tile,
                unit.kv_heads.clone(),
                k_layer,
                v_layer,
                &outs[..count],
                &mut self.tile_scratch,
            )
        };
    }

    /// A part of `unit`'s kv heads that adds nothing when merged.
    fn weightless_parts(&self, part: *mut f32, unit: &Unit) {
        let s = self.model.shape;
        let (d, g) = (s.head_dim, s.num_heads / s.num_kv_heads);
        for h in unit.kv_heads.start * g..unit.kv_heads.end * g {
            // SAFETY: this unit alone writes its rows' parts for its kv heads.
            let p = unsafe { std::slice::from_raw_parts_mut(part.add(h * (d + 2)), d + 2) };
            p[0] = f32::NEG_INFINITY;
            p[1..].fill(0.0);
        }
    }

    /// My rows' attention outputs from their segments' parts, quantized as
    /// the input of `o`.
    fn merge_attention(&mut self, o: &QMatrix) {
        let (st, mine) = (self.st, self.mine.clone());
        let q_len = self.model.shape.num_heads * self.model.shape.head_dim;
        let attn = unsafe { st.bufs.attn.range(mine.start * q_len, mine.len() * q_len) };
        let plen = segment_len(st.attn_shape);
        for (r, out) in mine.clone().zip(attn.chunks_exact_mut(q_len)) {
            let (a, b) = (st.first_part[r], st.first_part[r + 1]);
            let parts = unsafe { &*st.bufs.parts.range(a * plen, (b - a) * plen) };
            merge_segments(parts, b - a, st.attn_shape, out);
        }
        for (r, out) in mine.zip(attn.chunks_exact(q_len)) {
            self.quantize(r, out, o);
        }
    }

    /// The residual: my rows of x += the projection (+ `bias`), RMS-normed
    /// first by `post_norm` where the layer has one.
    fn add_proj(&mut self, bias: Option<&[f32]>, post_norm: Option<&[f32]>) {
        let s = self.model.shape;
        let x = self.x_rows(self.mine.clone());
        let proj = unsafe { self.st.bufs.proj.range(self.mine.start * s.hidden, x.len()) };
        if let Some(w) = post_norm {
            for row in proj.chunks_exact_mut(s.hidden) {
                if let Some(b) = bias {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
                self.normed[..s.hidden].copy_from_slice(row);
                rms_norm(&self.normed[..s.hidden], w, s.eps, row);
            }
            return add_rows(x, proj, None, s.hidden);
        }
        add_rows(x, proj, bias, s.hidden);
    }

    /// The gated activation (SwiGLU or GELU-tanh) of my rows' gate and up,
    /// quantized as the input of `down`.
    fn gated_rows(&mut self, down: &QMatrix) {
        let (s, mine) = (self.model.shape, self.mine.clone());
        let gu_rows = 2 * s.intermediate;
        let gate_up = unsafe {
            self.st
                .bufs
                .gate_up
                .range(mine.start * gu_rows, mine.len() * gu_rows)
        };
        for (r, gu) in mine.zip(gate_up.chunks_exact(gu_rows)) {
            let (g, u) = gu.split_at(s.intermediate);
            match s.activation {
                Activation::Silu => swiglu(g, u, &mut self.act),
                Activation::GeluTanh => gelu_tanh_mul(g, u, &mut self.act),
            }
            self.quantize(r, &self.act, down);
        }
    }

    /// The final norm of the rows whose logits are wanted (a share of them
    /// each), then the head.
    fn logits(&mut self) {
        let (model, st) = (self.model, self.st);
        let s = model.shape;
        let wanted = st.logit_rows.len();
        let share = (self.tid * wanted / st.threads)..((self.tid + 1) * wanted / st.threads);
        for i in share {
            let r = st.logit_rows[i];
            let xr = unsafe { st.x.range(r * s.hidden, s.hidden) };
            rms_norm(xr, &model.final_norm, s.eps, &mut self.normed);
            self.quantize(i, &self.normed[..s.hidden], &model.lm_head);
        }
        st.barrier.wait();
        self.product_of(&model.lm_head, wanted, &st.logits);
    }
}
