//! Block-quantized weight matrices and the integer matrix products of a
//! decode step on the CPU.
//!
//! Weights come in blocks of 32 along the input dimension, each with a
//! scale `d` and an offset `m`: `w = d * q + m`, `q` unsigned (4-bit for
//! GGUF Q4_0/Q4_1, 8-bit for Q8_0 stored as `q + 128` with `m = -128 d`).
//! Activations are quantized per block of 32 to signed 8-bit (`x = dx * qx`),
//! so a block's dot product is
//!
//! `d dx Σ q qx + m dx Σ qx`
//!
//! The integer sum is AVX-512 VNNI `vpdpbusd` (unsigned x signed bytes).
//!
//! Layout, repacked at load: rows in groups of 16 (the 16 f32 lanes of a
//! register), and per group and block, 8 registers of bytes where register
//! `k` holds, for each of the 16 rows, its 4 weights `4k..4k + 4` of the
//! block. One `vpdpbusd` against 4 activation bytes broadcast to every lane
//! then adds 4 products to each of 16 rows, so a block is 8 of them into
//! one integer accumulator per group, and the block's scales (16 rows' `d`
//! and `m`, f16) are one vector each: no horizontal sums, no per-block
//! shuffles. The 8 registers of a 4-bit block are stored as 4, register `k`
//! in the low nibbles and `k + 4` in the high ones. A batch of activation
//! rows reuses each unpacked block from registers.
//!
//! Activations are laid out for that loop ([`QuantBatch`]): rows in chunks
//! of [`BATCH`], and per chunk and block the chunk's rows' 32 codes side by
//! side, so a chunk is one run of memory read through one pointer.

use std::ops::Range;

use crate::error::QuantError;

/// Weights per quantization block.
pub const BLOCK: usize = 32;
/// Rows per group: one f32 register of lanes.
pub const GROUP_ROWS: usize = 16;
/// Bytes of 8-bit codes per group and block.
const BLOCK_BYTES_Q8: usize = GROUP_ROWS * BLOCK;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// 4-bit unsigned codes, two per byte.
    Q4,
    /// 8-bit codes stored unsigned (signed code + 128).
    Q8,
}

impl QuantKind {
    fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4 => BLOCK_BYTES_Q8 / 2,
            QuantKind::Q8 => BLOCK_BYTES_Q8,
        }
    }
}

/// A (rows, cols) weight matrix in blocks of 32.
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub kind: QuantKind,
    pub rows: usize,
    pub cols: usize,
    q: Vec<u8>,
    /// f16 bits, (groups, blocks, 16).
    d: Vec<u16>,
    /// f16 bits, (groups, blocks, 16).
    m: Vec<u16>,
}

impl QMatrix {
    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    /// Bytes read by one pass over the matrix (codes, scales, offsets).
    pub fn nbytes(&self) -> usize {
        self.q.len() + 2 * (self.d.len() + self.m.len())
    }

    /// From 4-bit codes `q` (rows, cols) in 0..16 and per-block scale and
    /// offset (rows, cols / 32): `w = scale * q + offset`.
    pub fn from_q4(
        q: &[u8],
        scale: &[f32],
        offset: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantError> {
        check_dims(q.len(), scale.len(), offset.len(), rows, cols)?;
        if let Some(bad) = q.iter().find(|&&c| c > 15) {
            return Err(QuantError::Shape(format!("4-bit code {bad} is over 15")));
        }
        Ok(Self::pack(QuantKind::Q4, q, scale, offset, rows, cols))
    }

    /// From signed 8-bit codes (rows, cols) and per-block scales: `w = scale * q`.
    pub fn from_q8(q: &[i8], scale: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        let offset: Vec<f32> = scale.iter().map(|&d| -128.0 * f16_round(d)).collect();
        check_dims(q.len(), scale.len(), offset.len(), rows, cols)?;
        let codes: Vec<u8> = q.iter().map(|&c| (c as u8) ^ 0x80).collect();
        Ok(Self::pack(
            QuantKind::Q8,
            &codes,
            scale,
            &offset,
            rows,
            cols,
        ))
    }

    /// Float weights (rows, cols) quantized to 8 bits per block of 32
    /// (scale = max |w| / 127, as GGUF's Q8_0).
    pub fn quantize_q8(w: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        if w.len() != rows * cols || !cols.is_multiple_of(BLOCK) {
            return Err(QuantError::Shape(format!(
                "{} values for ({rows}, {cols}); cols must be a multiple of {BLOCK}",
                w.len()
            )));
        }
        let mut q = vec![0i8; w.len()];
        let mut scale = vec![0f32; w.len() / BLOCK];
        for ((block, codes), d) in w
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .zip(&mut scale)
        {
            let amax = block.iter().fold(0f32, |a, &v| a.max(v.abs()));
            *d = f16_round(amax / 127.0);
            let inv = if *d > 0.0 { 1.0 / *d } else { 0.0 };
            for (c, &v) in codes.iter_mut().zip(block) {
                *c = (v * inv).round().clamp(-127.0, 127.0) as i8;
            }
        }
        Self::from_q8(&q, &scale, rows, cols)
    }

    /// Unsigned codes (rows, cols) into the grouped layout; rows past the
    /// last are zero with zero scales (their outputs are never stored).
    fn pack(
        kind: QuantKind,
        codes: &[u8],
        scale: &[f32],
        offset: &[f32],
        rows: usize,
        cols: usize,
    ) -> Self {
        let nb = cols / BLOCK;
        let groups = rows.div_ceil(GROUP_ROWS);
        let mut m = Self {
            kind,
            rows,
            cols,
            q: vec![0u8; groups * nb * kind.block_bytes()],
            d: vec![0u16; groups * nb * GROUP_ROWS],
            m: vec![0u16; groups * nb * GROUP_ROWS],
        };
        for r in 0..rows {
            for blk in 0..nb {
                let s = m.scale_index(r, blk);
                m.d[s] = f32_to_f16(scale[r * nb + blk]);
                m.m[s] = f32_to_f16(offset[r * nb + blk]);
                for k in 0..BLOCK {
                    let c = blk * BLOCK + k;
                    let (byte, high) = m.code_index(r, c);
                    let code = codes[r * cols + c];
                    m.q[byte] |= if high { code << 4 } else { code };
                }
            }
        }
        m
    }

    fn scale_index(&self, r: usize, blk: usize) -> usize {
        ((r / GROUP_ROWS) * self.blocks_per_row() + blk) * GROUP_ROWS + r % GROUP_ROWS
    }

    /// Byte holding weight (r, c), and whether it is the high nibble.
    fn code_index(&self, r: usize, c: usize) -> (usize, bool) {
        let (blk, k) = (c / BLOCK, c % BLOCK);
        let base = ((r / GROUP_ROWS) * self.blocks_per_row() + blk) * self.kind.block_bytes();
        let (reg, lane, byte) = (k / 4, r % GROUP_ROWS, k % 4);
        match self.kind {
            QuantKind::Q8 => (base + reg * 64 + lane * 4 + byte, false),
            QuantKind::Q4 => (base + (reg % 4) * 64 + lane * 4 + byte, reg >= 4),
        }
    }

    fn code(&self, r: usize, c: usize) -> u8 {
        let (byte, high) = self.code_index(r, c);
        match (self.kind, high) {
            (QuantKind::Q8, _) => self.q[byte],
            (QuantKind::Q4, false) => self.q[byte] & 0x0F,
            (QuantKind::Q4, true) => self.q[byte] >> 4,
        }
    }

    /// Row `r` as floats (tests and references).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        (0..self.cols)
            .map(|c| {
                let s = self.scale_index(r, c / BLOCK);
                f16_to_f32(self.d[s]) * self.code(r, c) as f32 + f16_to_f32(self.m[s])
            })
            .collect()
    }
}

fn check_dims(
    q: usize,
    scale: usize,
    offset: usize,
    rows: usize,
    cols: usize,
) -> Result<(), QuantError> {
    if cols == 0
        || !cols.is_multiple_of(BLOCK)
        || q != rows * cols
        || scale != rows * cols / BLOCK
        || offset != scale
    {
        return Err(QuantError::Shape(format!(
            "({rows}, {cols}) weights need cols a positive multiple of {BLOCK}, {} codes and {} scales and offsets; got {q}, {scale}, {offset}",
            rows * cols,
            rows * cols / BLOCK
        )));
    }
    Ok(())
}

/// Activation rows per chunk of a [`QuantBatch`]: the rows one pass of the
/// kernel over a group's blocks takes (their accumulators and the 8
/// unpacked weight registers stay in the 32 zmm registers).
pub const BATCH: usize = 8;

/// Activation rows quantized per block of 32 (`x = d * q`), laid out for
/// [`gemm`]: per chunk of [`BATCH`] rows and block, the rows' 32 codes side
/// by side; per chunk and block the rows' scales `d`, and `d * Σ q` (which
/// multiplies the weight offsets). The width is the caller's at each use
/// (up to the reserved one): rows are read at the width they were written.
#[derive(Debug, Clone, Default)]
pub struct QuantBatch {
    rows: usize,
    /// blocks per row reserved
    blocks: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    dsum: Vec<f32>,
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
    }

    /// `xs` quantized, each zero-padded to `cols` (a multiple of [`BLOCK`]).
    pub fn of_rows<X: AsRef<[f32]>>(xs: &[X], cols: usize) -> Self {
        let mut batch = QuantBatch::default();
        batch.reserve(xs.len(), cols);
        let raw = batch.raw();
        for (r, x) in xs.iter().enumerate() {
            // SAFETY: `raw` is this batch's, used by this thread alone.
            unsafe { raw.quantize(r, x.as_ref(), cols) };
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
    rows: usize,
    blocks: usize,
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
/// its scale and `d Σ q` at `d + b * BATCH`, `dsum + b * BATCH`.
#[derive(Clone, Copy)]
struct RowAt {
    q: *mut i8,
    d: *mut f32,
    dsum: *mut f32,
}

const ROW_Q_STEP: usize = BATCH * BLOCK;

impl QuantRaw {
    /// Row `r` at `cols` columns.
    fn row(&self, r: usize, cols: usize) -> RowAt {
        let nb = cols / BLOCK;
        let (chunk, j) = (r / BATCH, r % BATCH);
        let first = chunk * nb * BATCH + j;
        RowAt {
            q: self.q.wrapping_add(first * BLOCK),
            d: self.d.wrapping_add(first),
            dsum: self.dsum.wrapping_add(first),
        }
    }

    /// Quantize `x`, zero-padded to `cols` (a multiple of [`BLOCK`], at most
    /// the reserved width), into row `r`.
    ///
    /// # Safety
    /// The batch is alive and not reserved again; nothing else reads or
    /// writes row `r` meanwhile (rows share cache lines, not bytes).
    pub unsafe fn quantize(&self, r: usize, x: &[f32], cols: usize) {
        assert!(r < self.rows && cols.is_multiple_of(BLOCK) && cols / BLOCK <= self.blocks);
        assert!(x.len() <= cols);
        let row = self.row(r, cols);
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
        }
        quantize_blocks(row, x)
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
        };
        quantize_blocks(tail, &x[whole * BLOCK..]);
    }
}

/// # Safety
/// `row`'s blocks up to `x`'s length are valid for writes.
#[inline(always)]
unsafe fn quantize_blocks(row: RowAt, x: &[f32]) {
    // x + 1.5 * 2^23 - 1.5 * 2^23 rounds |x| < 2^22 to the nearest integer (ties to even)
    const ROUND: f32 = 12_582_912.0;
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

/// `out[b * out_stride + i]` = row `rows.start + i` of `w` · activation row
/// `b` of `xs` (quantized at `w.cols` columns), for every row in `rows` and
/// every activation row: each weight block is read from memory once for the
/// whole batch.
pub fn gemm(
    w: &QMatrix,
    xs: &mut QuantBatch,
    rows: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    let n = check_out(w, xs, &rows, out, out_stride);
    // SAFETY: `xs` is borrowed for the call; `out` holds every index written
    // (checked just above).
    unsafe { gemm_into(w, xs.raw(), n, rows, out.as_mut_ptr(), out_stride) }
}

/// The activation rows of `xs`, after checking that `out` holds every
/// product of them with `w`'s rows `rows`.
fn check_out(
    w: &QMatrix,
    xs: &QuantBatch,
    rows: &Range<usize>,
    out: &[f32],
    out_stride: usize,
) -> usize {
    assert!(rows.end <= w.rows && out_stride >= rows.len());
    let n = xs.rows();
    assert!(n == 0 || out.len() >= (n - 1) * out_stride + rows.len());
    n
}

/// [`gemm`] into raw memory, so threads can fill disjoint rows of one output.
/// Fastest when `rows` starts on a group of 16.
///
/// The activations are the first `n` rows of `xs`, quantized at `w.cols`.
///
/// # Safety
/// `xs`'s batch is alive, its first `n` rows quantized at `w.cols` columns
/// and not written meanwhile; `out` must be valid for writes at
/// `b * out_stride + i` for every activation row `b` and `i < rows.len()`,
/// and nothing else may access those elements meanwhile.
pub unsafe fn gemm_into(
    w: &QMatrix,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    out_stride: usize,
) {
    assert!(rows.end <= w.rows && n <= xs.rows);
    assert!(
        w.blocks_per_row() <= xs.blocks,
        "activations narrower than the matrix"
    );
    #[cfg(target_arch = "x86_64")]
    {
        if has_vnni() {
            // SAFETY: the CPU has AVX-512 F/BW/VNNI and F16C (checked by has_vnni); the rest per the contract.
            unsafe { avx512::gemm(w, xs, n, rows, out, out_stride) };
            return;
        }
    }
    // SAFETY: per the contract.
    unsafe { portable_into(w, xs, n, rows, out, out_stride) }
}

/// [`gemm_into`] in plain Rust.
///
/// # Safety
/// As [`gemm_into`].
unsafe fn portable_into(
    w: &QMatrix,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    out_stride: usize,
) {
    for b in 0..n {
        for (i, r) in rows.clone().enumerate() {
            // SAFETY: per the contract.
            unsafe { *out.add(b * out_stride + i) = dot_portable(w, xs.row(b, w.cols), r) };
        }
    }
}

/// Whether the AVX-512 VNNI kernel runs on this CPU.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The same sums as the vector kernel, in plain Rust.
pub fn gemm_portable(
    w: &QMatrix,
    xs: &mut QuantBatch,
    rows: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    let n = check_out(w, xs, &rows, out, out_stride);
    assert!(w.blocks_per_row() <= xs.blocks);
    // SAFETY: `xs` is borrowed for the call; `out` holds every index written
    // (checked just above).
    unsafe { portable_into(w, xs.raw(), n, rows, out.as_mut_ptr(), out_stride) }
}

/// # Safety
/// `x` is a live row quantized at `w.cols` columns.
unsafe fn dot_portable(w: &QMatrix, x: RowAt, r: usize) -> f32 {
    let mut acc = 0f32;
    for blk in 0..w.blocks_per_row() {
        let codes = x.q.add(blk * ROW_Q_STEP);
        let isum: i32 = (0..BLOCK)
            .map(|j| w.code(r, blk * BLOCK + j) as i32 * *codes.add(j) as i32)
            .sum();
        let s = w.scale_index(r, blk);
        let (d, m) = (f16_to_f32(w.d[s]), f16_to_f32(w.m[s]));
        acc += d * *x.d.add(blk * BATCH) * isum as f32 + m * *x.dsum.add(blk * BATCH);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{QMatrix, QuantKind, QuantRaw, BATCH, BLOCK, GROUP_ROWS};

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub(super) unsafe fn gemm(
        w: &QMatrix,
        xs: QuantRaw,
        n: usize,
        rows: Range<usize>,
        out: *mut f32,
        stride: usize,
    ) {
        if rows.is_empty() {
            return;
        }
        for g in rows.start / GROUP_ROWS..rows.end.div_ceil(GROUP_ROWS) {
            // rows of this group inside `rows`, as lanes [lo, hi)
            let first = g * GROUP_ROWS;
            let lo = rows.start.max(first) - first;
            let hi = rows.end.min(first + GROUP_ROWS) - first;
            let mask: __mmask16 = (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16;
            // output column of lane 0 (may be "negative" for a first partial group: only masked lanes are stored)
            let col0 = (first as isize) - (rows.start as isize);
            for c in 0..n.div_ceil(BATCH) {
                let out = out.wrapping_offset((c * BATCH * stride) as isize + col0);
                // the chunk's first row at the matrix's width
                let chunk = xs.row(c * BATCH, w.cols);
                match BATCH.min(n - c * BATCH) {
                    8 => group::<8>(w, g, chunk, out, stride, mask),
                    7 => group::<7>(w, g, chunk, out, stride, mask),
                    6 => group::<6>(w, g, chunk, out, stride, mask),
                    5 => group::<5>(w, g, chunk, out, stride, mask),
                    4 => group::<4>(w, g, chunk, out, stride, mask),
                    3 => group::<3>(w, g, chunk, out, stride, mask),
                    2 => group::<2>(w, g, chunk, out, stride, mask),
                    _ => group::<1>(w, g, chunk, out, stride, mask),
                }
            }
        }
    }

    /// One group of 16 weight rows against N activation rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn group<const N: usize>(
        w: &QMatrix,
        g: usize,
        xs: super::RowAt,
        out: *mut f32,
        stride: usize,
        mask: __mmask16,
    ) {
        let nb = w.blocks_per_row();
        let bytes = w.kind.block_bytes();
        let codes = w.q.as_ptr().add(g * nb * bytes);
        let scales = w.d.as_ptr().add(g * nb * GROUP_ROWS);
        let offsets = w.m.as_ptr().add(g * nb * GROUP_ROWS);
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); N];
        let mut regs = [_mm512_setzero_si512(); 8];
        for blk in 0..nb {
            let p = codes.add(blk * bytes);
            match w.kind {
                QuantKind::Q4 => {
                    for k in 0..4 {
                        let v = _mm512_loadu_si512(p.add(k * 64).cast());
                        regs[k] = _mm512_and_si512(v, low);
                        regs[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                    }
                }
                QuantKind::Q8 => {
                    for (k, r) in regs.iter_mut().enumerate() {
                        *r = _mm512_loadu_si512(p.add(k * 64).cast());
                    }
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(blk * GROUP_ROWS).cast()));
            let mw = _mm512_cvtph_ps(_mm256_loadu_si256(offsets.add(blk * GROUP_ROWS).cast()));
            // the chunk's rows of this block: codes side by side, then scales
            let xq = xs.q.add(blk * BATCH * BLOCK).cast::<i32>();
            let (xd, xdsum) = (xs.d.add(blk * BATCH), xs.dsum.add(blk * BATCH));
            for (j, a) in acc.iter_mut().enumerate() {
                let mut isum = _mm512_setzero_si512();
                for (k, r) in regs.iter().enumerate() {
                    let codes = xq.add(j * BLOCK / 4 + k).read_unaligned();
                    isum = _mm512_dpbusd_epi32(isum, *r, _mm512_set1_epi32(codes));
                }
                let s = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.add(j)));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, *a);
                *a = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xdsum.add(j)), *a);
            }
        }
        for (b, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(b * stride), mask, *a);
        }
    }
}

/// f32 to IEEE half bits, round to nearest even (scales only: no NaN payloads).
pub fn f32_to_f16(v: f32) -> u16 {
    let bits = v.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xFF) as i32;
    let mant = bits & 0x7F_FFFF;
    if exp == 0xFF {
        return sign | 0x7C00 | if mant != 0 { 0x200 } else { 0 };
    }
    let e = exp - 127 + 15;
    if e >= 0x1F {
        return sign | 0x7C00;
    }
    if e <= 0 {
        if e < -10 {
            return sign;
        }
        let m = mant | 0x80_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rest = m & ((1 << shift) - 1);
        let mut h = m >> shift;
        if rest > half || (rest == half && h & 1 == 1) {
            h += 1;
        }
        return sign | h as u16;
    }
    let mut h = ((e as u32) << 10) | (mant >> 13);
    let rest = mant & 0x1FFF;
    if rest > 0x1000 || (rest == 0x1000 && h & 1 == 1) {
        h += 1; // may carry into the exponent: still the right rounding
    }
    sign | h as u16
}

pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let mant = (h & 0x3FF) as u32;
    let bits = match exp {
        0 if mant == 0 => sign,
        0 => {
            // subnormal: normalise
            let shift = mant.leading_zeros() - 21;
            sign | ((113 - shift) << 23) | (((mant << shift) & 0x3FF) << 13)
        }
        0x1F => sign | 0x7F80_0000 | (mant << 13),
        _ => sign | ((exp + 112) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

fn f16_round(v: f32) -> f32 {
    f16_to_f32(f32_to_f16(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mistralrs_serve_core::rng::uniform;

    struct Rng(u64, u64);

    impl Rng {
        fn new(seed: u64) -> Self {
            Rng(seed, 0)
        }
        fn next_f32(&mut self) -> f32 {
            self.1 += 1;
            uniform(self.0, self.1) as f32
        }
        fn next_u64(&mut self) -> u64 {
            (self.next_f32() * 65536.0) as u64
        }
    }

    fn random(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * scale)
            .collect()
    }

    #[test]
    fn f16_round_trips() {
        for v in [0.0f32, 1.0, -2.5, 65504.0, 6.1e-5, 5.96e-8, 3.0e-6, 0.1] {
            let back = f16_to_f32(f32_to_f16(v));
            assert!((back - v).abs() <= v.abs() * 1e-3 + 6e-8, "{v} -> {back}");
        }
        for h in 0u16..0x7C00 {
            assert_eq!(f32_to_f16(f16_to_f32(h)), h);
        }
    }

    /// Random 4-bit codes (rows, cols) with per-block scales and offsets.
    fn q4_parts(rng: &mut Rng, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let q = (0..rows * cols)
            .map(|_| (rng.next_u64() % 16) as u8)
            .collect();
        let scale = random(rng, rows * cols / BLOCK, 0.05);
        let offset = random(rng, rows * cols / BLOCK, 0.4);
        (q, scale, offset)
    }

    fn exact_dot(w: &QMatrix, r: usize, x: &[f32]) -> f32 {
        w.dequantize_row(r).iter().zip(x).map(|(a, b)| a * b).sum()
    }

    fn check(w: &QMatrix, rng: &mut Rng) {
        let x = random(rng, w.cols, 3.0);
        let mut acts = QuantBatch::of_rows(std::slice::from_ref(&x), w.cols);
        let mut fast = vec![0f32; w.rows];
        let mut slow = vec![0f32; w.rows];
        gemm(w, &mut acts, 0..w.rows, &mut fast, w.rows);
        gemm_portable(w, &mut acts, 0..w.rows, &mut slow, w.rows);
        for r in 0..w.rows {
            let scale: f32 = w
                .dequantize_row(r)
                .iter()
                .zip(&x)
                .map(|(a, b)| (a * b).abs())
                .sum();
            assert!(
                (fast[r] - slow[r]).abs() <= 1e-4 * scale + 1e-5,
                "row {r}: {} vs {}",
                fast[r],
                slow[r]
            );
            // 8-bit activations: within 1% of the sum of |terms| of the exact product
            let exact = exact_dot(w, r, &x);
            assert!(
                (fast[r] - exact).abs() <= 0.01 * scale,
                "row {r}: {} vs exact {exact}",
                fast[r]
            );
        }
        // a sub-range writes the same values
        let mut part = vec![0f32; w.rows / 2];
        let n = part.len();
        gemm(w, &mut acts, w.rows / 4..w.rows / 4 + n, &mut part, n);
        assert_eq!(part, fast[w.rows / 4..][..n]);
    }

    #[test]
    fn q4_matches_dequantized_weights() {
        let mut rng = Rng::new(1);
        for (rows, cols) in [(8, 64), (5, 96), (16, 576), (3, 1536), (7, 32)] {
            let (q, scale, offset) = q4_parts(&mut rng, rows, cols);
            let w = QMatrix::from_q4(&q, &scale, &offset, rows, cols).unwrap();
            for r in 0..rows {
                let row = w.dequantize_row(r);
                for c in 0..cols {
                    let b = (r * cols + c) / BLOCK;
                    let want = f16_round(scale[b]) * q[r * cols + c] as f32 + f16_round(offset[b]);
                    assert!((row[c] - want).abs() < 1e-6);
                }
            }
            check(&w, &mut rng);
        }
    }

    #[test]
    fn q8_matches_dequantized_weights() {
        let mut rng = Rng::new(2);
        for (rows, cols) in [(4, 64), (9, 160), (2, 576)] {
            let w_f = random(&mut rng, rows * cols, 0.7);
            let w = QMatrix::quantize_q8(&w_f, rows, cols).unwrap();
            for r in 0..rows {
                for (a, b) in w.dequantize_row(r).iter().zip(&w_f[r * cols..][..cols]) {
                    assert!((a - b).abs() <= 0.7 / 127.0, "{a} vs {b}");
                }
            }
            check(&w, &mut rng);
        }
    }

    #[test]
    fn q8_codes_are_exact() {
        let q: Vec<i8> = (0..64).map(|i| (i * 4 - 128) as i8).collect();
        let w = QMatrix::from_q8(&q, &[0.5, 0.25], 1, 64).unwrap();
        let row = w.dequantize_row(0);
        for c in 0..64 {
            let d = if c < 32 { 0.5 } else { 0.25 };
            assert_eq!(row[c], d * q[c] as f32);
        }
    }

    #[test]
    fn batched_rows_match_one_at_a_time() {
        let mut rng = Rng::new(3);
        let (rows, cols) = (11, 192);
        let (q, scale, offset) = q4_parts(&mut rng, rows, cols);
        let w = QMatrix::from_q4(&q, &scale, &offset, rows, cols).unwrap();
        for batch in [1, 2, 3, 4, 5, 9, 33] {
            let xs: Vec<Vec<f32>> = (0..batch).map(|_| random(&mut rng, cols, 2.0)).collect();
            let mut acts = QuantBatch::of_rows(&xs, w.cols);
            let stride = rows + 3;
            let mut all = vec![0f32; batch * stride];
            gemm(&w, &mut acts, 0..rows, &mut all, stride);
            let mut slow = vec![0f32; batch * stride];
            gemm_portable(&w, &mut acts, 0..rows, &mut slow, stride);
            // a batch reserved wider (as a step's, shared by matrices of
            // several widths), its rows quantized in reverse order
            let mut wide = QuantBatch::default();
            wide.reserve(batch, 3 * w.cols);
            let raw = wide.raw();
            for (r, x) in xs.iter().enumerate().rev() {
                // SAFETY: this thread alone uses `wide`.
                unsafe { raw.quantize(r, x, w.cols) };
            }
            let mut from_wide = vec![0f32; batch * stride];
            gemm(&w, &mut wide, 0..rows, &mut from_wide, stride);
            assert_eq!(from_wide, all, "batch {batch}");
            for (b, x) in xs.iter().enumerate() {
                let mut one = vec![0f32; rows];
                let mut alone = QuantBatch::of_rows(std::slice::from_ref(x), w.cols);
                gemm(&w, &mut alone, 0..rows, &mut one, rows);
                assert_eq!(one, all[b * stride..][..rows], "batch {batch} row {b}");
                for (f, s) in one.iter().zip(&slow[b * stride..][..rows]) {
                    assert!((f - s).abs() <= 1e-4 * s.abs().max(1.0));
                }
            }
        }
    }

    #[test]
    fn vector_quantization_matches_the_loops() {
        let mut rng = Rng::new(5);
        for len in [32, 64, 96, 100, 576] {
            let mut x = random(&mut rng, len, 4.0);
            x[0] = 0.5 * 127.0 / 127.0; // a tie after scaling is possible; rounding is to even in both
            let padded = len.next_multiple_of(BLOCK);
            let fast = QuantBatch::of_rows(std::slice::from_ref(&x), padded);
            let mut slow = QuantBatch::default();
            slow.reserve(1, padded);
            // SAFETY: a fresh batch (zeros) of this width, used here alone.
            unsafe { quantize_blocks(slow.raw().row(0, padded), &x) };
            assert_eq!(fast.q, slow.q, "len {len}");
            assert_eq!(fast.d, slow.d);
            assert_eq!(fast.dsum, slow.dsum);
            // a row written again, shorter and with a zero block, over
            // what was there: as if fresh
            let mut reused = QuantBatch::of_rows(&[random(&mut rng, padded, 9.0)], padded);
            let mut short = x[..len - len / 3].to_vec();
            let zeros = BLOCK.min(short.len());
            short[..zeros].fill(0.0);
            // SAFETY: used here alone.
            unsafe { reused.raw().quantize(0, &short, padded) };
            let fresh = QuantBatch::of_rows(&[short], padded);
            assert_eq!(reused.q, fresh.q, "len {len}");
            assert_eq!(reused.d, fresh.d);
            assert_eq!(reused.dsum, fresh.dsum);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QMatrix::from_q4(&[0; 10], &[1.0], &[0.0], 1, 10).is_err());
        assert!(QMatrix::from_q4(&[0; 64], &[1.0], &[0.0], 1, 64).is_err());
        assert!(QMatrix::from_q4(&[], &[], &[], 1, 0).is_err());
        assert!(QMatrix::from_q4(&[16; 32], &[1.0], &[0.0], 1, 32).is_err());
        assert!(QMatrix::quantize_q8(&[0.0; 40], 1, 40).is_err());
    }

    #[test]
    fn zero_activations_give_offsets_only() {
        let w = QMatrix::from_q4(&[3; 64], &[1.0, 1.0], &[0.5, 0.5], 1, 64).unwrap();
        let mut acts = QuantBatch::of_rows(&[[0.0; 64]], 64);
        let mut out = [1.0f32];
        gemm(&w, &mut acts, 0..1, &mut out, 1);
        assert_eq!(out[0], 0.0);
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release -- --ignored --nocapture gemm_speed`: one thread's GMAC/s.
    #[test]
    #[ignore]
    fn gemm_speed() {
        let (rows, cols) = (1536, 576);
        let q = vec![3u8; rows * cols];
        let s = vec![0.01f32; rows * cols / BLOCK];
        let w = QMatrix::from_q4(&q, &s, &s, rows, cols).unwrap();
        for n in [1, 4, 8, 32, 128] {
            let rows_x: Vec<Vec<f32>> = (0..n).map(|i| vec![0.1 * i as f32 + 0.05; cols]).collect();
            let mut xs = QuantBatch::of_rows(&rows_x, cols);
            let mut out = vec![0f32; n * rows];
            let reps = 2000 / n + 1;
            let t = std::time::Instant::now();
            for _ in 0..reps {
                gemm(&w, &mut xs, 0..rows, &mut out, rows);
            }
            let secs = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "n {n}: {:.1} us, {:.1} GMAC/s",
                secs * 1e6,
                (rows * cols * n) as f64 / secs / 1e9
            );
        }
    }

    /// `cargo test --release -- --ignored --nocapture gemm_prefill_speed`:
    /// one thread's GMAC/s on a prefill's 512 rows, the weights read from
    /// memory as in a forward pass (80 MiB of copies, each used once) and
    /// from cache (one matrix again and again).
    #[test]
    #[ignore]
    fn gemm_prefill_speed() {
        let n = 512;
        for (rows, cols) in [(960, 576), (3072, 576), (576, 1536)] {
            let q: Vec<u8> = (0..rows * cols).map(|i| (i * 7919 % 16) as u8).collect();
            let s: Vec<f32> = (0..rows * cols / BLOCK)
                .map(|i| 0.01 + (i % 13) as f32 * 1e-3)
                .collect();
            let w = QMatrix::from_q4(&q, &s, &s, rows, cols).unwrap();
            let rows_x: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    (0..cols)
                        .map(|j| ((i * 31 + j * 17) % 101) as f32 * 0.01 - 0.5)
                        .collect()
                })
                .collect();
            let mut xs = QuantBatch::of_rows(&rows_x, cols);
            let mut out = vec![0f32; n * rows];
            let copies: Vec<QMatrix> = (0..(80 << 20) / w.nbytes()).map(|_| w.clone()).collect();
            let macs = (rows * cols * n) as f64;
            let t = std::time::Instant::now();
            for m in &copies {
                gemm(m, &mut xs, 0..rows, &mut out, rows);
            }
            let memory = t.elapsed().as_secs_f64() / copies.len() as f64;
            let t = std::time::Instant::now();
            for _ in &copies {
                gemm(&w, &mut xs, 0..rows, &mut out, rows);
            }
            let cached = t.elapsed().as_secs_f64() / copies.len() as f64;
            println!(
                "{rows}x{cols}: {:.1} GMAC/s from memory, {:.1} from cache",
                macs / memory / 1e9,
                macs / cached / 1e9
            );
        }
    }
}
