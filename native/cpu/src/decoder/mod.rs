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
//! so any rope scaling works; a second table for the layers that use it, as
//! Gemma 3's local layers do), grouped-query attention with a softmax scale
//! of the model's and an optional sliding window per layer, SwiGLU or
//! GELU-tanh gated MLP, and optional norms of the attention and MLP outputs
//! before their residual adds (Gemma's four norms a layer).

mod ops;
mod step;
mod worker;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use crate::attention::{check_decode_batch, segment_len, AttentionShape, DecodeBatch, KvElem};
use crate::error::DecoderError;
use crate::quant::QMatrix;
use step::{attention_units, first_parts, Buffers, Scratch, Shared, SpinBarrier, Step};
use step::{MAX_THREADS, SLOT_Q};
use worker::Worker;

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
    /// The MLP's gate activation.
    pub activation: Activation,
    /// The attention softmax's scale; None: 1 / sqrt(head_dim).
    pub attn_scale: Option<f32>,
    /// Soft-capping of the scaled scores, `cap tanh(s / cap)` (Gemma 2).
    pub attn_softcap: Option<f32>,
}

/// The gated MLP's activation: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (Llama, Qwen).
    Silu,
    /// GELU, tanh approximation (Gemma).
    GeluTanh,
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
    /// RMSNorm of the attention's and the MLP's outputs before the residual adds.
    pub post_attn_norm: Option<Vec<f32>>,
    pub post_ffn_norm: Option<Vec<f32>>,
    /// A row at position p attends over positions p - window + 1 ..= p only.
    pub window: Option<usize>,
    /// Which rotary table the layer takes: 0 `StepRows::cos/sin`, 1 `StepRows::local`.
    pub rope_table: usize,
    /// The KV group whose slots and block tables the layer takes (its layers
    /// share a window), and the layer's place in a block of the cache (see
    /// [`StepRows::slots`]); Llama's: group 0 and the layer's index.
    pub kv: (usize, usize),
}

pub struct Decoder {
    pub shape: DecoderShape,
    /// Buffers of the last step, reused: fresh multi-MB allocations come
    /// from mmap and page-fault on first touch, every step.
    scratch: Mutex<Scratch>,
    layers: Vec<LayerWeights>,
    final_norm: Vec<f32>,
    lm_head: Arc<QMatrix>,
    /// Each KV group's window (its layers').
    group_windows: Vec<Option<usize>>,
    /// Layers per cache block: the most places a group's layers take.
    cache_layers: usize,
}

/// One step's rows: a token each, already embedded.
pub struct StepRows<'a> {
    /// (rows, hidden) embeddings; overwritten with the final hidden states.
    pub x: &'a mut [f32],
    /// (rows, head_dim / 2) rotary cos and sin at each row's position.
    pub cos: &'a [f32],
    pub sin: &'a [f32],
    /// The same for the layers of `rope_table` 1, where some have it.
    pub local: Option<(&'a [f32], &'a [f32])>,
    /// Cache slot each row's key and value go to, in each KV group (group
    /// after group, `rows` each).
    pub slots: &'a [i64],
    /// (groups, rows, max_blocks) block tables.
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
            vocab,
            ..
        } = shape;
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) || head_dim % 2 != 0 {
            return Err(DecoderError::Shape(format!(
                "{num_heads} heads over {num_kv_heads} kv heads of dim {head_dim}"
            )));
        }
        for (i, l) in layers.iter().enumerate() {
            check_layer(&shape, i, l)?;
        }
        want("lm_head", &lm_head, vocab, hidden)?;
        vec_len("final_norm", &final_norm, hidden)?;
        let (group_windows, cache_layers) = kv_groups(&layers)?;
        Ok(Self {
            shape,
            scratch: Mutex::new(Scratch::default()),
            layers,
            final_norm,
            lm_head,
            group_windows,
            cache_layers,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layers per block of the cache (`kv`'s second dimension).
    pub fn cache_layers(&self) -> usize {
        self.cache_layers
    }

    /// KV groups: block tables and slots per row a step takes.
    pub fn num_groups(&self) -> usize {
        self.group_windows.len()
    }

    /// Weight bytes one step reads.
    pub fn weight_bytes(&self) -> usize {
        let layer =
            |l: &LayerWeights| l.qkv.nbytes() + l.o.nbytes() + l.gate_up.nbytes() + l.down.nbytes();
        self.layers.iter().map(layer).sum::<usize>() + self.lm_head.nbytes()
    }

    /// Runs every layer for `rows`, writing their keys and values into the
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
        let layer_elems = cache.kv.len() / (2 * self.cache_layers);
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
        let scale = s.attn_scale.unwrap_or(1.0 / (s.head_dim as f32).sqrt());
        for (g, &window) in self.group_windows.iter().enumerate() {
            let batch = DecodeBatch {
                q: &scratch.floats[SLOT_Q],
                block_tables: &rows.block_tables[g * n * rows.max_blocks..][..n * rows.max_blocks],
                max_blocks: rows.max_blocks,
                context_lens: rows.context_lens,
                scale,
                window,
            };
            check_decode_batch(attn_shape, &batch, layer_elems, layer_elems, n * q_len)?;
        }
        let (first_part, parts) = first_parts(rows.context_lens);
        let threads = threads.clamp(1, MAX_THREADS);
        let units = attention_units(&rows, s.num_kv_heads, threads);
        let parts_len = parts * segment_len(attn_shape);
        let bufs = Buffers::new(&s, n, parts_len, self.act_cols(), scratch);
        let step = Step {
            n,
            threads,
            attn_shape,
            scale,
            softcap: s.attn_softcap,
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
            local: rows.local,
            slots: rows.slots,
            logit_rows: rows.logit_rows,
            kv: Shared(cache.kv.as_mut_ptr()),
            logits: Shared(logits.as_mut_ptr()),
            bufs,
        };
        self.run(&step);
        *self.scratch.lock().unwrap_or_else(|e| e.into_inner()) = step.bufs.owned;
        Ok(())
    }

    /// The step on `step.threads` threads, this one thread 0 (see `Worker`).
    fn run<T: KvStore>(&self, step: &Step<'_, T>) {
        if step.threads == 1 {
            Worker::new(self, step, 0).run();
        } else {
            std::thread::scope(|scope| {
                for tid in 1..step.threads {
                    scope.spawn(move || Worker::new(self, step, tid).run());
                }
                Worker::new(self, step, 0).run();
            });
        }
    }

    /// The widest input of any matrix product (the activations' room).
    fn act_cols(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .chain([&self.lm_head])
            .map(|w| w.cols)
            .max()
            .unwrap_or(0)
    }

    /// Number of rows, after checking every array against it.
    fn check<T>(
        &self,
        rows: &StepRows<'_>,
        cache: &KvCache<'_, T>,
        logits_len: usize,
    ) -> Result<usize, DecoderError> {
        let s = self.shape;
        let n = rows.context_lens.len();
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
        match rows.local {
            Some((c, si)) if c.len() != n * half || si.len() != n * half => {
                return bad(format!("the local cos/sin need {n} rows of {half}"));
            }
            None if self.layers.iter().any(|l| l.rope_table == 1) => {
                return bad("layers take the local rotary table, and the step has none".into());
            }
            _ => {}
        }
        let groups = self.num_groups();
        if rows.slots.len() != groups * n || rows.block_tables.len() != groups * n * rows.max_blocks
        {
            return bad(format!(
                "{n} rows in {groups} KV groups need {groups} x {n} slots and ({groups} x {n}, max_blocks) block tables"
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
        self.check_cache(rows, cache)?;
        Ok(n)
    }
}

impl Decoder {
    /// The cache against the decoder's layers and shape, and the rows' slots
    /// against the cache.
    fn check_cache<T>(
        &self,
        rows: &StepRows<'_>,
        cache: &KvCache<'_, T>,
    ) -> Result<(), DecoderError> {
        let s = self.shape;
        let row_elems = s.num_kv_heads * s.head_dim;
        let per_layer_block = cache.block_size * row_elems;
        let layers = self.cache_layers;
        if per_layer_block == 0 || !cache.kv.len().is_multiple_of(2 * layers * per_layer_block) {
            return Err(DecoderError::Shape(format!(
                "the cache has {} values, not whole blocks of 2 x {layers} layers x {} x {} x {}",
                cache.kv.len(),
                cache.block_size,
                s.num_kv_heads,
                s.head_dim
            )));
        }
        let slots = cache.kv.len() / (2 * layers * row_elems);
        for (row, &slot) in rows.slots.iter().enumerate() {
            if slot < 0 || slot as usize >= slots {
                return Err(DecoderError::Slot { row, slot, slots });
            }
        }
        Ok(())
    }
}

/// Each KV group's window and the layers per cache block, from the layers'
/// (group, place): groups numbered from 0 without gaps, a group's layers on
/// distinct places. A group's window is its layers' widest where each has
/// one (the scheduler frees its tables behind it), else None.
fn kv_groups(layers: &[LayerWeights]) -> Result<(Vec<Option<usize>>, usize), DecoderError> {
    if layers.is_empty() {
        return Ok((vec![None], 1));
    }
    let groups = layers.iter().map(|l| l.kv.0 + 1).max().unwrap_or(1);
    let cache_layers = layers.iter().map(|l| l.kv.1 + 1).max().unwrap_or(1);
    // per group, None until a layer is seen, then Some(the widest window so far)
    let mut windows: Vec<Option<Option<usize>>> = vec![None; groups];
    let mut taken = vec![false; groups * cache_layers];
    for (i, l) in layers.iter().enumerate() {
        let (g, place) = l.kv;
        let bad = |what: &str| {
            Err(DecoderError::Shape(format!(
                "layer {i}: KV group {g} place {place}: {what}"
            )))
        };
        if std::mem::replace(&mut taken[g * cache_layers + place], true) {
            return bad("taken by another layer");
        }
        windows[g] = Some(match windows[g] {
            None => l.window,
            Some(w) => w.zip(l.window).map(|(a, b)| a.max(b)),
        });
    }
    let windows: Option<Vec<Option<usize>>> = windows.into_iter().collect();
    match windows {
        Some(w) => Ok((w, cache_layers)),
        None => Err(DecoderError::Shape("a KV group without layers".into())),
    }
}

fn want(name: &str, m: &QMatrix, rows: usize, cols: usize) -> Result<(), DecoderError> {
    if m.rows != rows || m.cols != cols {
        return Err(DecoderError::Shape(format!(
            "{name} is ({}, {}), want ({rows}, {cols})",
            m.rows, m.cols
        )));
    }
    Ok(())
}

fn vec_len(name: &str, v: &[f32], n: usize) -> Result<(), DecoderError> {
    if v.len() != n {
        return Err(DecoderError::Shape(format!(
            "{name} has {} values, want {n}",
            v.len()
        )));
    }
    Ok(())
}

/// Layer `i`'s matrices and vectors against the shape.
fn check_layer(s: &DecoderShape, i: usize, l: &LayerWeights) -> Result<(), DecoderError> {
    let (hidden, d) = (s.hidden, s.head_dim);
    let qkv_rows = (s.num_heads + 2 * s.num_kv_heads) * d;
    want(&format!("layer {i} qkv"), &l.qkv, qkv_rows, hidden)?;
    want(&format!("layer {i} o"), &l.o, hidden, s.num_heads * d)?;
    want(
        &format!("layer {i} gate_up"),
        &l.gate_up,
        2 * s.intermediate,
        hidden,
    )?;
    want(&format!("layer {i} down"), &l.down, hidden, s.intermediate)?;
    vec_len("attn_norm", &l.attn_norm, hidden)?;
    vec_len("ffn_norm", &l.ffn_norm, hidden)?;
    for (name, v, n) in [
        ("qkv_bias", &l.qkv_bias, qkv_rows),
        ("o_bias", &l.o_bias, hidden),
        ("q_norm", &l.q_norm, d),
        ("k_norm", &l.k_norm, d),
        ("post_attn_norm", &l.post_attn_norm, hidden),
        ("post_ffn_norm", &l.post_ffn_norm, hidden),
    ] {
        if let Some(v) = v {
            vec_len(name, v, n)?;
        }
    }
    if l.q_norm.is_some() != l.k_norm.is_some() {
        return Err(DecoderError::Shape(format!(
            "layer {i} has only one of q_norm and k_norm"
        )));
    }
    if l.window == Some(0) || l.rope_table > 1 {
        return Err(DecoderError::Shape(format!(
            "layer {i}: window 0 or rotary table {} (0 or 1)",
            l.rope_table
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
