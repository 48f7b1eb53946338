//! The f32 tile kernel: FMAs over transposed keys, the softmax online over
//! the chunks of 16 positions (a running max per head, the sums and outputs
//! rescaled when it grows).

use std::arch::x86_64::*;

use super::{store_scores, Unit};
use crate::attention::layout::{load16, transpose16};
use crate::attention::{KvElem, TileQuery, TileScratch};
use crate::exp::{exp16, fast_exp};

/// Scores of M heads of one row against a chunk of 16 transposed keys
/// (`kt[c * 16 + j]`): head `m`'s query at `q + m * d`. Per head, four
/// chains over head_dim (`c mod 4`) summed in a fixed order, whatever M.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn scores<const M: usize>(q: *const f32, kt: *const f32, d: usize, out: *mut f32) {
    let mut acc = [[_mm512_setzero_ps(); 4]; M];
    for c in (0..d).step_by(4) {
        for u in 0..4 {
            let k = _mm512_loadu_ps(kt.add((c + u) * 16));
            for (m, a) in acc.iter_mut().enumerate() {
                a[u] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(m * d + c + u)), k, a[u]);
            }
        }
    }
    store_scores(&acc, out);
}

/// M heads' accumulators (`acc + m * d`, 16 * TILES floats) times `corr[m]`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn rescaled<const M: usize, const TILES: usize>(
    acc: *const f32,
    d: usize,
    corr: &[f32],
) -> [[__m512; TILES]; M] {
    let mut o = [[_mm512_setzero_ps(); TILES]; M];
    for (m, o) in o.iter_mut().enumerate() {
        for (t, o) in o.iter_mut().enumerate() {
            *o = _mm512_mul_ps(
                _mm512_loadu_ps(acc.add(m * d + t * 16)),
                _mm512_set1_ps(corr[m]),
            );
        }
    }
    o
}

#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store<const M: usize, const TILES: usize>(
    acc: *mut f32,
    d: usize,
    o: &[[__m512; TILES]; M],
) {
    for (m, o) in o.iter().enumerate() {
        for (t, o) in o.iter().enumerate() {
            _mm512_storeu_ps(acc.add(m * d + t * 16), *o);
        }
    }
}

/// One chunk's weights and values: head `m`'s `n` weights at
/// `probs + m * 16`, value row `j` at `v + j * stride`.
#[derive(Clone, Copy)]
struct Chunk {
    probs: *const f32,
    n: usize,
    v: *const f32,
    stride: usize,
}

/// For M heads of one row: `acc = acc * corr + Σ_j probs[j] * v[j]` over
/// `16 * TILES` floats, head `m`'s accumulator at `acc + m * d`. Per
/// lane, the products in `j` order whatever M and TILES are.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn weigh<const M: usize, const TILES: usize>(
    acc: *mut f32,
    d: usize,
    corr: &[f32],
    c: Chunk,
) {
    let mut o = rescaled::<M, TILES>(acc, d, corr);
    for j in 0..c.n {
        for t in 0..TILES {
            let vt = _mm512_loadu_ps(c.v.add(j * c.stride + t * 16));
            for (m, o) in o.iter_mut().enumerate() {
                o[t] = _mm512_fmadd_ps(_mm512_set1_ps(*c.probs.add(m * 16 + j)), vt, o[t]);
            }
        }
    }
    store::<M, TILES>(acc, d, &o);
}

/// [`weigh`] for `heads` heads (up to 4) of any head_dim: TILES is a
/// constant for the common sizes, else one 16-float tile at a time.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn weigh_heads(heads: usize, acc: *mut f32, d: usize, corr: &[f32], c: Chunk) {
    macro_rules! by_heads {
        ($tiles:literal, $acc:expr, $c:expr) => {
            match heads {
                1 => weigh::<1, $tiles>($acc, d, corr, $c),
                2 => weigh::<2, $tiles>($acc, d, corr, $c),
                3 => weigh::<3, $tiles>($acc, d, corr, $c),
                _ => weigh::<4, $tiles>($acc, d, corr, $c),
            }
        };
    }
    match d / 16 {
        4 => by_heads!(4, acc, c),
        2 => by_heads!(2, acc, c),
        1 => by_heads!(1, acc, c),
        8 if heads <= 2 => match heads {
            1 => weigh::<1, 8>(acc, d, corr, c),
            _ => weigh::<2, 8>(acc, d, corr, c),
        },
        tiles => {
            for t in 0..tiles {
                let column = Chunk {
                    v: c.v.add(t * 16),
                    ..c
                };
                by_heads!(1, acc.add(t * 16), column)
            }
        }
    }
}

/// Where each buffer of the f32 path starts in the tile's scratch (floats):
/// the chunk's key and value rows (a position's row: the unit's kv heads)
/// in f32, the keys transposed; per (row, unit head) item: the scaled
/// query, the output accumulator, the per-lane weight sums; per item of one
/// kv head: scores, weights.
#[derive(Clone, Copy)]
struct Offsets {
    k_rows: usize,
    v_rows: usize,
    k_t: usize,
    qs: usize,
    accs: usize,
    sums: usize,
    scores: usize,
    probs: usize,
    len: usize,
}

impl Offsets {
    #[inline]
    fn new(unit: &Unit) -> Self {
        let Unit {
            d,
            g,
            rows,
            hs,
            kv_row,
            ..
        } = *unit;
        let (k_rows, v_rows, k_t) = (0, 16 * kv_row, 32 * kv_row);
        let qs = k_t + 16 * d;
        let accs = qs + rows * hs * d;
        let sums = accs + rows * hs * d;
        let scores = sums + rows * hs * 16;
        let probs = scores + rows * g * 16;
        Self {
            k_rows,
            v_rows,
            k_t,
            qs,
            accs,
            sums,
            scores,
            probs,
            len: probs + rows * g * 16,
        }
    }
}

/// One kv head of the unit: where its keys and values start in a chunk's
/// rows (`col`) and its first query head among the unit's (`local`).
#[derive(Clone, Copy)]
struct KvHead {
    col: usize,
    local: usize,
}

/// The f32 path of [`attend`](super::attend): chunk by chunk of 16
/// positions, the chunk's rows converted once, then per kv head the keys
/// transposed and three passes over the (row, head) items, each pass's
/// items independent (so their latencies overlap): scores, the online
/// softmax, the weighted values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn attend<T: KvElem>(
    unit: Unit,
    tile: &TileQuery<'_>,
    (k_cache, v_cache): (&[T], &[T]),
    outs: &[*mut f32],
    scratch: &mut TileScratch,
) {
    let at = Offsets::new(&unit);
    scratch.floats.clear();
    scratch.floats.resize(at.len, 0.0);
    scratch.maxes.clear();
    scratch.maxes.resize(unit.rows * unit.hs, f32::NEG_INFINITY);
    scratch.corrs.clear();
    scratch.corrs.resize(unit.rows * unit.g, 0.0);
    let mut online = Online {
        unit,
        tile,
        k_cache,
        v_cache,
        buf: scratch.floats.as_mut_ptr(),
        at,
        maxes: &mut scratch.maxes,
        corrs: &mut scratch.corrs,
    };
    online.scale_queries();
    let mut start = tile.first;
    while start < unit.end {
        let n_all = 16.min(unit.end - start);
        unit.prefetch_ahead(tile, start, k_cache, v_cache);
        online.load_chunk(start, n_all);
        for k in 0..unit.num_kv {
            online.attend_chunk(start, k);
        }
        start += n_all;
    }
    online.write_parts(outs);
}

/// One call of the f32 path: the unit of a tile, its cache, and the scratch
/// (`buf`, laid out by [`Offsets`]; each item's running max, and its
/// correction in the current chunk).
struct Online<'a, T> {
    unit: Unit,
    tile: &'a TileQuery<'a>,
    k_cache: &'a [T],
    v_cache: &'a [T],
    buf: *mut f32,
    at: Offsets,
    maxes: &'a mut [f32],
    corrs: &'a mut [f32],
}

impl<T: KvElem> Online<'_, T> {
    /// The rows' queries of the unit's heads, times the softmax scale.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn scale_queries(&self) {
        let Unit { d, rows, hs, .. } = self.unit;
        for i in 0..rows {
            let src = self.unit.query(self.tile, i);
            let dst = self.buf.add(self.at.qs + i * hs * d);
            for c in 0..hs * d {
                *dst.add(c) = *src.add(c) * self.tile.scale;
            }
        }
    }

    /// The chunk's `n_all` rows of the unit's kv heads at `start`, in memory
    /// order, in f32 (keys past them zero).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn load_chunk(&self, start: usize, n_all: usize) {
        let (buf, kv_row) = (self.buf, self.unit.kv_row);
        for j in 0..16 {
            let (kd, vd) = (
                buf.add(self.at.k_rows + j * kv_row),
                buf.add(self.at.v_rows + j * kv_row),
            );
            if j < n_all {
                let at = self.unit.row(self.tile, start + j);
                for t in 0..kv_row / 16 {
                    let k = load16(self.k_cache.as_ptr().add(at + t * 16));
                    _mm512_storeu_ps(kd.add(t * 16), k);
                }
                for t in 0..kv_row / 16 {
                    let v = load16(self.v_cache.as_ptr().add(at + t * 16));
                    _mm512_storeu_ps(vd.add(t * 16), v);
                }
            } else {
                std::ptr::write_bytes(kd, 0, kv_row);
            }
        }
    }

    /// The loaded chunk for the unit's `k`-th kv head: its keys transposed,
    /// then the three passes over its items.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn attend_chunk(&mut self, start: usize, k: usize) {
        let (d, buf) = (self.unit.d, self.buf);
        let head = KvHead {
            col: k * d,
            local: k * self.unit.g,
        };
        for t in 0..d / 16 {
            transpose16(
                buf.add(self.at.k_rows + head.col + t * 16),
                self.unit.kv_row,
                buf.add(self.at.k_t + t * 256),
            );
        }
        self.chunk_scores(start, head);
        self.chunk_softmax(start, head);
        self.chunk_values(start, head);
    }

    /// Item (i, h) of this kv head, h in 0..g, is unit head `local + h`: its
    /// 16 scores against the transposed chunk, up to 4 heads at a time.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn chunk_scores(&self, start: usize, head: KvHead) {
        let (Unit { d, g, rows, hs, .. }, buf, at) = (self.unit, self.buf, self.at);
        for i in 0..rows {
            if self.tile.ends[i] <= start {
                continue;
            }
            for h0 in (0..g).step_by(4) {
                let q = buf.add(at.qs + (i * hs + head.local + h0) * d);
                let out = buf.add(at.scores + (i * g + h0) * 16);
                match 4.min(g - h0) {
                    1 => scores::<1>(q, buf.add(at.k_t), d, out),
                    2 => scores::<2>(q, buf.add(at.k_t), d, out),
                    3 => scores::<3>(q, buf.add(at.k_t), d, out),
                    _ => scores::<4>(q, buf.add(at.k_t), d, out),
                }
            }
        }
    }

    /// Per item: the chunk's weights under the running max, the correction
    /// of what came before, and the per-lane sums brought up to date.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn chunk_softmax(&mut self, start: usize, head: KvHead) {
        let (Unit { g, rows, hs, .. }, buf, at) = (self.unit, self.buf, self.at);
        for i in 0..rows {
            if self.tile.ends[i] <= start {
                continue;
            }
            let n = 16.min(self.tile.ends[i] - start);
            let mask: __mmask16 = ((1u32 << n) - 1) as u16;
            for h in 0..g {
                let (item, u) = (i * g + h, i * hs + head.local + h);
                let sc = _mm512_mask_loadu_ps(
                    _mm512_set1_ps(f32::NEG_INFINITY),
                    mask,
                    buf.add(at.scores + item * 16),
                );
                let old = self.maxes[u];
                let new_max = old.max(_mm512_reduce_max_ps(sc));
                let p =
                    _mm512_maskz_mov_ps(mask, exp16(_mm512_sub_ps(sc, _mm512_set1_ps(new_max))));
                // fast_exp(0) is exactly 1: skip it while the max holds
                let corr = if new_max == old {
                    1.0
                } else {
                    fast_exp(old - new_max)
                };
                let sum = buf.add(at.sums + u * 16);
                _mm512_storeu_ps(
                    sum,
                    _mm512_fmadd_ps(_mm512_loadu_ps(sum), _mm512_set1_ps(corr), p),
                );
                self.maxes[u] = new_max;
                self.corrs[item] = corr;
                _mm512_storeu_ps(buf.add(at.probs + item * 16), p);
            }
        }
    }

    /// Per item: the accumulator corrected and the chunk's weighted values
    /// added.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn chunk_values(&self, start: usize, head: KvHead) {
        let (unit, buf, at) = (self.unit, self.buf, self.at);
        let Unit {
            d,
            g,
            rows,
            hs,
            kv_row,
            ..
        } = unit;
        for i in 0..rows {
            if self.tile.ends[i] <= start {
                continue;
            }
            let n = 16.min(self.tile.ends[i] - start);
            for h0 in (0..g).step_by(4) {
                let item = i * g + h0;
                let chunk = Chunk {
                    probs: buf.add(at.probs + item * 16),
                    n,
                    v: buf.add(at.v_rows + head.col),
                    stride: kv_row,
                };
                let acc = buf.add(at.accs + (i * hs + head.local + h0) * d);
                weigh_heads(4.min(g - h0), acc, d, &self.corrs[item..], chunk);
            }
        }
    }

    /// Each row's `[max, sum, acc(head_dim)]` per unit head, to its part.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn write_parts(&self, outs: &[*mut f32]) {
        let Unit {
            d, hs, first_head, ..
        } = self.unit;
        for (i, &out) in outs.iter().enumerate() {
            for h in 0..hs {
                let u = i * hs + h;
                let part = out.add((first_head + h) * (d + 2));
                *part = self.maxes[u];
                let sum = _mm512_loadu_ps(self.buf.add(self.at.sums + u * 16));
                *part.add(1) = _mm512_reduce_add_ps(sum);
                std::ptr::copy_nonoverlapping(self.buf.add(self.at.accs + u * d), part.add(2), d);
            }
        }
    }
}
