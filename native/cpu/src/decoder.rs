//! A Llama-family model step on the CPU in one call: every layer for a
//! batch of token rows (decodes and prefill chunks alike), over the engine's
//! paged KV cache, with block-quantized weights (see `quant`).
//!
//! On torch, a batch-1 decode step of the default model is mostly dispatch
//! of ~20 small ops per layer; here a step is one call: 8-bit activations
//! against 4/8-bit weights with AVX-512 VNNI, f32 everywhere else, the
//! cache written and read in place. Threads split each matrix's output
//! rows, the attention's units (a tile of one sequence's rows, a segment of
//! its context, a kv head) and the per-row work, and meet at a spin barrier
//! between phases.
//!
//! Every row goes through the same arithmetic whatever else is in the step
//! (the matrix kernel treats activation rows independently, attention is
//! per row over its own context): a token's logits do not depend on its
//! neighbours, on how its prompt was chunked or on the thread count.
//!
//! Supported: RMSNorm, fused q/k/v with optional bias, optional per-head
//! q/k RMSNorm (Qwen3), rotary embedding on halves (cos/sin supplied per row,
//! so any rope scaling works), grouped-query attention, SwiGLU MLP.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::attention::{
    attend_tile, check_decode_batch, merge_segments, segment_len, AttentionShape, DecodeBatch,
    KvElem, TileQuery, TileScratch, SEGMENT, TILE_ROWS,
};
use crate::error::DecoderError;
#[cfg(target_arch = "x86_64")]
use crate::exp::exp16;
use crate::exp::fast_exp;
use crate::quant::{gemm_into, QMatrix, QuantBatch, QuantRaw, GROUP_ROWS};

/// A cache element the step can also write.
pub trait KvStore: KvElem {
    fn from_f32(v: f32) -> Self;
}

impl KvStore for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
}

/// bf16 bits, rounded to nearest even (as torch converts).
impl KvStore for u16 {
    fn from_f32(v: f32) -> Self {
        let bits = v.to_bits();
        if v.is_nan() {
            return 0x7FC0;
        }
        ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecoderShape {
    pub hidden: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub eps: f32,
}

/// One decoder layer's weights (norm weights as f32).
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    /// (q + k + v) rows over `hidden` columns.
    pub qkv: Arc<QMatrix>,
    pub qkv_bias: Option<Vec<f32>>,
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub o: Arc<QMatrix>,
    pub o_bias: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    /// gate rows then up rows.
    pub gate_up: Arc<QMatrix>,
    pub down: Arc<QMatrix>,
}

pub struct Decoder {
    pub shape: DecoderShape,
    /// Buffers of the last step, reused: fresh multi-MB allocations come
    /// from mmap and page-fault on first touch, every step.
    scratch: Mutex<Scratch>,
    layers: Vec<LayerWeights>,
    final_norm: Vec<f32>,
    lm_head: Arc<QMatrix>,
}

/// One step's rows: a token each, already embedded.
pub struct StepRows<'a> {
    /// (rows, hidden) embeddings; overwritten with the final hidden states.
    pub x: &'a mut [f32],
    /// (rows, head_dim / 2) rotary cos and sin at each row's position.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// Cache slot each row's key and value go to.
    pub slots: &'a [i64],
    /// (rows, max_blocks) block tables.
    pub block_tables: &'a [i64],
    pub max_blocks: usize,
    /// Positions each row attends over, its own included.
    pub context_lens: &'a [i64],
    /// Rows whose logits are wanted, in output order.
    pub logit_rows: &'a [usize],
}

/// Where the cache is: `kv` is (2, num_layers, num_blocks, block_size,
/// num_kv_heads, head_dim), keys first.
pub struct KvCache<'a, T> {
    pub kv: &'a mut [T],
    pub block_size: usize,
}

impl Decoder {
    pub fn new(
        shape: DecoderShape,
        layers: Vec<LayerWeights>,
        final_norm: Vec<f32>,
        lm_head: Arc<QMatrix>,
    ) -> Result<Self, DecoderError> {
        let DecoderShape {
            hidden,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate,
            vocab,
            ..
        } = shape;
        let bad = |what: String| Err(DecoderError::Shape(what));
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) || head_dim % 2 != 0 {
            return bad(format!(
                "{num_heads} heads over {num_kv_heads} kv heads of dim {head_dim}"
            ));
        }
        let qkv_rows = (num_heads + 2 * num_kv_heads) * head_dim;
        let want =
            |name: &str, m: &QMatrix, rows: usize, cols: usize| -> Result<(), DecoderError> {
                if m.rows != rows || m.cols != cols {
                    return Err(DecoderError::Shape(format!(
                        "{name} is ({}, {}), want ({rows}, {cols})",
                        m.rows, m.cols
                    )));
                }
                Ok(())
            };
        let vec_len = |name: &str, v: &[f32], n: usize| -> Result<(), DecoderError> {
            if v.len() != n {
                return Err(DecoderError::Shape(format!(
                    "{name} has {} values, want {n}",
                    v.len()
                )));
            }
            Ok(())
        };
        for (i, l) in layers.iter().enumerate() {
            want(&format!("layer {i} qkv"), &l.qkv, qkv_rows, hidden)?;
            want(&format!("layer {i} o"), &l.o, hidden, num_heads * head_dim)?;
            want(
                &format!("layer {i} gate_up"),
                &l.gate_up,
                2 * intermediate,
                hidden,
            )?;
            want(&format!("layer {i} down"), &l.down, hidden, intermediate)?;
            vec_len("attn_norm", &l.attn_norm, hidden)?;
            vec_len("ffn_norm", &l.ffn_norm, hidden)?;
            for (name, v, n) in [
                ("qkv_bias", &l.qkv_bias, qkv_rows),
                ("o_bias", &l.o_bias, hidden),
                ("q_norm", &l.q_norm, head_dim),
                ("k_norm", &l.k_norm, head_dim),
            ] {
                if let Some(v) = v {
                    vec_len(name, v, n)?;
                }
            }
            if l.q_norm.is_some() != l.k_norm.is_some() {
                return bad(format!("layer {i} has only one of q_norm and k_norm"));
            }
        }
        want("lm_head", &lm_head, vocab, hidden)?;
        vec_len("final_norm", &final_norm, hidden)?;
        Ok(Self {
            shape,
            scratch: Mutex::new(Scratch::default()),
            layers,
            final_norm,
            lm_head,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Weight bytes one step reads.
    pub fn weight_bytes(&self) -> usize {
        let layer =
            |l: &LayerWeights| l.qkv.nbytes() + l.o.nbytes() + l.gate_up.nbytes() + l.down.nbytes();
        self.layers.iter().map(layer).sum::<usize>() + self.lm_head.nbytes()
    }

    /// Runs every layer for `rows`, writing their keys and values into the
    /// cache, and the logits of `rows.logit_rows` into `logits` (n, vocab).
    /// `threads` threads (this one included) split each matrix's rows, the
    /// attention's units and the rows' own work (see `worker`).
    pub fn forward<T: KvStore>(
        &self,
        rows: StepRows<'_>,
        cache: KvCache<'_, T>,
        logits: &mut [f32],
        threads: usize,
    ) -> Result<(), DecoderError> {
        let s = self.shape;
        let n = self.check(&rows, &cache, logits.len())?;
        let layer_elems = cache.kv.len() / (2 * self.layers.len());
        let attn_shape = AttentionShape {
            num_heads: s.num_heads,
            num_kv_heads: s.num_kv_heads,
            head_dim: s.head_dim,
            block_size: cache.block_size,
        };
        let q_len = s.num_heads * s.head_dim;
        // a failed check drops the kept buffers: they only regrow
        let mut scratch =
            std::mem::take(&mut *self.scratch.lock().unwrap_or_else(|e| e.into_inner()));
        scratch.floats[SLOT_Q].resize(n * q_len, 0.0);
        let batch = DecodeBatch {
            q: &scratch.floats[SLOT_Q],
            block_tables: rows.block_tables,
            max_blocks: rows.max_blocks,
            context_lens: rows.context_lens,
            scale: 1.0 / (s.head_dim as f32).sqrt(),
        };
        check_decode_batch(attn_shape, &batch, layer_elems, layer_elems, n * q_len)?;
        let scale = batch.scale;
        // a partial result per (row, segment of its context); a row's first
        let mut first_part = Vec::with_capacity(n + 1);
        let mut parts = 0;
        for &ctx in rows.context_lens {
            first_part.push(parts);
            parts += (ctx as usize).div_ceil(SEGMENT);
        }
        first_part.push(parts);
        let threads = threads.clamp(1, MAX_THREADS);
        let units = attention_units(&rows, s.num_kv_heads, threads);
        // the widest input of any matrix product (the activations' room)
        let act_cols = self
            .layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .chain([&self.lm_head])
            .map(|w| w.cols)
            .max()
            .unwrap_or(0);
        let bufs = Buffers::new(&s, n, parts * segment_len(attn_shape), act_cols, scratch);
        let step = Step {
            n,
            threads,
            attn_shape,
            scale,
            units,
            // per layer 4 products and the attention, then the head
            claims: (0..5 * self.layers.len() + 1)
                .map(|_| AtomicUsize::new(0))
                .collect(),
            first_part,
            block_tables: rows.block_tables,
            max_blocks: rows.max_blocks,
            context_lens: rows.context_lens,
            layer_elems,
            barrier: SpinBarrier::new(threads),
            x: Shared(rows.x.as_mut_ptr()),
            cos: rows.cos,
            sin: rows.sin,
            slots: rows.slots,
            logit_rows: rows.logit_rows,
            kv: Shared(cache.kv.as_mut_ptr()),
            logits: Shared(logits.as_mut_ptr()),
            bufs,
        };
        let step_ref = &step;
        if threads == 1 {
            self.worker(step_ref, 0);
        } else {
            std::thread::scope(|scope| {
                for tid in 1..threads {
                    scope.spawn(move || self.worker(step_ref, tid));
                }
                self.worker(step_ref, 0);
            });
        }
        *self.scratch.lock().unwrap_or_else(|e| e.into_inner()) = step.bufs.owned;
        Ok(())
    }

    /// Thread `tid`'s share of the step. Every thread runs every phase and
    /// meets the others at the barrier between phases: per-row work (norms,
    /// quantization, rotary, cache writes, attention merges, SwiGLU) on the
    /// thread's own rows; pieces of matrix products and attention units to
    /// whichever thread is free (see `claim`).
    fn worker<T: KvStore>(&self, st: &Step<'_, T>, tid: usize) {
        let s = self.shape;
        let (h, kv_heads, d) = (s.num_heads, s.num_kv_heads, s.head_dim);
        let (q_len, kv_len) = (h * d, kv_heads * d);
        let qkv_rows = q_len + 2 * kv_len;
        let gu_rows = 2 * s.intermediate;
        let half = d / 2;
        let bufs = &st.bufs;
        let share = |total: usize| (tid * total / st.threads)..((tid + 1) * total / st.threads);
        let mine = share(st.n);
        let mut normed = vec![0f32; s.hidden.max(s.head_dim)];
        let mut act = vec![0f32; s.intermediate];
        let mut tile_scratch = TileScratch::default();
        // SAFETY (every `unsafe` block below): phases are separated by the
        // barrier; within a phase a thread writes only its own rows (`mine`),
        // output row groups (`product_of`) or attention units, and reads what
        // the previous phases finished.
        let x_rows =
            |r: Range<usize>| unsafe { st.x.range(r.start * s.hidden, r.len() * s.hidden) };
        // row r of the activations, quantized as the input of matrix w
        let quantize =
            |r: usize, x: &[f32], w: &QMatrix| unsafe { bufs.acts.quantize(r, x, w.cols) };
        // RMSNorm of my rows of x, quantized as the input of matrix w
        let norm_rows = |x: &[f32], norm: &[f32], w: &QMatrix, normed: &mut [f32]| {
            for (r, xr) in mine.clone().zip(x.chunks_exact(s.hidden)) {
                rms_norm(xr, norm, s.eps, normed);
                quantize(r, &normed[..s.hidden], w);
            }
        };
        // The shared counter of the next shared phase (every thread runs the
        // phases in the same order): its work goes out piece by piece to
        // whichever thread is free, so a busy or slow core does not hold the
        // other at the barrier.
        let phase = std::cell::Cell::new(0);
        let claim = || {
            let counter = &st.claims[phase.get()];
            phase.set(phase.get() + 1);
            counter
        };
        // out = acts W^T, in pieces of whole groups of 16 output rows (the
        // matrix layout's unit), then wait for the others
        let product_of = |w: &QMatrix, n: usize, out: &Shared<f32>| {
            let next = claim();
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
                unsafe { gemm_into(w, bufs.acts, n, r.clone(), out.0.add(r.start), w.rows) };
            }
            st.barrier.wait();
        };
        let product = |w: &QMatrix, out: &Shared<f32>| product_of(w, st.n, out);
        for (li, l) in self.layers.iter().enumerate() {
            norm_rows(x_rows(mine.clone()), &l.attn_norm, &l.qkv, &mut normed);
            st.barrier.wait();
            product(&l.qkv, &bufs.qkv);
            let k_off = li * st.layer_elems;
            let v_off = (self.layers.len() + li) * st.layer_elems;
            for r in mine.clone() {
                let row = unsafe { bufs.qkv.range(r * qkv_rows, qkv_rows) };
                if let Some(bias) = &l.qkv_bias {
                    row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
                }
                let (cos, sin) = (&st.cos[r * half..][..half], &st.sin[r * half..][..half]);
                let (qk, v) = row.split_at_mut(q_len + kv_len);
                for (i, head) in qk.chunks_exact_mut(d).enumerate() {
                    if let Some(w) = if i < h { &l.q_norm } else { &l.k_norm } {
                        normed[..d].copy_from_slice(head);
                        rms_norm(&normed[..d], w, s.eps, head);
                    }
                    rope(head, cos, sin);
                }
                let slot = st.slots[r] as usize * kv_len;
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
                unsafe { bufs.q.range(r * q_len, q_len) }.copy_from_slice(&qk[..q_len]);
            }
            st.barrier.wait();
            {
                let k_layer = unsafe { &*st.kv.range(k_off, st.layer_elems) };
                let v_layer = unsafe { &*st.kv.range(v_off, st.layer_elems) };
                // units in any order, to whichever thread is free: a row's
                // arithmetic is its own (see attend_tile)
                let plen = segment_len(st.attn_shape);
                let next = claim();
                loop {
                    let u = next.fetch_add(1, Ordering::Relaxed);
                    let Some(unit) = st.units.get(u) else { break };
                    let rows = unit.first_row..unit.first_row + unit.rows;
                    let first = unit.segment * SEGMENT;
                    let mut ends = [0usize; TILE_ROWS];
                    let mut outs = [std::ptr::null_mut(); TILE_ROWS];
                    // a tile's contexts grow by one a row, so the rows that
                    // reach this segment are its last ones
                    let reach = rows.start
                        + st.context_lens[rows.clone()].partition_point(|&c| c as usize <= first);
                    let count = rows.end - reach;
                    for (i, r) in (reach..rows.end).enumerate() {
                        ends[i] = (st.context_lens[r] as usize).min(first + SEGMENT);
                        outs[i] =
                            unsafe { bufs.parts.0.add((st.first_part[r] + unit.segment) * plen) };
                    }
                    let tile = TileQuery {
                        table: &st.block_tables[reach * st.max_blocks..][..st.max_blocks],
                        first,
                        ends: &ends[..count],
                        q: unsafe { &*bufs.q.range(reach * q_len, count * q_len) },
                        scale: st.scale,
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
                            &mut tile_scratch,
                        )
                    };
                }
            }
            st.barrier.wait();
            {
                let attn = unsafe { bufs.attn.range(mine.start * q_len, mine.len() * q_len) };
                let plen = segment_len(st.attn_shape);
                for (r, o) in mine.clone().zip(attn.chunks_exact_mut(q_len)) {
                    let (a, b) = (st.first_part[r], st.first_part[r + 1]);
                    let parts = unsafe { &*bufs.parts.range(a * plen, (b - a) * plen) };
                    merge_segments(parts, b - a, st.attn_shape, o);
                }
                for (r, o) in mine.clone().zip(attn.chunks_exact(q_len)) {
                    quantize(r, o, &l.o);
                }
            }
            st.barrier.wait();
            product(&l.o, &bufs.proj);
            {
                let x = x_rows(mine.clone());
                add_rows(
                    x,
                    unsafe { bufs.proj.range(mine.start * s.hidden, x.len()) },
                    l.o_bias.as_deref(),
                    s.hidden,
                );
                norm_rows(x, &l.ffn_norm, &l.gate_up, &mut normed);
            }
            st.barrier.wait();
            product(&l.gate_up, &bufs.gate_up);
            {
                let gate_up = unsafe {
                    bufs.gate_up
                        .range(mine.start * gu_rows, mine.len() * gu_rows)
                };
                for (r, gu) in mine.clone().zip(gate_up.chunks_exact(gu_rows)) {
                    let (g, u) = gu.split_at(s.intermediate);
                    swiglu(g, u, &mut act);
                    quantize(r, &act, &l.down);
                }
            }
            st.barrier.wait();
            product(&l.down, &bufs.proj);
            let x = x_rows(mine.clone());
            add_rows(
                x,
                unsafe { bufs.proj.range(mine.start * s.hidden, x.len()) },
                None,
                s.hidden,
            );
        }
        // every thread's rows are final only after the last residual add
        st.barrier.wait();
        let wanted = st.logit_rows.len();
        let my_logit_rows = share(wanted);
        for i in my_logit_rows {
            let r = st.logit_rows[i];
            let xr = unsafe { st.x.range(r * s.hidden, s.hidden) };
            rms_norm(xr, &self.final_norm, s.eps, &mut normed);
            quantize(i, &normed[..s.hidden], &self.lm_head);
        }
        st.barrier.wait();
        product_of(&self.lm_head, wanted, &st.logits);
    }

    /// Number of rows, after checking every array against it.
    fn check<T>(
        &self,
        rows: &StepRows<'_>,
        cache: &KvCache<'_, T>,
        logits_len: usize,
    ) -> Result<usize, DecoderError> {
        let s = self.shape;
        let n = rows.slots.len();
        let bad = |what: String| Err(DecoderError::Shape(what));
        if rows.x.len() != n * s.hidden {
            return bad(format!(
                "x has {} values for {n} rows of {}",
                rows.x.len(),
                s.hidden
            ));
        }
        let half = s.head_dim / 2;
        if rows.cos.len() != n * half || rows.sin.len() != n * half {
            return bad(format!("cos/sin need {n} rows of {half}"));
        }
        if rows.context_lens.len() != n || rows.block_tables.len() != n * rows.max_blocks {
            return bad(format!(
                "{n} rows need {n} context lengths and ({n}, max_blocks) block tables"
            ));
        }
        if let Some(&r) = rows.logit_rows.iter().find(|&&r| r >= n) {
            return bad(format!("logit row {r} of {n} rows"));
        }
        if logits_len != rows.logit_rows.len() * s.vocab {
            return bad(format!(
                "logits have {logits_len} values for {} rows of {}",
                rows.logit_rows.len(),
                s.vocab
            ));
        }
        let row_elems = s.num_kv_heads * s.head_dim;
        let per_layer_block = cache.block_size * row_elems;
        let layers = self.layers.len();
        if per_layer_block == 0 || !cache.kv.len().is_multiple_of(2 * layers * per_layer_block) {
            return bad(format!(
                "the cache has {} values, not whole blocks of 2 x {layers} layers x {} x {} x {}",
                cache.kv.len(),
                cache.block_size,
                s.num_kv_heads,
                s.head_dim
            ));
        }
        let slots = cache.kv.len() / (2 * layers * row_elems);
        for (row, &slot) in rows.slots.iter().enumerate() {
            if slot < 0 || slot as usize >= slots {
                return Err(DecoderError::Slot { row, slot, slots });
            }
        }
        Ok(n)
    }
}

const MAX_THREADS: usize = 64;

/// A pointer the step's threads share; see `worker` for who touches what when.
struct Shared<T>(*mut T);

// SAFETY: access is phased by the barrier (see Decoder::worker).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// # Safety
    /// Elements `start..start + len` must be in bounds, and no other
    /// reference to them may be live (phase discipline).
    #[allow(clippy::mut_from_ref)]
    unsafe fn range<'a>(&self, start: usize, len: usize) -> &'a mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// Step buffers kept in the decoder between steps (contents are stale:
/// every element a step reads, it wrote first).
#[derive(Default)]
struct Scratch {
    /// qkv, attn, proj, gate_up, q, parts
    floats: [Vec<f32>; 6],
    acts: QuantBatch,
}

const SLOT_Q: usize = 4;

/// One step's buffers, sized for it, reached by the threads through the
/// shared pointers.
struct Buffers {
    /// the activations of the next matrix product, quantized
    acts: QuantRaw,
    qkv: Shared<f32>,
    attn: Shared<f32>,
    proj: Shared<f32>,
    gate_up: Shared<f32>,
    q: Shared<f32>,
    /// segment_len floats per attention unit
    parts: Shared<f32>,
    owned: Scratch,
}

impl Buffers {
    fn new(
        s: &DecoderShape,
        n: usize,
        parts_len: usize,
        act_cols: usize,
        mut owned: Scratch,
    ) -> Self {
        let q_len = s.num_heads * s.head_dim;
        let qkv_rows = q_len + 2 * s.num_kv_heads * s.head_dim;
        let lens = [
            n * qkv_rows,
            n * q_len,
            n * s.hidden,
            n * 2 * s.intermediate,
            n * q_len,
            parts_len,
        ];
        // each buffer starts on a cache line, so a group's 16 outputs of a
        // row are one line, not two (a split line costs two writes and, at
        // the edge of a piece of a matrix product, is written by both threads)
        const PAD: usize = 64 / std::mem::size_of::<f32>() - 1;
        for (v, len) in owned.floats.iter_mut().zip(lens) {
            v.resize(len + PAD, 0.0);
        }
        owned.acts.reserve(n, act_cols);
        let [qkv, attn, proj, gate_up, q, parts] = owned.floats.each_mut().map(|v| {
            let at = v.as_ptr().align_offset(64).min(PAD);
            Shared(v.as_mut_ptr().wrapping_add(at))
        });
        Self {
            acts: owned.acts.raw(),
            qkv,
            attn,
            proj,
            gate_up,
            q,
            parts,
            owned,
        }
    }
}

/// Attention work: the rows `first_row..first_row + rows` (one sequence's,
/// at consecutive positions) over one segment of their context, for the
/// query heads of some kv heads.
struct Unit {
    first_row: usize,
    rows: usize,
    segment: usize,
    kv_heads: Range<usize>,
}

/// The step's attention units: runs of up to [`TILE_ROWS`] rows with the
/// same block table and consecutive contexts (a prefill chunk's) share a
/// unit per segment; any other row is a tile of its own. A unit takes every
/// kv head (each cache row read in one go), unless that leaves too few
/// units to keep the threads busy: then one kv head each.
fn attention_units(rows: &StepRows<'_>, kv_heads: usize, threads: usize) -> Vec<Unit> {
    let n = rows.context_lens.len();
    let table = |r: usize| &rows.block_tables[r * rows.max_blocks..][..rows.max_blocks];
    let mut tiles = vec![]; // (first row, rows, segments)
    let mut r = 0;
    while r < n {
        let mut end = r + 1;
        while end < n
            && end - r < TILE_ROWS
            && rows.context_lens[end] == rows.context_lens[end - 1] + 1
            && table(end) == table(r)
        {
            end += 1;
        }
        let segments = (rows.context_lens[end - 1] as usize).div_ceil(SEGMENT);
        tiles.push((r, end - r, segments));
        r = end;
    }
    let whole = tiles.iter().map(|t| t.2).sum::<usize>();
    let split = if whole >= 4 * threads { 1 } else { kv_heads };
    let mut units = Vec::with_capacity(whole * split);
    for (first_row, count, segments) in tiles {
        for segment in 0..segments {
            for part in 0..split {
                units.push(Unit {
                    first_row,
                    rows: count,
                    segment,
                    kv_heads: part * kv_heads / split..(part + 1) * kv_heads / split,
                });
            }
        }
    }
    units
}

/// Everything the threads of one step share.
struct Step<'a, T> {
    n: usize,
    threads: usize,
    attn_shape: AttentionShape,
    /// The softmax scale, 1 / sqrt(head_dim).
    scale: f32,
    units: Vec<Unit>,
    /// per shared phase of the step, in order: the first piece of its work
    /// not yet taken (an output row of a product, an attention unit)
    claims: Vec<AtomicUsize>,
    /// each row's first partial attention result (one past the end last)
    first_part: Vec<usize>,
    block_tables: &'a [i64],
    max_blocks: usize,
    context_lens: &'a [i64],
    layer_elems: usize,
    barrier: SpinBarrier,
    x: Shared<f32>,
    cos: &'a [f32],
    sin: &'a [f32],
    slots: &'a [i64],
    logit_rows: &'a [usize],
    kv: Shared<T>,
    logits: Shared<f32>,
    bufs: Buffers,
}

/// Threads meet here between the phases of a step: spinning, as a phase is
/// microseconds, yielding after a while in case the machine is oversubscribed.
struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl SpinBarrier {
    fn new(threads: usize) -> Self {
        Self {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    fn wait(&self) {
        if self.threads == 1 {
            return;
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            std::hint::spin_loop();
            spins += 1;
            if spins > 1 << 16 {
                std::thread::yield_now();
            }
        }
    }
}

/// Runs `$body` compiled with AVX-512 when the CPU has it (the loops are
/// written for the vectoriser), else as plain code.
macro_rules! with_avx512 {
    ($name:ident ($($arg:ident: $ty:ty),*) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
                unsafe fn wide($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512 (checked just above).
                    return unsafe { wide($($arg),*) };
                }
            }
            $body
        }
    };
}

/// `out = silu(g) * u`, silu(g) = g / (1 + e^-g).
fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { swiglu_avx512(g, u, out) };
        }
    }
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + fast_exp(-g)) * u;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(g.len()).min(u.len());
    for i in (0..n).step_by(16) {
        let mask: __mmask16 = (((1u32 << 16.min(n - i)) - 1) & 0xFFFF) as u16;
        let gv = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(i));
        let uv = _mm512_maskz_loadu_ps(mask, u.as_ptr().add(i));
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        let silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0), e));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, _mm512_mul_ps(silu, uv));
    }
}

with_avx512!(rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // 16 running sums (lane-parallel: vector adds, no serial chain), then
    // those in a fixed order
    let mut lanes = [0f32; 16];
    let whole = x.len() / 16 * 16;
    for chunk in x[..whole].chunks_exact(16) {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += v * v;
        }
    }
    let tail = x[whole..].iter().map(|v| v * v).sum::<f32>();
    let mean_sq = (lanes.iter().sum::<f32>() + tail) / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
});

/// Rotates the two halves of `head` (neox style).
fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (a, b) = head.split_at_mut(cos.len());
    for (((x1, x2), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
        let (v1, v2) = (*x1, *x2);
        *x1 = v1 * c - v2 * s;
        *x2 = v2 * c + v1 * s;
    }
}

fn add_rows(x: &mut [f32], delta: &[f32], bias: Option<&[f32]>, hidden: usize) {
    for (xr, dr) in x.chunks_exact_mut(hidden).zip(delta.chunks_exact(hidden)) {
        match bias {
            Some(b) => xr
                .iter_mut()
                .zip(dr)
                .zip(b)
                .for_each(|((v, d), b)| *v += d + b),
            None => xr.iter_mut().zip(dr).for_each(|(v, d)| *v += d),
        }
    }
}

#[cfg(test)]
#[path = "decoder_tests.rs"]
mod tests;
