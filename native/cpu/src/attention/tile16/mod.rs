//! [`attend_tile`](super::attend_tile) with AVX-512, 16 positions (lanes) at
//! a time: each chunk of keys is transposed once for the whole tile, so a
//! row's 16 scores are plain FMAs over head_dim with no horizontal sums, and
//! each chunk of values is converted once. Two kernels: f32 FMAs with the
//! softmax online over the chunks (`online`), and for a bf16 cache on a CPU
//! with AVX512-BF16, bf16 pairs with the softmax over the whole segment at
//! once (`pairs`). [`Unit`] is what both take from the tile.

mod online;
mod pairs;

use std::arch::x86_64::*;
use std::ops::Range;

use super::{AttentionShape, KvElem, TileQuery, TileScratch};

/// The tile's partial softmaxes for the query heads of `kv_heads`; the
/// contract is [`attend_tile`](super::attend_tile)'s.
///
/// # Safety
/// As `attend_tile`'s, and the CPU has AVX-512 F and BW.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn attend<T: KvElem>(
    shape: AttentionShape,
    tile: &TileQuery<'_>,
    kv_heads: Range<usize>,
    k_cache: &[T],
    v_cache: &[T],
    outs: &[*mut f32],
    scratch: &mut TileScratch,
) {
    // bf16 cache and CPU: keys, values, queries and weights in bf16
    // pairs, two products a lane per instruction (as torch's bf16
    // attention rounds them); else f32 FMAs, online over the chunks
    let unit = Unit::new(shape, tile, &kv_heads);
    if T::IS_BF16 && pairs::bf16_dots(shape.head_dim) {
        return pairs::attend(unit, tile, (k_cache, v_cache), outs, scratch);
    }
    online::attend(unit, tile, (k_cache, v_cache), outs, scratch)
}

/// Each head's four chains, summed in a fixed order, to `out + m * 16`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_scores<const M: usize>(acc: &[[__m512; 4]; M], out: *mut f32) {
    for (m, a) in acc.iter().enumerate() {
        let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        _mm512_storeu_ps(out.add(m * 16), s);
    }
}

/// What both tile paths take from the shape, the tile and the unit's
/// kv heads.
#[derive(Clone, Copy)]
struct Unit {
    shape: AttentionShape,
    d: usize,
    /// query heads per kv head
    g: usize,
    rows: usize,
    /// kv heads of the unit
    num_kv: usize,
    /// query heads of the unit, per row: those of its kv heads, in order
    hs: usize,
    first_head: usize,
    /// the end of the longest row's context in the segment
    end: usize,
    /// elements of a position's row of the unit's kv heads
    kv_row: usize,
    /// where that row starts in the position's cache row
    unit_off: usize,
}

impl Unit {
    #[inline]
    fn new(shape: AttentionShape, tile: &TileQuery<'_>, kv_heads: &Range<usize>) -> Self {
        let (d, g) = (shape.head_dim, shape.num_heads / shape.num_kv_heads);
        Unit {
            shape,
            d,
            g,
            rows: tile.ends.len(),
            num_kv: kv_heads.len(),
            hs: kv_heads.len() * g,
            first_head: kv_heads.start * g,
            end: tile.ends.iter().copied().max().unwrap_or(tile.first),
            kv_row: kv_heads.len() * d,
            unit_off: kv_heads.start * d,
        }
    }

    /// Where position `p`'s row of the unit's kv heads starts in the cache.
    #[inline]
    unsafe fn row(&self, tile: &TileQuery<'_>, p: usize) -> usize {
        let bs = self.shape.block_size;
        let slot = *tile.table.get_unchecked(p / bs) as usize * bs + p % bs;
        slot * self.shape.num_kv_heads * self.d + self.unit_off
    }

    /// Row `i`'s query heads of the unit.
    #[inline]
    unsafe fn query(&self, tile: &TileQuery<'_>, i: usize) -> *const f32 {
        let heads = self.shape.num_heads;
        tile.q.as_ptr().add((i * heads + self.first_head) * self.d)
    }

    /// The chunks after the one at `start`, rows of the unit's kv heads,
    /// from memory into L2 while this one computes: a decode batch's
    /// cache is far larger than the caches.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn prefetch_ahead<T>(
        &self,
        tile: &TileQuery<'_>,
        start: usize,
        k_cache: &[T],
        v_cache: &[T],
    ) {
        let lo = if start == tile.first {
            start
        } else {
            start + 32
        };
        let bytes = self.kv_row * std::mem::size_of::<T>();
        for p in lo..self.end.min(start + 48) {
            let at = self.row(tile, p);
            for off in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T1>(k_cache.as_ptr().add(at).cast::<i8>().add(off));
                _mm_prefetch::<_MM_HINT_T1>(v_cache.as_ptr().add(at).cast::<i8>().add(off));
            }
        }
    }
}
