//! Activation rows quantized to signed 8 bits per block of 32, laid out
//! for the matrix kernels: [`QuantBatch`] owns them, [`QuantRaw`] lets the
//! decoder's threads fill disjoint rows.
//!
//! A row is quantized with a scale per block of 32 (llama.cpp's Q8_0) or,
//! as the input of k-quant matrices, with one scale per super-block of 256
//! (llama.cpp's Q8_K), whose blocks then all carry that scale, and whose
//! sums per 16 codes are kept as well: the AVX2 k-quant loops apply the
//! weights' integer sub-scales across a super-block in integers and scale
//! once per super-block.

use std::ops::Range;

use super::{BLOCK, SUPER_BLOCKS};

/// `x + ROUND - ROUND` rounds |x| < 2^22 to the nearest integer, ties to
/// even (1.5 * 2^23), in loops that vectorise.
const ROUND: f32 = 12_582_912.0;
/// Columns per super-block.
const SUPER: usize = BLOCK * SUPER_BLOCKS;
/// Sums of 16 codes per row and super-block.
pub(super) const SUMS: usize = SUPER / 16;

/// Activation rows per chunk of a [`QuantBatch`]: the rows one pass of the
/// kernel over a group's blocks takes (their accumulators and the 8
/// unpacked weight registers stay in the 32 zmm registers).
pub const BATCH: usize = 8;

/// Activation rows quantized per block of 32 (`x = d * q`), laid out for
/// [`gemm`]: per chunk of [`BATCH`] rows and block, the rows' 32 codes side
/// by side; per chunk and block the rows' scales `d`, and `d * Σ q` (which
/// multiplies the weight offsets). The width is the caller's at each use
/// (up to the reserved one): rows are read at the width they were written.
/// Rows quantized per super-block also have, per chunk and super-block, the
/// rows' [`SUMS`] sums of 16 codes side by side (i16).
#[derive(Debug, Clone, Default)]
pub struct QuantBatch {
    rows: usize,
    /// blocks per row reserved
    pub(super) blocks: usize,
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) dsum: Vec<f32>,
    sums: Vec<i16>,
    /// Per row, whether it was last quantized per super-block.
    supers: Vec<bool>,
}

impl QuantBatch {
    /// Room for `rows` rows of up to `max_cols` columns.
    pub fn reserve(&mut self, rows: usize, max_cols: usize) {
        self.rows = rows;
        self.blocks = max_cols.div_ceil(BLOCK);
        let chunk_blocks = rows.div_ceil(BATCH) * self.blocks;
        self.q.resize(chunk_blocks * BATCH * BLOCK, 0);
        self.d.resize(chunk_blocks * BATCH, 0.0);
        self.dsum.resize(chunk_blocks * BATCH, 0.0);
        let chunk_supers = rows.div_ceil(BATCH) * max_cols.div_ceil(SUPER);
        self.sums.resize(chunk_supers * BATCH * SUMS, 0);
        self.supers.resize(rows.div_ceil(BATCH) * BATCH, false);
    }

    /// `xs` quantized, each zero-padded to `cols` (a multiple of [`BLOCK`]).
    pub fn of_rows<X: AsRef<[f32]>>(xs: &[X], cols: usize) -> Self {
        Self::of_rows_as(xs, cols, false)
    }

    /// [`QuantBatch::of_rows`], per super-block where `per_super` (`cols` a
    /// multiple of 256).
    pub fn of_rows_as<X: AsRef<[f32]>>(xs: &[X], cols: usize, per_super: bool) -> Self {
        let mut batch = QuantBatch::default();
        batch.reserve(xs.len(), cols);
        let raw = batch.raw();
        for (r, x) in xs.iter().enumerate() {
            // SAFETY: `raw` is this batch's, used by this thread alone.
            unsafe { raw.quantize_as(r, x.as_ref(), cols, per_super) };
        }
        batch
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The batch as raw parts, for threads that quantize disjoint rows (see
    /// [`QuantRaw::quantize`]) and then read them in [`gemm_into`].
    pub fn raw(&mut self) -> QuantRaw {
        QuantRaw {
            q: self.q.as_mut_ptr(),
            d: self.d.as_mut_ptr(),
            dsum: self.dsum.as_mut_ptr(),
            sums: self.sums.as_mut_ptr(),
            supers: self.supers.as_mut_ptr(),
            rows: self.rows,
            blocks: self.blocks,
        }
    }
}

/// A [`QuantBatch`]'s storage by pointer: valid while the batch lives and
/// is neither reserved again nor dropped.
#[derive(Debug, Clone, Copy)]
pub struct QuantRaw {
    q: *mut i8,
    d: *mut f32,
    dsum: *mut f32,
    sums: *mut i16,
    supers: *mut bool,
    pub(super) rows: usize,
    pub(super) blocks: usize,
}

// SAFETY: plain pointers into one batch; the unsafe methods state who may
// touch which rows when.
unsafe impl Send for QuantRaw {}
unsafe impl Sync for QuantRaw {}

/// Block `b` of `row` as all zeros.
///
/// # Safety
/// The block is valid for writes.
#[inline(always)]
unsafe fn zero_block(row: RowAt, b: usize) {
    std::ptr::write_bytes(row.q.add(b * ROW_Q_STEP), 0, BLOCK);
    *row.d.add(b * BATCH) = 0.0;
    *row.dsum.add(b * BATCH) = 0.0;
}

/// Where one row's blocks are: block `b`'s 32 codes at `q + b * BATCH * 32`,
/// its scale and `d Σ q` at `d + b * BATCH`, `dsum + b * BATCH`; for a row
/// quantized per super-block, super-block `s`'s sums of 16 codes at
/// `sums + s * SUPER_STEP`.
#[derive(Clone, Copy)]
pub(super) struct RowAt {
    pub(super) q: *mut i8,
    pub(super) d: *mut f32,
    pub(super) dsum: *mut f32,
    pub(super) sums: *mut i16,
}

pub(super) const ROW_Q_STEP: usize = BATCH * BLOCK;
pub(super) const SUPER_STEP: usize = BATCH * SUMS;

impl QuantRaw {
    /// Row `r` at `cols` columns.
    #[inline]
    pub(super) fn row(&self, r: usize, cols: usize) -> RowAt {
        let nb = cols / BLOCK;
        let (chunk, j) = (r / BATCH, r % BATCH);
        let first = chunk * nb * BATCH + j;
        let sums = (chunk * (cols / SUPER) * BATCH + j) * SUMS;
        RowAt {
            q: self.q.wrapping_add(first * BLOCK),
            d: self.d.wrapping_add(first),
            dsum: self.dsum.wrapping_add(first),
            sums: self.sums.wrapping_add(sums),
        }
    }

    /// Whether rows `r` were all last quantized per super-block.
    ///
    /// # Safety
    /// The batch is alive and nothing writes those rows meanwhile.
    #[inline]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 kernels' dispatch
    pub(super) unsafe fn per_super(&self, r: Range<usize>) -> bool {
        r.into_iter().all(|i| *self.supers.add(i))
    }

    /// Whether any of rows `r` was last quantized per super-block.
    ///
    /// # Safety
    /// As [`QuantRaw::per_super`].
    #[inline]
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // read by the x86 kernels' dispatch
    pub(super) unsafe fn any_per_super(&self, r: Range<usize>) -> bool {
        r.into_iter().any(|i| *self.supers.add(i))
    }

    /// Quantize `x`, zero-padded to `cols` (a multiple of [`BLOCK`], at most
    /// the reserved width), into row `r`.
    ///
    /// # Safety
    /// The batch is alive and not reserved again; nothing else reads or
    /// writes row `r` meanwhile (rows share cache lines, not bytes).
    pub unsafe fn quantize(&self, r: usize, x: &[f32], cols: usize) {
        unsafe { self.quantize_as(r, x, cols, false) }
    }

    /// [`QuantRaw::quantize`], with a scale per super-block of 256 where
    /// `per_super` (then `cols` is a multiple of 256).
    ///
    /// # Safety
    /// As [`QuantRaw::quantize`].
    pub unsafe fn quantize_as(&self, r: usize, x: &[f32], cols: usize, per_super: bool) {
        assert!(r < self.rows && cols.is_multiple_of(BLOCK) && cols / BLOCK <= self.blocks);
        assert!(x.len() <= cols && (!per_super || cols.is_multiple_of(SUPER)));
        let row = self.row(r, cols);
        *self.supers.add(r) = per_super;
        if per_super {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above); `row` per the contract.
                unsafe { supers_avx2(row, x, cols) };
                return;
            }
            return quantize_supers(row, x, cols);
        }
        // blocks past x are zero
        for b in x.len().div_ceil(BLOCK)..cols / BLOCK {
            zero_block(row, b);
        }
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked just above); `row` per the contract.
                unsafe { quantize_avx512(row, x) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2 (checked just above); `row` per the contract.
                unsafe { quantize_avx2(row, x) };
                return;
            }
        }
        quantize_blocks(row, x)
    }
}

/// [`quantize_blocks`] compiled for AVX2: the same code, so the same codes.
///
/// # Safety
/// The CPU has AVX2; `row` as for [`quantize_blocks`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(row: RowAt, x: &[f32]) {
    quantize_blocks(row, x)
}

/// [`quantize_supers`] compiled for AVX2.
///
/// # Safety
/// The CPU has AVX2; `row` as for [`quantize_supers`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn supers_avx2(row: RowAt, x: &[f32], cols: usize) {
    quantize_supers(row, x, cols)
}

/// `x`, zero-padded to `cols` (whole super-blocks), with a scale per
/// super-block as llama.cpp's Q8_K sets it: the value of largest size maps
/// to -128, so codes run from -128 to 127 (127 at most where the other sign
/// would round to 128). Every block of a super-block gets its scale `d`, and
/// `d Σ q` of its own codes; the sums of 16 codes go to `row.sums`.
///
/// # Safety
/// `row`'s blocks and sums up to `cols` are valid for writes.
#[inline(always)]
unsafe fn quantize_supers(row: RowAt, x: &[f32], cols: usize) {
    let mut padded = [0f32; SUPER];
    for s in 0..cols / SUPER {
        let start = (s * SUPER).min(x.len());
        let part = &x[start..x.len().min(start + SUPER)];
        padded[..part.len()].copy_from_slice(part);
        padded[part.len()..].fill(0.0);
        let max = padded
            .iter()
            .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
        let (d, inv) = if max == 0.0 {
            (0.0, 0.0)
        } else {
            (max / -128.0, -128.0 / max)
        };
        let sums = std::slice::from_raw_parts_mut(row.sums.add(s * SUPER_STEP), SUMS);
        for (b, block) in padded.chunks_exact(BLOCK).enumerate() {
            let blk = s * SUPER_BLOCKS + b;
            let codes = std::slice::from_raw_parts_mut(row.q.add(blk * ROW_Q_STEP), BLOCK);
            for (c, &v) in codes.iter_mut().zip(block) {
                *c = (((v * inv + ROUND) - ROUND) as i32).min(127) as i8;
            }
            let (lo, hi) = codes.split_at(16);
            sums[2 * b] = lo.iter().map(|&c| c as i16).sum();
            sums[2 * b + 1] = hi.iter().map(|&c| c as i16).sum();
            *row.d.add(blk * BATCH) = d;
            *row.dsum.add(blk * BATCH) = d * (sums[2 * b] + sums[2 * b + 1]) as f32;
        }
    }
}

/// `quantize_blocks` two registers per block: the same rounding (ties to
/// even), so the same codes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn quantize_avx512(row: RowAt, x: &[f32]) {
    use std::arch::x86_64::*;
    let whole = x.len() / BLOCK;
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    for b in 0..whole {
        let p = x.as_ptr().add(b * BLOCK);
        let (lo, hi) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
        let abs =
            |v: __m512| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), abs_mask));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs(lo), abs(hi)));
        if amax == 0.0 {
            zero_block(row, b);
            continue;
        }
        let inv = _mm512_set1_ps(127.0 / amax);
        const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let qlo = _mm512_cvtps_epi32(_mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(lo, inv)));
        let qhi = _mm512_cvtps_epi32(_mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(hi, inv)));
        let dst = row.q.add(b * ROW_Q_STEP);
        _mm_storeu_si128(dst.cast(), _mm512_cvtsepi32_epi8(qlo));
        _mm_storeu_si128(dst.add(16).cast(), _mm512_cvtsepi32_epi8(qhi));
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
        let d = amax / 127.0;
        *row.d.add(b * BATCH) = d;
        *row.dsum.add(b * BATCH) = d * sum as f32;
    }
    if whole * BLOCK < x.len() {
        // the last, partial block (x shorter than the padded width)
        let tail = RowAt {
            q: row.q.add(whole * ROW_Q_STEP),
            d: row.d.add(whole * BATCH),
            dsum: row.dsum.add(whole * BATCH),
            sums: row.sums,
        };
        quantize_blocks(tail, &x[whole * BLOCK..]);
    }
}

/// # Safety
/// `row`'s blocks up to `x`'s length are valid for writes.
#[inline(always)]
pub(super) unsafe fn quantize_blocks(row: RowAt, x: &[f32]) {
    for (b, block) in x.chunks(BLOCK).enumerate() {
        let codes = std::slice::from_raw_parts_mut(row.q.add(b * ROW_Q_STEP), BLOCK);
        // a partial last block: zeros past x
        codes[block.len()..].fill(0);
        let amax = block.iter().fold(0f32, |a, &v| a.max(v.abs()));
        if amax == 0.0 {
            zero_block(row, b);
            continue;
        }
        let d = amax / 127.0;
        let inv = 127.0 / amax;
        let mut sum = 0i32;
        for (c, &v) in codes.iter_mut().zip(block) {
            let q = ((v * inv + ROUND) - ROUND) as i32;
            *c = q as i8;
            sum += q;
        }
        *row.d.add(b * BATCH) = d;
        *row.dsum.add(b * BATCH) = d * sum as f32;
    }
}
