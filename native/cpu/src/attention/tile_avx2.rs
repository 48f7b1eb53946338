//! [`attend_tile`](super::attend_tile) for CPUs with AVX2 and FMA but not
//! AVX-512: position by position, each cached key and value row is widened
//! to f32 once and used by every query head of its kv head and every row
//! of the tile (8-lane dot products, 8-lane multiply-adds), scores kept per
//! row and head for the segment, softmax weights by the same `fast_exp` as
//! the portable loop. A row's arithmetic is its own, in the same order in
//! any tile, as the other kernels keep it.

use std::arch::x86_64::*;
use std::ops::Range;

use super::tile::{capped, TileQuery, TileScratch, SEGMENT};
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
    let rows = tile.ends.len();
    let start = |i: usize| tile.starts.map_or(tile.first, |s| s[i]);
    let span = Span {
        tile,
        g: num_heads / num_kv_heads,
        d,
        num_heads,
        // from a multiple of 8 (the segment starts on one), so that a row's chunks of 8
        // positions are the same in any tile
        begin: tile.first + ((0..rows).map(start).min().unwrap_or(tile.first) - tile.first) / 8 * 8,
        last: tile.ends.iter().copied().max().unwrap_or(tile.first),
    };
    // scores of (row, head of the kv head) over the segment's positions, then 8 rows of k or v
    scratch.floats.resize(rows * span.g * SEGMENT + 8 * d, 0.0);
    let (scores, rows_f32) = scratch.floats.split_at_mut(rows * span.g * SEGMENT);
    for kv_head in kv_heads {
        let at =
            |p: usize| ((tile.table[p / bs] as usize * bs + p % bs) * num_kv_heads + kv_head) * d;
        span.scores(kv_head, |p| &k_cache[at(p)..][..d], scores, rows_f32);
        span.softmax(kv_head, scores, outs);
        span.values(kv_head, |p| &v_cache[at(p)..][..d], scores, rows_f32, outs);
    }
}

/// One tile's positions and shape, for the three passes over each kv head.
struct Span<'a, 'q> {
    tile: &'a TileQuery<'q>,
    g: usize,
    d: usize,
    num_heads: usize,
    begin: usize,
    last: usize,
}

impl Span<'_, '_> {
    fn start(&self, i: usize) -> usize {
        self.tile.starts.map_or(self.tile.first, |s| s[i])
    }

    /// Chunks of up to 8 positions from `begin`: (first position, count).
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (self.begin..self.last)
            .step_by(8)
            .map(|p0| (p0, 8.min(self.last - p0)))
    }

    /// Row i's positions within the chunk at p0 of n, if any.
    fn within(&self, i: usize, (p0, n): (usize, usize)) -> Option<(usize, usize)> {
        let (lo, hi) = (self.start(i).max(p0), self.tile.ends[i].min(p0 + n));
        (lo < hi).then_some((lo, hi))
    }

    /// Asks the cache for the rows of the chunk at `p0` (if in the span): a
    /// kv head's rows lie a whole cache position apart, far enough that
    /// waiting on them took over half of a 1B model's decode attention.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn prefetch<'r, T: KvElem + 'r>(&self, row: &impl Fn(usize) -> &'r [T], p0: usize) {
        for p in p0..(p0 + 8).min(self.last) {
            let bytes = row(p);
            let at = bytes.as_ptr().cast::<i8>();
            for line in (0..std::mem::size_of_val(bytes)).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(line));
            }
        }
    }

    /// Scaled scores of every row and head of `kv_head`: a row takes a whole chunk
    /// in one go, else position by position, with the same sums in the same order.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores<'k, T: KvElem + 'k>(
        &self,
        kv_head: usize,
        key: impl Fn(usize) -> &'k [T],
        scores: &mut [f32],
        buf: &mut [f32],
    ) {
        let (tile, d) = (self.tile, self.d);
        for (p0, n) in self.chunks() {
            self.prefetch(&key, p0 + 8);
            for t in 0..n {
                widen(key(p0 + t), &mut buf[t * d..][..d]);
            }
            for i in 0..tile.ends.len() {
                let Some((lo, hi)) = self.within(i, (p0, n)) else {
                    continue;
                };
                for j in 0..self.g {
                    let qh = &tile.q[(i * self.num_heads + kv_head * self.g + j) * d..][..d];
                    let row = &mut scores[(i * self.g + j) * SEGMENT..];
                    if (lo, hi) == (p0, p0 + 8) {
                        let s = _mm256_mul_ps(dot8(qh, buf, d), _mm256_set1_ps(tile.scale));
                        _mm256_storeu_ps(row.as_mut_ptr().add(p0 - tile.first), s);
                        continue;
                    }
                    for p in lo..hi {
                        row[p - tile.first] = dot(qh, &buf[(p - p0) * d..][..d]) * tile.scale;
                    }
                }
            }
        }
    }

    /// Per row and head: max, weights in place, their sum; the output row zeroed.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn softmax(&self, kv_head: usize, scores: &mut [f32], outs: &[*mut f32]) {
        let (tile, g, d) = (self.tile, self.g, self.d);
        for (i, (&end, &out)) in tile.ends.iter().zip(outs).enumerate() {
            for j in 0..g {
                let s = &mut scores[(i * g + j) * SEGMENT..]
                    [self.start(i) - tile.first..end - tile.first];
                if tile.softcap.is_some() {
                    s.iter_mut().for_each(|v| *v = capped(*v, tile.softcap));
                }
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
    }

    /// The weighted values, 8 positions at a time: a row's output takes them in
    /// position order either way, in registers across a whole chunk.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn values<'v, T: KvElem + 'v>(
        &self,
        kv_head: usize,
        value: impl Fn(usize) -> &'v [T],
        scores: &[f32],
        buf: &mut [f32],
        outs: &[*mut f32],
    ) {
        let (tile, g, d) = (self.tile, self.g, self.d);
        for (p0, n) in self.chunks() {
            self.prefetch(&value, p0 + 8);
            for t in 0..n {
                widen(value(p0 + t), &mut buf[t * d..][..d]);
            }
            for (i, &out) in outs.iter().enumerate() {
                let Some((lo, hi)) = self.within(i, (p0, n)) else {
                    continue;
                };
                for j in 0..g {
                    let w = &scores[(i * g + j) * SEGMENT + lo - tile.first..][..hi - lo];
                    let acc = out.add((kv_head * g + j) * (d + 2) + 2);
                    accumulate(w, &buf[(lo - p0) * d..], acc, d);
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
