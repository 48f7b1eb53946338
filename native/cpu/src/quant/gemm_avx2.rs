//! The integer matrix product for CPUs with AVX2 but without AVX-512 VNNI:
//! the same grouped layout and the same sums as the VNNI kernel, with
//! `vpmaddubsw` + `vpmaddwd` in place of `vpdpbusd`, over half a group
//! (8 rows, one f32 register of lanes) at a time.
//!
//! `vpmaddubsw` adds two unsigned x signed byte products into a saturating
//! i16. 4-bit codes (at most 15) against activation codes (at most 128 in
//! size) stay below 2^15 even summed over a whole block, so a 4-bit block
//! is 8 of them into one i16 accumulator and one widening `vpmaddwd`. An
//! 8-bit code `u` could saturate, so it is taken as `s = u - 128` (signed,
//! |s| <= 128) through the sign trick (`|s|` times `x` with `s`'s sign), and
//! `Σ u x = Σ s x + 128 Σ x` moves into the offset: the block adds
//! `d dx Σ s x + (m + 128 d) dx Σ x`, and as `m = -128 d` for Q8 the
//! offset term drops. [`QuantKind::Q5`] codes (at most 31) are summed as
//! 4-bit ones, in two i16 accumulators of 4 registers each.
//! [`QuantKind::Q6`] codes, unpacked and less 32, are signed and have a
//! scale per half block: two sums, no offset. (The sign trick needs
//! activation codes above -128, which rows quantized per block have.)
//!
//! Rows quantized per super-block of 256 (llama.cpp's Q8_K) meet the kinds
//! with integer scales ([`QuantKind::Q4K`], [`QuantKind::Q6`]) in
//! [`half_super`], as llama.cpp's k-quant dot products do: a block's i16
//! sums go through `vpmaddwd` against the lanes' integer scales, i32 sums
//! add up over the super-block, and the float work (the scale, the offsets
//! from the rows' sums of 16 codes) is once per super-block. Q6 codes stay
//! unsigned there (their -32 goes into the offsets), so no sign trick.
//! On a 1B model's shapes this ran Q4K 27% and Q6 61% faster than per block
//! (`kquant_prefill_speed`, one thread).
//!
//! The loops are compiled once per kind ([`Codes`]), so that a block's
//! unpacking and sums have no branch on the kind.

use std::arch::x86_64::*;
use std::ops::Range;

use super::activations::{RowAt, SUMS, SUPER_STEP};
use super::{Part, QuantKind, QuantRaw, BATCH, BLOCK, GROUP_ROWS, SUPER_BLOCKS};

/// Rows of a half group: the 8 f32 lanes of a ymm register.
const HALF: usize = GROUP_ROWS / 2;
/// Blocks ahead whose codes a pass asks the cache for: a batch-1 pass is
/// bound by how much memory is in flight, and 4 ahead ran a 1B model's
/// decode 5% faster than the hardware prefetcher alone (2, 6, 8 and 16
/// less so).
const AHEAD: usize = 4;

/// A [`QuantKind`] as a type, to compile the kernel's loops once per kind.
trait Codes {
    const KIND: QuantKind;
    /// Whether rows quantized per super-block take [`half_super`]: the
    /// kinds with integer scales per super-block.
    const SUPERS: bool = matches!(Self::KIND, QuantKind::Q4K | QuantKind::Q6);
}

struct Q4;
struct Q4K;
struct Q5;
struct Q8;
struct Q6;

impl Codes for Q4 {
    const KIND: QuantKind = QuantKind::Q4;
}
impl Codes for Q4K {
    const KIND: QuantKind = QuantKind::Q4K;
}
impl Codes for Q5 {
    const KIND: QuantKind = QuantKind::Q5;
}
impl Codes for Q8 {
    const KIND: QuantKind = QuantKind::Q8;
}
impl Codes for Q6 {
    const KIND: QuantKind = QuantKind::Q6;
}

/// See [`super::gemm::gemm_into`]; the CPU has AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn gemm(
    w: &Part,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    if rows.is_empty() {
        return;
    }
    match w.kind {
        QuantKind::Q4 => gemm_of::<Q4>(w, xs, n, rows, out, stride),
        QuantKind::Q4K => gemm_of::<Q4K>(w, xs, n, rows, out, stride),
        QuantKind::Q5 => gemm_of::<Q5>(w, xs, n, rows, out, stride),
        QuantKind::Q8 => gemm_of::<Q8>(w, xs, n, rows, out, stride),
        QuantKind::Q6 => gemm_of::<Q6>(w, xs, n, rows, out, stride),
    }
}

/// [`gemm`] for a part of kind `K` (a symbol of its own per kind in profiles).
///
/// All [`BATCH`] rows of a chunk go through one pass over a half group,
/// though their accumulators do not all fit the 16 ymm registers: passes of
/// 4 rows kept them in registers but unpacked each block twice, and ran a
/// 1B model's prefill 7% slower; passes of 16 rows (two chunks) unpacked
/// half as often and were 7% slower too.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_of<K: Codes>(
    w: &Part,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    for h in rows.start / HALF..rows.end.div_ceil(HALF) {
        // rows of this half group inside `rows`, as lanes [lo, hi)
        let first = h * HALF;
        let lo = rows.start.max(first) - first;
        let hi = rows.end.min(first + HALF) - first;
        // output column of lane 0 (may be "negative" for a first partial half: only lanes lo..hi are stored)
        let col0 = (first as isize) - (rows.start as isize);
        for c in 0..n.div_ceil(BATCH) {
            let out = out.wrapping_offset((c * BATCH * stride) as isize + col0);
            let chunk = xs.row(c * BATCH, w.cols);
            let (lanes, m) = ((lo, hi), BATCH.min(n - c * BATCH));
            if K::SUPERS && xs.per_super(c * BATCH..c * BATCH + m) {
                by_rows!(m, half_super::<K>(w, h, chunk, out, stride, lanes));
            } else {
                by_rows!(m, half::<K>(w, h, chunk, out, stride, lanes));
            }
        }
    }
}

/// Half group `h` (rows 8h..8h + 8) against N activation rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half<const N: usize, K: Codes>(
    w: &Part,
    h: usize,
    xs: RowAt,
    out: *mut f32,
    stride: usize,
    (lo, hi): (usize, usize),
) {
    let (nb, bytes) = (w.blocks_per_row(), K::KIND.block_bytes());
    let (codes, factors) = half_at::<K>(w, h);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut regs = [_mm256_setzero_si256(); 8];
    for blk in 0..nb {
        let p = codes.add(blk * bytes);
        fetch_ahead(p, bytes);
        let (dw, mw) = factors.at::<K>(blk);
        load_regs(K::KIND, p, &mut regs);
        if K::KIND == QuantKind::Q6 {
            // codes standing for q - 32, as signed bytes
            for r in regs.iter_mut() {
                *r = _mm256_sub_epi8(*r, _mm256_set1_epi8(32));
            }
        }
        let xq = xs.q.add(blk * BATCH * BLOCK).cast::<i32>();
        let (xd, xdsum) = (xs.d.add(blk * BATCH), xs.dsum.add(blk * BATCH));
        for (j, a) in acc.iter_mut().enumerate() {
            let row = xq.add(j * BLOCK / 4);
            let x = (_mm256_set1_ps(*xd.add(j)), _mm256_set1_ps(*xdsum.add(j)));
            *a = block_into::<K>(&regs, row, ones, (dw, mw), x, *a);
        }
    }
    for (b, a) in acc.iter().enumerate() {
        store_lanes(*a, out.add(b * stride), lo, hi);
    }
}

/// [`half`] for rows quantized per super-block, and kinds with integer
/// scales per block ([`Codes::SUPERS`]): within a super-block, each block's
/// products are scaled by its integer scales in integers (`vpmaddwd` against
/// them in place of ones), so the float work is once per super-block: the
/// scale `d dx`, and the offsets from the rows' sums of 16 codes (Q4K's
/// minimums times `-dmin dx`; Q6's `-32` codes).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_super<const N: usize, K: Codes>(
    w: &Part,
    h: usize,
    xs: RowAt,
    out: *mut f32,
    stride: usize,
    (lo, hi): (usize, usize),
) {
    let (nb, bytes) = (w.blocks_per_row(), K::KIND.block_bytes());
    let (codes, factors) = half_at::<K>(w, h);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut regs = [_mm256_setzero_si256(); 8];
    for sb in 0..nb / SUPER_BLOCKS {
        let mut isum = [_mm256_setzero_si256(); N];
        for blk in sb * SUPER_BLOCKS..(sb + 1) * SUPER_BLOCKS {
            let p = codes.add(blk * bytes);
            fetch_ahead(p, bytes);
            load_regs(K::KIND, p, &mut regs);
            let scales = factors.block_pairs::<K>(blk);
            let xq = xs.q.add(blk * BATCH * BLOCK).cast::<i32>();
            for (j, s) in isum.iter_mut().enumerate() {
                let row = xq.add(j * BLOCK / 4);
                *s = _mm256_add_epi32(*s, scaled_sum::<K>(&regs, row, scales));
            }
        }
        let offsets: [__m256i; SUPER_BLOCKS] =
            std::array::from_fn(|b| factors.offset_pairs::<K>(sb * SUPER_BLOCKS + b));
        let (dw, mw) = factors.of_super::<K>(sb);
        for (j, (a, &s)) in acc.iter_mut().zip(isum.iter()).enumerate() {
            let dx = _mm256_set1_ps(*xs.d.add(sb * SUPER_BLOCKS * BATCH + j));
            let off = offset_sum(&offsets, xs.sums.add(sb * SUPER_STEP + j * SUMS));
            *a = if K::KIND == QuantKind::Q6 {
                let s = _mm256_sub_epi32(s, _mm256_slli_epi32::<5>(off));
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, dx), *a)
            } else {
                let a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, dx), *a);
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(off), _mm256_mul_ps(mw, dx), a)
            };
        }
    }
    for (b, a) in acc.iter().enumerate() {
        store_lanes(*a, out.add(b * stride), lo, hi);
    }
}

/// Half group `h`'s codes (its 32 bytes of each 64-byte register of the
/// group's layout, from block 0) and factors.
#[inline]
unsafe fn half_at<K: Codes>(w: &Part, h: usize) -> (*const u8, Factors) {
    let group = (h / 2) * w.blocks_per_row() * K::KIND.block_bytes();
    (
        w.q.as_ptr().add(group + (h % 2) * 32),
        Factors::of_half(w, h),
    )
}

/// Asks the cache for the codes [`AHEAD`] blocks of `bytes` past `p`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn fetch_ahead(p: *const u8, bytes: usize) {
    let ahead = p.wrapping_add(AHEAD * bytes);
    for line in 0..bytes / 64 {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line * 64).cast());
    }
}

/// One block's codes (Q4K: unsigned 4-bit; Q6: unsigned 6-bit) times an
/// activation row's codes at `x`, per lane, each product times its integer
/// scale: `scales` holds each lane's scale twice as i16, the block's (Q4K)
/// or its first half block's and then its second's (Q6). The i16 sums stay
/// below 2^15: 8 products of 4-bit codes, or 2 of 6-bit ones (4 x 63 x 127).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn scaled_sum<K: Codes>(
    regs: &[__m256i; 8],
    x: *const i32,
    scales: (__m256i, __m256i),
) -> __m256i {
    let product =
        |k: usize| _mm256_maddubs_epi16(regs[k], _mm256_set1_epi32(x.add(k).read_unaligned()));
    if K::KIND == QuantKind::Q6 {
        let pair = |k: usize, s: __m256i| {
            _mm256_madd_epi16(_mm256_add_epi16(product(k), product(k + 1)), s)
        };
        let first = _mm256_add_epi32(pair(0, scales.0), pair(2, scales.0));
        _mm256_add_epi32(
            first,
            _mm256_add_epi32(pair(4, scales.1), pair(6, scales.1)),
        )
    } else {
        let mut s16 = product(0);
        for k in 1..8 {
            s16 = _mm256_add_epi16(s16, product(k));
        }
        _mm256_madd_epi16(s16, scales.0)
    }
}

/// Per lane, Σ over a super-block's blocks `b` of `offsets[b]` (two i16 per
/// lane) times a row's sums of 16 codes `2b` and `2b + 1` at `sums`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn offset_sum(offsets: &[__m256i; SUPER_BLOCKS], sums: *const i16) -> __m256i {
    let mut acc = _mm256_setzero_si256();
    for (b, o) in offsets.iter().enumerate() {
        let pair = sums.add(2 * b).cast::<i32>().read_unaligned();
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(*o, _mm256_set1_epi32(pair)));
    }
    acc
}

/// 8 lanes' signed bytes at `p`, as i32.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn lanes_i32(p: *const i8) -> __m256i {
    _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))
}

/// Per 32-bit lane, `lo`'s low i16 then `hi`'s.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pair16(lo: __m256i, hi: __m256i) -> __m256i {
    _mm256_blend_epi16::<0b1010_1010>(lo, _mm256_slli_epi32::<16>(hi))
}

/// Where a half group's per-block factors are: Q4/Q5/Q8 `d` and `m` per
/// block; Q6/Q4K `d` (and Q4K's `-dmin`) per super-block and integer scales
/// per block. Pointers past a vector the kind leaves empty are never read.
struct Factors {
    scales: *const u16,
    offsets: *const u16,
    supers_d: *const u16,
    supers_m: *const u16,
    subs: *const i8,
}

impl Factors {
    fn of_half(w: &Part, h: usize) -> Self {
        let (g, lane0) = (h / 2, (h % 2) * HALF);
        let nb = w.blocks_per_row();
        let super_at = g * (nb / SUPER_BLOCKS) * GROUP_ROWS + lane0;
        Self {
            scales: w.d.as_ptr().wrapping_add(g * nb * GROUP_ROWS + lane0),
            offsets: w.m.as_ptr().wrapping_add(g * nb * GROUP_ROWS + lane0),
            supers_d: w.d.as_ptr().wrapping_add(super_at),
            supers_m: w.m.as_ptr().wrapping_add(super_at),
            subs: w.sub.as_ptr().wrapping_add(g * nb * GROUP_ROWS * 2 + lane0),
        }
    }

    /// Block `blk`'s integer scales for [`scaled_sum`]: Q4K's scale twice
    /// (and nothing); Q6's first half block's twice, then its second's.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block_pairs<K: Codes>(&self, blk: usize) -> (__m256i, __m256i) {
        let first = lanes_i32(self.subs.add(blk * 2 * GROUP_ROWS));
        if K::KIND == QuantKind::Q6 {
            let second = lanes_i32(self.subs.add(blk * 2 * GROUP_ROWS + GROUP_ROWS));
            (pair16(first, first), pair16(second, second))
        } else {
            (pair16(first, first), _mm256_setzero_si256())
        }
    }

    /// Block `blk`'s integer factors of its rows' offsets for [`offset_sum`],
    /// per its two sums of 16 codes: Q4K's minimum twice; Q6's two half
    /// block scales (each times -32 later).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn offset_pairs<K: Codes>(&self, blk: usize) -> __m256i {
        let first = lanes_i32(self.subs.add(blk * 2 * GROUP_ROWS));
        let second = lanes_i32(self.subs.add(blk * 2 * GROUP_ROWS + GROUP_ROWS));
        match K::KIND {
            QuantKind::Q6 => pair16(first, second),
            _ => pair16(second, second),
        }
    }

    /// Super-block `sb`'s f16 factors: `d` and (Q4K) `-dmin`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn of_super<K: Codes>(&self, sb: usize) -> (__m256, __m256) {
        let d = f16s(self.supers_d.add(sb * GROUP_ROWS));
        match K::KIND {
            QuantKind::Q4K => (d, f16s(self.supers_m.add(sb * GROUP_ROWS))),
            _ => (d, _mm256_setzero_ps()),
        }
    }

    /// Block `blk`'s (dw, mw): its scales, and its offsets (Q4/Q4K/Q5), none
    /// (Q8) or its second half block's scales (Q6).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn at<K: Codes>(&self, blk: usize) -> (__m256, __m256) {
        let sb = blk / SUPER_BLOCKS * GROUP_ROWS;
        let subs = self.subs.add(blk * 2 * GROUP_ROWS);
        match K::KIND {
            QuantKind::Q6 => super_scales(self.supers_d.add(sb), self.supers_d.add(sb), subs),
            QuantKind::Q4K => super_scales(self.supers_d.add(sb), self.supers_m.add(sb), subs),
            QuantKind::Q8 => (f16s(self.scales.add(blk * GROUP_ROWS)), _mm256_setzero_ps()),
            _ => (
                f16s(self.scales.add(blk * GROUP_ROWS)),
                f16s(self.offsets.add(blk * GROUP_ROWS)),
            ),
        }
    }
}

/// `a` plus one block of 8 rows against one activation row: its codes at
/// `row`, its `(dx, dx Σ qx)` as `x`, the block's `(dw, mw)` as from
/// [`Factors::at`].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_into<K: Codes>(
    regs: &[__m256i; 8],
    row: *const i32,
    ones: __m256i,
    (dw, mw): (__m256, __m256),
    (dx, xdsum): (__m256, __m256),
    a: __m256,
) -> __m256 {
    match K::KIND {
        QuantKind::Q4 | QuantKind::Q4K | QuantKind::Q5 => {
            let isum = if K::KIND != QuantKind::Q5 {
                unsigned_sum(regs, row, ones)
            } else {
                _mm256_add_epi32(
                    unsigned_sum(&regs[..4], row, ones),
                    unsigned_sum(&regs[4..], row.add(4), ones),
                )
            };
            let a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx), a);
            _mm256_fmadd_ps(mw, xdsum, a)
        }
        QuantKind::Q8 => {
            // Σ u x d dx - 128 d dx Σ x = d dx Σ s x: the offset term drops
            let isum = _mm256_add_epi32(
                signed_from(&regs[..4], row, ones),
                signed_from(&regs[4..], row.add(4), ones),
            );
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, dx), a)
        }
        QuantKind::Q6 => {
            let first = signed_from(&regs[..4], row, ones);
            let second = signed_from(&regs[4..], row.add(4), ones);
            let a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first), _mm256_mul_ps(dw, dx), a);
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(second), _mm256_mul_ps(mw, dx), a)
        }
    }
}

/// 8 f16 values at `p` as f32.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16s(p: *const u16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

/// A block's two factors for 8 rows from its integer scales at `subs`
/// (the first, then the second [`GROUP_ROWS`] on) times their super-block's
/// f16s at `first` and `second`: Q6's half-block scales (both times `d`),
/// Q4K's scale and offset (times `d` and `-dmin`).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn super_scales(first: *const u16, second: *const u16, subs: *const i8) -> (__m256, __m256) {
    let (a, b) = (lanes_i32(subs), lanes_i32(subs.add(GROUP_ROWS)));
    (
        _mm256_mul_ps(f16s(first), _mm256_cvtepi32_ps(a)),
        _mm256_mul_ps(f16s(second), _mm256_cvtepi32_ps(b)),
    )
}

/// The 8 registers of one block of codes at `p`: 4-bit codes unpacked from
/// their nibbles, 5-bit ones from their nibbles and fifth bits, 8-bit ones as
/// signed bytes (Q8: `u - 128`), 6-bit ones (unsigned) from their nibbles
/// and high bits.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_regs(kind: QuantKind, p: *const u8, regs: &mut [__m256i; 8]) {
    match kind {
        QuantKind::Q4 | QuantKind::Q4K => {
            let low = _mm256_set1_epi8(0x0F);
            for k in 0..4 {
                let v = _mm256_loadu_si256(p.add(k * 64).cast());
                regs[k] = _mm256_and_si256(v, low);
                regs[k + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            }
        }
        QuantKind::Q5 => {
            let (low, fifth) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x10));
            let plane = _mm256_loadu_si256(p.add(256).cast());
            for k in 0..4 {
                let v = _mm256_loadu_si256(p.add(k * 64).cast());
                // bit k (and bit k + 4) of each plane byte up to bit 4, masked per byte
                let (hi, hi4) = match k {
                    0 => (_mm256_slli_epi16::<4>(plane), plane),
                    1 => (_mm256_slli_epi16::<3>(plane), _mm256_srli_epi16::<1>(plane)),
                    2 => (_mm256_slli_epi16::<2>(plane), _mm256_srli_epi16::<2>(plane)),
                    _ => (_mm256_slli_epi16::<1>(plane), _mm256_srli_epi16::<3>(plane)),
                };
                regs[k] = _mm256_or_si256(_mm256_and_si256(v, low), _mm256_and_si256(hi, fifth));
                regs[k + 4] = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), low),
                    _mm256_and_si256(hi4, fifth),
                );
            }
        }
        QuantKind::Q8 => {
            let bias = _mm256_set1_epi8(-128);
            for (k, r) in regs.iter_mut().enumerate() {
                *r = _mm256_xor_si256(_mm256_loadu_si256(p.add(k * 64).cast()), bias);
            }
        }
        QuantKind::Q6 => {
            let (low, two) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
            let planes = [
                _mm256_loadu_si256(p.add(256).cast()),
                _mm256_loadu_si256(p.add(256 + 64).cast()),
            ];
            for k in 0..4 {
                let v = _mm256_loadu_si256(p.add(k * 64).cast());
                let nibbles = [
                    _mm256_and_si256(v, low),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v), low),
                ];
                for (half, nib) in nibbles.into_iter().enumerate() {
                    let reg = k + 4 * half;
                    let h = planes[reg / 4];
                    // bits 2 (reg % 4) of each byte up to bits 4..6, masked per byte
                    let hi = match reg % 4 {
                        0 => _mm256_slli_epi16::<4>(h),
                        1 => _mm256_slli_epi16::<2>(h),
                        2 => h,
                        _ => _mm256_srli_epi16::<2>(h),
                    };
                    regs[reg] = _mm256_or_si256(nib, _mm256_and_si256(hi, two));
                }
            }
        }
    }
}

/// Σ of unsigned codes times the activation bytes at `x` (4 per register),
/// per lane: 8 registers of 4-bit codes or 4 of 5-bit ones, whose i16 sums
/// cannot saturate (see the module's notes), so one widening at the end.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unsigned_sum(regs: &[__m256i], x: *const i32, ones: __m256i) -> __m256i {
    let mut s16 = _mm256_setzero_si256();
    for (k, r) in regs.iter().enumerate() {
        let xv = _mm256_set1_epi32(x.add(k).read_unaligned());
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(*r, xv));
    }
    _mm256_madd_epi16(s16, ones)
}

/// Lanes lo..hi of `a` to `out[lo..hi]`.
#[inline]
#[target_feature(enable = "avx")]
unsafe fn store_lanes(a: __m256, out: *mut f32, lo: usize, hi: usize) {
    if lo == 0 && hi == HALF {
        _mm256_storeu_ps(out, a);
        return;
    }
    let mut lanes = [0f32; HALF];
    _mm256_storeu_ps(lanes.as_mut_ptr(), a);
    for (i, &v) in lanes.iter().enumerate().take(hi).skip(lo) {
        *out.add(i) = v;
    }
}

/// Σ over `regs` (signed codes) of codes times the activation bytes at `x`
/// (4 per register), per lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn signed_from(regs: &[__m256i], x: *const i32, ones: __m256i) -> __m256i {
    let mut s32 = _mm256_setzero_si256();
    for (k, r) in regs.iter().enumerate() {
        let xv = _mm256_set1_epi32(x.add(k).read_unaligned());
        let p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(*r), _mm256_sign_epi8(xv, *r));
        s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p16, ones));
    }
    s32
}
