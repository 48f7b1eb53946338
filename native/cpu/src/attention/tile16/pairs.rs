//! The bf16-pair tile kernel (AVX512-BF16 `vdpbf16ps`, two products a lane
//! per instruction): keys, values, queries and weights in bf16 pairs, as
//! torch's bf16 attention rounds them; the softmax over the whole segment.

use std::arch::x86_64::*;

use super::{store_scores, Unit};
use crate::attention::layout::transpose16;
use crate::attention::{KvElem, TileQuery, TileScratch};
use crate::exp::exp16;

/// [`scores`] in bf16 pairs (AVX512-BF16 `vdpbf16ps`, two products a
/// lane per instruction): head `m`'s query pairs at `q + m * half`
/// (dwords), `kt[c * 16 + j]` = key `j`'s pair `c`, `half` = head_dim / 2.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn scores_bf16<const M: usize>(q: *const u32, kt: *const f32, half: usize, out: *mut f32) {
    let mut acc = [[_mm512_setzero_ps(); 4]; M];
    for c in (0..half).step_by(4) {
        for u in 0..4 {
            let k: __m512bh = std::mem::transmute(_mm512_loadu_ps(kt.add((c + u) * 16)));
            for (m, a) in acc.iter_mut().enumerate() {
                let qp: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*q.add(m * half + c + u) as i32));
                a[u] = _mm512_dpbf16_ps(a[u], qp, k);
            }
        }
    }
    store_scores(&acc, out);
}

/// The weighted values of M heads of one row over a segment, in
/// registers, bf16 pairs: head `m`'s weight pairs of chunk `c` (dwords:
/// positions 2i, 2i + 1) at `probs + (c * stride + m) * 8`; chunk `c`'s
/// value pairs at `vv + c * vv_stride`, `(i * TILES + t) * 16 + l` =
/// values 2i and 2i + 1 of dimension `16 t + l`; all 8 pairs of a chunk
/// but the last's `last_pairs`. Head `m`'s `16 * TILES` sums to
/// `out[m]`. Per lane, the products in position order whatever M is.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn weigh_pairs<const M: usize, const TILES: usize>(
    probs: *const u32,
    stride: usize,
    values: (*const f32, usize),
    chunks: usize,
    last_pairs: usize,
    out: [*mut f32; 4],
) {
    let (vv, vv_stride) = values;
    let mut o = [[_mm512_setzero_ps(); TILES]; M];
    for c in 0..chunks {
        let pairs = if c + 1 == chunks { last_pairs } else { 8 };
        let (v, p) = (vv.add(c * vv_stride), probs.add(c * stride * 8));
        for i in 0..pairs {
            for t in 0..TILES {
                let vt: __m512bh =
                    std::mem::transmute(_mm512_loadu_ps(v.add((i * TILES + t) * 16)));
                for (m, o) in o.iter_mut().enumerate() {
                    let w: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*p.add(m * 8 + i) as i32));
                    o[t] = _mm512_dpbf16_ps(o[t], w, vt);
                }
            }
        }
    }
    for (m, o) in o.iter().enumerate() {
        for (t, o) in o.iter().enumerate() {
            _mm512_storeu_ps(out[m].add(t * 16), *o);
        }
    }
}

/// [`weigh_pairs`] for `heads` heads: up to 4 of 2 or 4 tiles, 2 of 6
/// or 8, 1 of more (see [`heads_per_pass`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn weigh_pairs_heads(
    heads: usize,
    tiles: usize,
    probs: (*const u32, usize),
    values: (*const f32, usize),
    chunks: (usize, usize),
    out: [*mut f32; 4],
) {
    let ((p, stride), (n, last)) = (probs, chunks);
    macro_rules! go {
        ($m:literal, $t:literal) => {
            weigh_pairs::<$m, $t>(p, stride, values, n, last, out)
        };
    }
    match (tiles, heads) {
        (2, 1) => go!(1, 2),
        (2, 2) => go!(2, 2),
        (2, 3) => go!(3, 2),
        (2, _) => go!(4, 2),
        (4, 1) => go!(1, 4),
        (4, 2) => go!(2, 4),
        (4, 3) => go!(3, 4),
        (4, _) => go!(4, 4),
        (6, 1) => go!(1, 6),
        (6, _) => go!(2, 6),
        (8, 1) => go!(1, 8),
        (8, _) => go!(2, 8),
        (10, _) => go!(1, 10),
        (12, _) => go!(1, 12),
        (14, _) => go!(1, 14),
        _ => go!(1, 16),
    }
}

/// Heads per pass of [`attend`]: their accumulators (heads x
/// tiles registers) fit the 32 registers with room to spare.
fn heads_per_pass(tiles: usize) -> usize {
    match tiles {
        0..=4 => 4,
        5..=8 => 2,
        _ => 1,
    }
}

/// Whether bf16 caches take the `vdpbf16ps` kernels: AVX512-BF16 and
/// head_dim a multiple of 32 (whole 16-pair tiles of keys).
pub(super) fn bf16_dots(head_dim: usize) -> bool {
    head_dim.is_multiple_of(32)
        && head_dim <= 256
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// A chunk's 16 weights as 8 bf16 pairs.
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn weights_bf16(p: __m512, dst: *mut u32) {
    let packed: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(p));
    _mm256_storeu_si256(dst.cast(), packed);
}

/// The bf16-pair path of [`attend`](super::attend). First the segment's
/// keys and values are laid out for `vdpbf16ps`, chunk by chunk of 16
/// positions in memory order, every kv head of the unit: keys transposed in
/// pairs, values interleaved in position pairs (a whole chunk inside one
/// block is read where it lies, else its rows are copied, zeros past the
/// context). Then per row and pass of heads: the scores of the whole
/// segment, one max, the weights, and the weighted values summed in
/// registers. The segment is the softmax's unit, so there is no running
/// max to correct; [`merge_segments`](crate::attention::merge_segments)
/// joins them.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn attend<T: KvElem>(
    unit: Unit,
    tile: &TileQuery<'_>,
    (k_cache, v_cache): (&[T], &[T]),
    outs: &[*mut f32],
    scratch: &mut TileScratch,
) {
    let pairs = Pairs::new(unit, tile, scratch);
    pairs.pack_queries(tile);
    pairs.pack_segment(tile, k_cache, v_cache);
    pairs.attend_rows(tile, outs);
}

/// The bf16-pair path's sizes, and where its buffers start in the tile's
/// scratch (in dwords): per (chunk, kv head of the unit) the key pairs
/// transposed (half x 16) then the value pairs (half x 16); a copy of a
/// chunk's rows (16 x kv_row bf16 each of keys and values); per row and
/// unit head the query pairs; per head of a pass, per chunk, the scores
/// (16 f32) and the weight pairs (8).
#[derive(Clone, Copy)]
struct Pairs {
    unit: Unit,
    buf: *mut f32,
    /// kv heads of the unit
    unit_kv: usize,
    half: usize,
    tiles: usize,
    chunks: usize,
    /// heads per pass
    step: usize,
    per_chunk: usize,
    copy: usize,
    qp: usize,
    sc: usize,
    pr: usize,
}

impl Pairs {
    /// The layout of `unit`'s tile, the scratch grown to hold it.
    #[inline]
    fn new(unit: Unit, tile: &TileQuery<'_>, scratch: &mut TileScratch) -> Self {
        let Unit {
            num_kv: unit_kv,
            d,
            g,
            rows,
            hs,
            end,
            kv_row,
            ..
        } = unit;
        let (half, tiles) = (d / 2, d / 16);
        let chunks = (end - tile.first).div_ceil(16);
        let step = heads_per_pass(tiles).min(g);
        let per_chunk = 16 * d;
        let copy = chunks * unit_kv * per_chunk;
        let qp = copy + 16 * kv_row;
        let sc = qp + rows * hs * half;
        let pr = sc + chunks * step * 16;
        let need = pr + chunks * step * 8;
        // every word is written before it is read: grow, never clear
        if scratch.floats.len() < need {
            scratch.floats.resize(need, 0.0);
        }
        Self {
            unit,
            buf: scratch.floats.as_mut_ptr(),
            unit_kv,
            half,
            tiles,
            chunks,
            step,
            per_chunk,
            copy,
            qp,
            sc,
            pr,
        }
    }

    /// Chunk `c`'s packed keys of the unit's kv head `k` (its values follow).
    #[inline]
    unsafe fn packed_at(&self, c: usize, k: usize) -> *mut f32 {
        self.buf.add((c * self.unit_kv + k) * self.per_chunk)
    }

    /// The rows' queries of the unit's heads, scaled, as bf16 pairs.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_queries(&self, tile: &TileQuery<'_>) {
        let Unit { d, rows, hs, .. } = self.unit;
        for i in 0..rows {
            let src = self.unit.query(tile, i);
            let dst = self.buf.add(self.qp + i * hs * self.half).cast::<u32>();
            let scale = _mm512_set1_ps(tile.scale);
            for c in (0..hs * d).step_by(32) {
                let lo = _mm512_mul_ps(_mm512_loadu_ps(src.add(c)), scale);
                let hi = _mm512_mul_ps(_mm512_loadu_ps(src.add(c + 16)), scale);
                let packed: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(dst.add(c / 2).cast(), packed);
            }
        }
    }

    /// The segment's keys and values, chunk by chunk, every kv head of the
    /// unit: keys transposed in pairs, values interleaved in position pairs.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn pack_segment<T: KvElem>(&self, tile: &TileQuery<'_>, k_cache: &[T], v_cache: &[T]) {
        let Unit {
            shape,
            d,
            end,
            kv_row,
            ..
        } = self.unit;
        let (buf, half, tiles) = (self.buf, self.half, self.tiles);
        // words 0..16 and 16..32 of a register interleaved (value pairs)
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
            4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for c in 0..self.chunks {
            let start = tile.first + 16 * c;
            let n = 16.min(end - start);
            self.unit.prefetch_ahead(tile, start, k_cache, v_cache);
            let (k_src, v_src, src_row) =
                if n == 16 && shape.block_size.is_multiple_of(16) && start.is_multiple_of(16) {
                    let at = self.unit.row(tile, start);
                    (
                        k_cache.as_ptr().add(at).cast::<u16>(),
                        v_cache.as_ptr().add(at).cast::<u16>(),
                        shape.num_kv_heads * d,
                    )
                } else {
                    let (kd, vd) = (
                        buf.add(self.copy).cast::<u16>(),
                        buf.add(self.copy + 8 * kv_row).cast::<u16>(),
                    );
                    for j in 0..16 {
                        if j < n {
                            let at = self.unit.row(tile, start + j);
                            let (k, v) = (k_cache.as_ptr().add(at), v_cache.as_ptr().add(at));
                            std::ptr::copy_nonoverlapping(k.cast(), kd.add(j * kv_row), kv_row);
                            std::ptr::copy_nonoverlapping(v.cast(), vd.add(j * kv_row), kv_row);
                        } else {
                            std::ptr::write_bytes(kd.add(j * kv_row), 0, kv_row);
                            std::ptr::write_bytes(vd.add(j * kv_row), 0, kv_row);
                        }
                    }
                    (kd.cast_const(), vd.cast_const(), kv_row)
                };
            for k in 0..self.unit_kv {
                let col = k * d;
                let (kt, vv) = (self.packed_at(c, k), self.packed_at(c, k).add(8 * d));
                for t in 0..half / 16 {
                    let src = k_src.add(col + 32 * t).cast::<f32>();
                    transpose16(src, src_row / 2, kt.add(t * 256));
                }
                for i in 0..8 {
                    for t in 0..tiles {
                        let at = |j: usize| v_src.add(j * src_row + col + t * 16);
                        let a = _mm256_loadu_si256(at(2 * i).cast());
                        let b = _mm256_loadu_si256(at(2 * i + 1).cast());
                        let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b);
                        let pairs = _mm512_permutexvar_epi16(interleave, both);
                        _mm512_storeu_si512(vv.add((i * tiles + t) * 16).cast(), pairs);
                    }
                }
            }
        }
    }

    /// Per kv head of the unit, row and pass of its query heads: the
    /// scores of the whole segment, one max, the weights (as bf16 pairs),
    /// and the weighted values summed in registers, to the row's part.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn attend_rows(&self, tile: &TileQuery<'_>, outs: &[*mut f32]) {
        let Unit {
            d,
            g,
            hs,
            first_head,
            ..
        } = self.unit;
        let (buf, half, step, sc, pr) = (self.buf, self.half, self.step, self.sc, self.pr);
        for k in 0..self.unit_kv {
            for (i, (&row_end, &row_out)) in tile.ends.iter().zip(outs).enumerate() {
                let n = row_end.saturating_sub(tile.first);
                let (ci, last) = (n.div_ceil(16), (n + 15) % 16 + 1);
                let mask_last = ((1u32 << last) - 1) as __mmask16;
                for h0 in (0..g).step_by(step) {
                    let m = step.min(g - h0);
                    // unit head of the pass's first head
                    let u0 = k * g + h0;
                    let q = buf.add(self.qp + (i * hs + u0) * half).cast::<u32>();
                    for c in 0..ci {
                        let (kt, out) = (self.packed_at(c, k), buf.add(sc + c * step * 16));
                        match m {
                            1 => scores_bf16::<1>(q, kt, half, out),
                            2 => scores_bf16::<2>(q, kt, half, out),
                            3 => scores_bf16::<3>(q, kt, half, out),
                            _ => scores_bf16::<4>(q, kt, half, out),
                        }
                    }
                    let mut outs_m = [std::ptr::null_mut(); 4];
                    for (mm, o) in outs_m.iter_mut().enumerate().take(m) {
                        let part = row_out.add((first_head + u0 + mm) * (d + 2));
                        *o = part.add(2);
                        let score = |c: usize| _mm512_loadu_ps(buf.add(sc + (c * step + mm) * 16));
                        let mask = |c: usize| if c + 1 == ci { mask_last } else { 0xFFFF };
                        let mut top = _mm512_set1_ps(f32::NEG_INFINITY);
                        for c in 0..ci {
                            top = _mm512_mask_max_ps(top, mask(c), top, score(c));
                        }
                        let max = _mm512_reduce_max_ps(top);
                        let mut sum = _mm512_setzero_ps();
                        for c in 0..ci {
                            let e = exp16(_mm512_sub_ps(score(c), _mm512_set1_ps(max)));
                            let p = _mm512_maskz_mov_ps(mask(c), e);
                            sum = _mm512_add_ps(sum, p);
                            weights_bf16(p, buf.add(pr + (c * step + mm) * 8).cast());
                        }
                        *part = max;
                        *part.add(1) = _mm512_reduce_add_ps(sum);
                    }
                    if ci == 0 {
                        // a row that does not reach the segment: nothing
                        for o in &outs_m[..m] {
                            std::ptr::write_bytes(*o, 0, d);
                        }
                        continue;
                    }
                    weigh_pairs_heads(
                        m,
                        self.tiles,
                        (buf.add(pr).cast(), step),
                        (
                            self.packed_at(0, k).add(8 * d),
                            self.unit_kv * self.per_chunk,
                        ),
                        (ci, last.div_ceil(2)),
                        outs_m,
                    );
                }
            }
        }
    }
}
