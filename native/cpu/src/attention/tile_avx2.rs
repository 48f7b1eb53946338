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
    // scores of (row, head of the kv head) over the segment's positions, then 8 rows of k (or one of v)
    scratch.floats.resize(rows * g * SEGMENT + 8 * d, 0.0);
    let (scores, row_f32) = scratch.floats.split_at_mut(rows * g * SEGMENT);
    let at = |p: usize, kv_head: usize| {
        ((tile.table[p / bs] as usize * bs + p % bs) * num_kv_heads + kv_head) * d
    };
    for kv_head in kv_heads {
        // positions 8 at a time from a multiple of 8 (the segment starts on one), so a row's
        // chunks are the same in any tile; a row takes a whole chunk in one go, else position
        // by position, with the same sums in the same order either way
        let mut p0 = tile.first + (begin - tile.first) / 8 * 8;
        while p0 < last {
            let n = 8.min(last - p0);
            for t in 0..n {
                widen(
                    &k_cache[at(p0 + t, kv_head)..][..d],
                    &mut row_f32[t * d..][..d],
                );
            }
            for (i, &end) in tile.ends.iter().enumerate() {
                let (lo, hi) = (start(i).max(p0), end.min(p0 + n));
                if lo >= hi {
                    continue;
                }
                for j in 0..g {
                    let h = kv_head * g + j;
                    let qh = &tile.q[(i * num_heads + h) * d..][..d];
                    let row = &mut scores[(i * g + j) * SEGMENT..];
                    if (lo, hi) == (p0, p0 + 8) {
                        let s = _mm256_mul_ps(dot8(qh, row_f32, d), _mm256_set1_ps(tile.scale));
                        _mm256_storeu_ps(row.as_mut_ptr().add(p0 - tile.first), s);
                        continue;
                    }
                    for p in lo..hi {
                        row[p - tile.first] = dot(qh, &row_f32[(p - p0) * d..][..d]) * tile.scale;
                    }
                }
            }
            p0 += 8;
        }
        // per row and head: max, weights in place, their sum; the output row zeroed
        for (i, (&end, &out)) in tile.ends.iter().zip(outs).enumerate() {
            for j in 0..g {
                let s =
                    &mut scores[(i * g + j) * SEGMENT..][start(i) - tile.first..end - tile.first];
                let max = s.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                // the exponentials apart from their (in-order) sum, so that they vectorise
                for w in s.iter_mut() {
                    *w = fast_exp(*w - max);
                }
                let sum: f32 = s.iter().sum();
                // SAFETY: per the contract, `out` holds this head's part.
                let part =
                    std::slice::from_raw_parts_mut(out.add((kv_head * g + j) * (d + 2)), d + 2);
                part[0] = max;
                part[1] = sum;
                part[2..].fill(0.0);
            }
        }
        // the values 8 positions at a time too: a row's output takes them in position
        // order either way, in registers across a whole chunk
        let mut p0 = tile.first + (begin - tile.first) / 8 * 8;
        while p0 < last {
            let n = 8.min(last - p0);
            for t in 0..n {
                widen(
                    &v_cache[at(p0 + t, kv_head)..][..d],
                    &mut row_f32[t * d..][..d],
                );
            }
            for (i, (&end, &out)) in tile.ends.iter().zip(outs).enumerate() {
                let (lo, hi) = (start(i).max(p0), end.min(p0 + n));
                if lo >= hi {
                    continue;
                }
                for j in 0..g {
                    let w = &scores[(i * g + j) * SEGMENT + lo - tile.first..][..hi - lo];
                    let acc = out.add((kv_head * g + j) * (d + 2) + 2);
                    accumulate(w, &row_f32[(lo - p0) * d..], acc, d);
                }
            }
            p0 += 8;
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

/// Σ a b: lane-wise multiply-adds over whole registers of 8, then the lanes
/// summed pairwise, ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)), as
/// [`dot8`] sums them.
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
    let mut l = [0f32; 8];
    _mm256_storeu_ps(l.as_mut_ptr(), acc);
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// [`dot`] of `q` with each of the 8 rows of `k` (8 x `d`), as one register.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot8(q: &[f32], k: &[f32], d: usize) -> __m256 {
    let mut acc = [_mm256_setzero_ps(); 8];
    for c in (0..d).step_by(8) {
        let qv = _mm256_loadu_ps(q.as_ptr().add(c));
        for (t, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k.as_ptr().add(t * d + c)), *a);
        }
    }
    // three levels of pairwise sums: each result lane's sum in dot's order
    let s01 = _mm256_hadd_ps(acc[0], acc[1]);
    let s23 = _mm256_hadd_ps(acc[2], acc[3]);
    let s45 = _mm256_hadd_ps(acc[4], acc[5]);
    let s67 = _mm256_hadd_ps(acc[6], acc[7]);
    let s0123 = _mm256_hadd_ps(s01, s23);
    let s4567 = _mm256_hadd_ps(s45, s67);
    let lo = _mm256_permute2f128_ps::<0x20>(s0123, s4567);
    let hi = _mm256_permute2f128_ps::<0x31>(s0123, s4567);
    _mm256_add_ps(lo, hi)
}

/// `acc[..d] += Σ_t w[t] x[t d..t d + d]`, the rows added in order, each 8 columns
/// kept in a register across the rows.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn accumulate(w: &[f32], x: &[f32], acc: *mut f32, d: usize) {
    for c in (0..d).step_by(8) {
        let mut a = _mm256_loadu_ps(acc.add(c));
        for (t, &wt) in w.iter().enumerate() {
            a = _mm256_fmadd_ps(
                _mm256_set1_ps(wt),
                _mm256_loadu_ps(x.as_ptr().add(t * d + c)),
                a,
            );
        }
        _mm256_storeu_ps(acc.add(c), a);
    }
}
