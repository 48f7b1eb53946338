//! What the threads of one step share: the step's arrays and buffers
//! behind shared pointers, the attention's units of work, the per-phase
//! work counters and the barrier between phases.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{DecoderShape, StepRows};
use crate::attention::{AttentionShape, SEGMENT, TILE_ROWS};
use crate::quant::{QuantBatch, QuantRaw};

pub(super) const MAX_THREADS: usize = 64;

/// A pointer the step's threads share; see `worker` for who touches what when.
pub(super) struct Shared<T>(pub(super) *mut T);

// SAFETY: access is phased by the barrier (see the `worker` module).
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T> Shared<T> {
    /// # Safety
    /// Elements `start..start + len` must be in bounds, and no other
    /// reference to them may be live (phase discipline).
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn range<'a>(&self, start: usize, len: usize) -> &'a mut [T] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// Step buffers kept in the decoder between steps (contents are stale:
/// every element a step reads, it wrote first).
#[derive(Default)]
pub(super) struct Scratch {
    /// qkv, attn, proj, gate_up, q, parts
    pub(super) floats: [Vec<f32>; 6],
    pub(super) acts: QuantBatch,
}

pub(super) const SLOT_Q: usize = 4;

/// One step's buffers, sized for it, reached by the threads through the
/// shared pointers.
pub(super) struct Buffers {
    /// the activations of the next matrix product, quantized
    pub(super) acts: QuantRaw,
    pub(super) qkv: Shared<f32>,
    pub(super) attn: Shared<f32>,
    pub(super) proj: Shared<f32>,
    pub(super) gate_up: Shared<f32>,
    pub(super) q: Shared<f32>,
    /// segment_len floats per attention unit
    pub(super) parts: Shared<f32>,
    pub(super) owned: Scratch,
}

impl Buffers {
    pub(super) fn new(
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
pub(super) struct Unit {
    pub(super) first_row: usize,
    pub(super) rows: usize,
    pub(super) segment: usize,
    pub(super) kv_heads: Range<usize>,
}

/// The step's attention units: runs of up to [`TILE_ROWS`] rows with the
/// same block table and consecutive contexts (a prefill chunk's) share a
/// unit per segment; any other row is a tile of its own. A unit takes every
/// kv head (each cache row read in one go), unless that leaves too few
/// units to keep the threads busy: then one kv head each.
pub(super) fn attention_units(rows: &StepRows<'_>, kv_heads: usize, threads: usize) -> Vec<Unit> {
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
pub(super) struct Step<'a, T> {
    pub(super) n: usize,
    pub(super) threads: usize,
    pub(super) attn_shape: AttentionShape,
    /// The softmax scale, 1 / sqrt(head_dim).
    pub(super) scale: f32,
    /// The scores' soft-cap ([`super::DecoderShape::attn_softcap`]).
    pub(super) softcap: Option<f32>,
    pub(super) units: Vec<Unit>,
    /// per shared phase of the step, in order: the first piece of its work
    /// not yet taken (an output row of a product, an attention unit)
    pub(super) claims: Vec<AtomicUsize>,
    /// each row's first partial attention result (one past the end last)
    pub(super) first_part: Vec<usize>,
    pub(super) block_tables: &'a [i64],
    pub(super) max_blocks: usize,
    pub(super) context_lens: &'a [i64],
    pub(super) layer_elems: usize,
    pub(super) barrier: SpinBarrier,
    pub(super) x: Shared<f32>,
    pub(super) cos: &'a [f32],
    pub(super) sin: &'a [f32],
    pub(super) local: Option<(&'a [f32], &'a [f32])>,
    pub(super) slots: &'a [i64],
    pub(super) logit_rows: &'a [usize],
    pub(super) kv: Shared<T>,
    pub(super) logits: Shared<f32>,
    pub(super) bufs: Buffers,
}

/// Threads meet here between the phases of a step: spinning, as a phase is
/// microseconds, yielding after a while in case the machine is oversubscribed.
pub(super) struct SpinBarrier {
    pub(super) threads: usize,
    pub(super) arrived: AtomicUsize,
    pub(super) generation: AtomicUsize,
}

impl SpinBarrier {
    pub(super) fn new(threads: usize) -> Self {
        Self {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
        }
    }

    pub(super) fn wait(&self) {
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

/// Each row's first partial attention result (a part per segment of its
/// context), one past the last row's last at the end; and their number.
pub(super) fn first_parts(context_lens: &[i64]) -> (Vec<usize>, usize) {
    let mut first_part = Vec::with_capacity(context_lens.len() + 1);
    let mut parts = 0;
    for &ctx in context_lens {
        first_part.push(parts);
        parts += (ctx as usize).div_ceil(SEGMENT);
    }
    first_part.push(parts);
    (first_part, parts)
}
