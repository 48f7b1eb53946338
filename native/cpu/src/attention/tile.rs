//! Attention of a tile of query rows (a prefill chunk's, or a decode's one)
//! over one segment of their context, as partial softmaxes that
//! [`merge_segments`] joins: the unit of work the fused decoder hands to its
//! threads. AVX-512 where the CPU has it (`tile16`), AVX2 (`tile_avx2`),
//! else portable loops.

use std::ops::Range;

use super::{AttentionShape, KvElem};
use crate::exp::fast_exp;

/// Query rows of one sequence attending over one segment of its context
/// together: a prefill chunk's rows (up to [`TILE_ROWS`]), or a decode's one.
#[derive(Clone, Copy)]
pub struct TileQuery<'a> {
    /// Block ids of the sequence.
    pub table: &'a [i64],
    /// Start of the segment (a multiple of [`SEGMENT`]).
    pub first: usize,
    /// Per row: the end of its context within the segment (`> first`).
    pub ends: &'a [usize],
    /// Per row, where its keys start within the segment (`first..end`; a
    /// sliding window's), non-decreasing; None: at `first` for every row.
    pub starts: Option<&'a [usize]>,
    /// The rows' queries, (rows, num_heads, head_dim) row-major.
    pub q: &'a [f32],
    pub scale: f32,
    /// Soft-capping of the scaled scores, `cap tanh(s / cap)` (Gemma 2).
    pub softcap: Option<f32>,
}

/// `score` soft-capped at `cap` (`cap tanh(score / cap)`), where there is one.
#[inline]
pub(crate) fn capped(score: f32, cap: Option<f32>) -> f32 {
    match cap {
        // tanh(x) = 1 - 2 / (e^2x + 1), +-1 at the ends (e^2x overflowing or vanishing)
        Some(c) => c * (1.0 - 2.0 / (fast_exp(2.0 * score / c) + 1.0)),
        None => score,
    }
}

/// Positions per attention segment: a row's context is cut at multiples of
/// this, whatever else runs, so the cut (and so the arithmetic) depends on
/// the row alone, and a long context still splits over threads.
pub const SEGMENT: usize = 128;

/// Rows of a [`TileQuery`] at most: they share each key chunk's transpose
/// and each value chunk's conversion.
pub const TILE_ROWS: usize = 16;

/// Floats of one segment's partial result: per query head, its max score,
/// its sum of weights and the unnormalised output row.
pub fn segment_len(shape: AttentionShape) -> usize {
    shape.num_heads * (shape.head_dim + 2)
}

/// Reusable buffers of [`attend_tile`] (one per thread; the AVX2 kernel's).
#[derive(Default)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct TileScratch {
    pub(super) floats: Vec<f32>,
    pub(super) maxes: Vec<f32>,
    pub(super) corrs: Vec<f32>,
}

/// The query heads of the kv heads `kv_heads`, for every row of a tile, over
/// one segment of their context, as partial softmaxes (see
/// [`merge_segments`]). Chunk by chunk of positions, the kv heads take
/// turns, so a decode batch (whose cache is far larger than the CPU's
/// caches) reads each position's row of the cache in one go.
///
/// A row's arithmetic depends on the row and segment alone: not on the
/// other rows of its tile, the rest of the step, or the threads. So a
/// token's result is the same whether it is computed in a prefill chunk, as
/// a decode, after a prefix-cache hit or after a recompute.
///
/// Row `i` writes head `h`'s `[max, sum, acc(head_dim)]` at
/// `outs[i] + h * (head_dim + 2)`, for the heads of `kv_heads`.
///
/// # Safety
/// Each `outs[i]` must be valid for those writes with nothing else
/// accessing them; the table's blocks must be in the cache (see
/// [`check_decode_batch`](super::check_decode_batch)); `tile.q` holds `ends.len()` rows.
#[inline]
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub unsafe fn attend_tile<T: KvElem>(
    shape: AttentionShape,
    tile: &TileQuery<'_>,
    kv_heads: Range<usize>,
    k_cache: &[T],
    v_cache: &[T],
    outs: &[*mut f32],
    scratch: &mut TileScratch,
) {
    debug_assert!(tile.ends.len() <= TILE_ROWS && tile.ends.len() == outs.len());
    #[cfg(target_arch = "x86_64")]
    {
        let g = shape.num_heads / shape.num_kv_heads;
        if std::arch::is_x86_feature_detected!("avx512f")
            && tile.starts.is_none()
            && tile.softcap.is_none()
            && shape.head_dim.is_multiple_of(16)
            && shape.head_dim <= 256
            && g <= 8
        {
            // SAFETY: the CPU has AVX-512F (checked just above); the rest per the contract.
            return unsafe {
                super::tile16::attend(shape, tile, kv_heads, k_cache, v_cache, outs, scratch)
            };
        }
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && super::tile_avx2::fits(shape)
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above); the rest per the contract.
            return unsafe {
                super::tile_avx2::attend(shape, tile, kv_heads, k_cache, v_cache, outs, scratch)
            };
        }
    }
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
        block_size: bs,
    } = shape;
    let g = num_heads / num_kv_heads;
    for (i, (&end, &out)) in tile.ends.iter().zip(outs).enumerate() {
        let start = tile.starts.map_or(tile.first, |s| s[i]);
        for h in kv_heads.start * g..kv_heads.end * g {
            let kv_head = h / g;
            let at = |p: usize| {
                ((tile.table[p / bs] as usize * bs + p % bs) * num_kv_heads + kv_head) * d
            };
            let qh = &tile.q[(i * num_heads + h) * d..][..d];
            let scores: Vec<f32> = (start..end)
                .map(|p| {
                    qh.iter()
                        .zip(&k_cache[at(p)..][..d])
                        .map(|(a, b)| a * b.to_f32())
                        .sum::<f32>()
                        * tile.scale
                })
                .map(|s| capped(s, tile.softcap))
                .collect();
            let max = scores.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            let weights: Vec<f32> = scores.iter().map(|s| fast_exp(s - max)).collect();
            // SAFETY: per the contract.
            let part = unsafe { std::slice::from_raw_parts_mut(out.add(h * (d + 2)), d + 2) };
            part[0] = max;
            part[1] = weights.iter().sum();
            for c in 0..d {
                part[2 + c] = (start..end)
                    .zip(&weights)
                    .map(|(p, w)| w * v_cache[at(p) + c].to_f32())
                    .sum();
            }
        }
    }
}

/// Output row (num_heads, head_dim) of a row from its segments' partial
/// results, `segments` of them in order: rescaled to the largest max and
/// normalised, always in the same order.
pub fn merge_segments(parts: &[f32], segments: usize, shape: AttentionShape, out: &mut [f32]) {
    let (heads, d) = (shape.num_heads, shape.head_dim);
    let len = segment_len(shape);
    for h in 0..heads {
        let part = |s: usize| &parts[s * len + h * (d + 2)..][..d + 2];
        let max = (0..segments)
            .map(|s| part(s)[0])
            .fold(f32::NEG_INFINITY, f32::max);
        let o = &mut out[h * d..][..d];
        o.fill(0.0);
        let mut sum = 0f32;
        for s in 0..segments {
            let p = part(s);
            let w = fast_exp(p[0] - max);
            sum += w * p[1];
            o.iter_mut().zip(&p[2..]).for_each(|(o, a)| *o += w * a);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|o| *o *= inv);
    }
}
