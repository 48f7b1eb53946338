//! [`attend_tile`](super::attend_tile) for CPUs with AVX2 and FMA but not
//! AVX-512: position by position, each cached key and value row is widened
//! to f32 once and used by every query head of its kv head and every row
//! of the tile (8-lane dot products, 8-lane multiply-adds), scores kept per
//! row and head for the segment, softmax weights by the same `fast_exp` as
//! the portable loop. A row's arithmetic is its own, in the same order in
//! any tile, as the other kernels keep it.

use std::arch::x86_64::*;
use std::ops::Range;

use super::tile::{TileQuery, TileScratch, SEGMENT};
use super::{AttentionShape, KvElem};
use crate::exp::fast_exp;

/// Whether this kernel takes the shape: head_dim in whole registers.
pub(super) fn fits(shape: AttentionShape) -> bool {
    shape.head_dim.is_multiple_of(8)
}

/// # Safety
/// The CPU has AVX2 and FMA; otherwise as [`attend_tile`](super::attend_tile).
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn attend<T: KvElem>(
    shape: AttentionShape,
    tile: &TileQuery<'_>,
    kv_heads: Range<usize>,
    k_cache: &[T],
    v_cache: &[T],
    outs: &[*mut f32],
    scratch: &mut TileScratch,
) {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
        block_size: bs,
    } = shape;
    let g = num_heads / num_kv_heads;
    let rows = tile.ends.len();
    let last = tile.ends.iter().copied().max().unwrap_or(tile.first);
    let start = |i: usize| tile.starts.map_or(tile.first, |s| s[i]);
    let begin = (0..rows).map(start).min().unwrap_or(tile.first);
    // scores of (row, head of the kv head) over the segment's positions, then a row of k or v
    scratch.floats.resize(rows * g * SEGMENT + d, 0.0);
    let (scores, row_f32) = scratch.floats.split_at_mut(rows * g * SEGMENT);
    let at = |p: usize, kv_head: usize| {
        ((tile.table[p / bs] as usize * bs + p % bs) * num_kv_heads + kv_head) * d
    };
    for kv_head in kv_heads {
        for p in begin..last {
            widen(&k_cache[at(p, kv_head)..][..d], row_f32);
            for (i, &end) in tile.ends.iter().enumerate() {
                if p >= end || p < start(i) {
                    continue;
                }
                for j in 0..g {
                    let h = kv_head * g + j;
                    let qh = &tile.q[(i * num_heads + h) * d..][..d];
                    scores[(i * g + j) * SEGMENT + p - tile.first] = dot(qh, row_f32) * tile.scale;
                }
            }
        }
        // per row and head: max, weights in place, their sum; the output row zeroed
        for (i, (&end, &out)) in tile.ends.iter().zip(outs).enumerate() {
            for j in 0..g {
                let s =
                    &mut scores[(i * g + j) * SEGMENT..][start(i) - tile.first..end - tile.first];
                let max = s.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                let mut sum = 0f32;
                for w in s.iter_mut() {
                    *w = fast_exp(*w - max);
                    sum += *w;
                }
                // SAFETY: per the contract, `out` holds this head's part.
                let part =
                    std::slice::from_raw_parts_mut(out.add((kv_head * g + j) * (d + 2)), d + 2);
                part[0] = max;
                part[1] = sum;
                part[2..].fill(0.0);
            }
        }
        for p in begin..last {
            widen(&v_cache[at(p, kv_head)..][..d], row_f32);
            for (i, (&end, &out)) in tile.ends.iter().zip(outs).enumerate() {
                if p >= end || p < start(i) {
                    continue;
                }
                for j in 0..g {
                    let w = scores[(i * g + j) * SEGMENT + p - tile.first];
                    let acc = out.add((kv_head * g + j) * (d + 2) + 2);
                    axpy(w, row_f32, acc, d);
                }
            }
        }
    }
}

/// A cache row as f32.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn widen<T: KvElem>(src: &[T], dst: &mut [f32]) {
    for (o, &v) in dst.iter_mut().zip(src) {
        *o = v.to_f32();
    }
}

/// Σ a b over whole registers of 8, summed lane by lane in a fixed order.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for c in (0..a.len()).step_by(8) {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(c)),
            _mm256_loadu_ps(b.as_ptr().add(c)),
            acc,
        );
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    lanes.iter().sum()
}

/// `acc[..d] += w x[..d]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy(w: f32, x: &[f32], acc: *mut f32, d: usize) {
    let wv = _mm256_set1_ps(w);
    for c in (0..d).step_by(8) {
        let a = _mm256_loadu_ps(acc.add(c));
        _mm256_storeu_ps(
            acc.add(c),
            _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(c)), a),
        );
    }
}
