//! Block-quantized weight matrices and the integer matrix products of a
//! decode step on the CPU.
//!
//! Weights come in blocks of 32 along the input dimension, each with a
//! scale `d` and an offset `m`: `w = d * q + m`, `q` unsigned (4-bit for
//! GGUF Q4_0/Q4_1/Q4_K, 5-bit for Q5_0/Q5_1/Q5_K, 8-bit for Q8_0 stored as
//! `q + 128` with `m = -128 d`, which is implied rather than stored).
//! Activations are quantized per block of 32 to signed 8-bit (`x = dx * qx`),
//! so a block's dot product is
//!
//! `d dx Σ q qx + m dx Σ qx`
//!
//! The integer sum is AVX-512 VNNI `vpdpbusd` (unsigned x signed bytes);
//! AVX2 (`gemm_avx2.rs`) and aarch64 NEON (`gemm_neon.rs`, with `sdot` where
//! the CPU has it) read the same layout.
//! The inputs of k-quant matrices are quantized per super-block of 256
//! instead (llama.cpp's Q8_K, [`QMatrix::per_super_rows`]); each block keeps
//! its `dx` and `dx Σ qx`, so every loop reads them alike.
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

/// `f::<m, T..>(args)` for a const `m` from 1 to 8 equal to `$m` (the kernels' loops over
/// a chunk's activation rows are compiled once per row count).
macro_rules! by_rows {
    ($m:expr, $f:ident::<$($t:ty),*>($($a:expr),*)) => {
        match $m {
            8 => $f::<8 $(, $t)*>($($a),*),
            7 => $f::<7 $(, $t)*>($($a),*),
            6 => $f::<6 $(, $t)*>($($a),*),
            5 => $f::<5 $(, $t)*>($($a),*),
            4 => $f::<4 $(, $t)*>($($a),*),
            3 => $f::<3 $(, $t)*>($($a),*),
            2 => $f::<2 $(, $t)*>($($a),*),
            _ => $f::<1 $(, $t)*>($($a),*),
        }
    };
    ($m:expr, $f:ident($($a:expr),*)) => {
        by_rows!($m, $f::<>($($a),*))
    };
}

mod activations;
mod f16;
mod gemm;
#[cfg(target_arch = "x86_64")]
mod gemm_avx2;
#[cfg(target_arch = "aarch64")]
mod gemm_neon;
mod gguf;

use crate::error::QuantError;
pub use activations::{QuantBatch, QuantRaw, BATCH};
use f16::f16_round;
pub use f16::{f16_to_f32, f32_to_f16};
pub use gemm::{
    gemm, gemm_into, gemm_path, gemm_portable, has_avx2, has_neon_dotprod, has_vnni, kernel_path,
    KernelPath,
};
pub use gguf::GgufType;

/// Weights per quantization block.
pub const BLOCK: usize = 32;
/// Rows per group: one f32 register of lanes.
pub const GROUP_ROWS: usize = 16;
/// Bytes of 8-bit codes per group and block.
const BLOCK_BYTES_Q8: usize = GROUP_ROWS * BLOCK;
/// Blocks of 32 per super-block of [`QuantKind::Q6`] and
/// [`QuantKind::Q4K`], whose scales are 8-bit integers times an f16 per
/// super-block (GGUF's k-quant blocks of 256).
pub const SUPER_BLOCKS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantKind {
    /// 4-bit unsigned codes, two per byte.
    Q4,
    /// 4-bit codes laid out as [`QuantKind::Q4`]'s, with GGUF Q4_K's scales:
    /// per block an unsigned 6-bit scale `sc` and minimum `mn` (a byte each),
    /// times an f16 `d` and `-dmin` per [`SUPER_BLOCKS`] blocks, `w = d sc q
    /// - dmin mn`: 4.625 bits a weight, where per-block f16s take 5.
    Q4K,
    /// 5-bit unsigned codes: the low 4 bits laid out as [`QuantKind::Q4`]'s,
    /// the fifth bits of the block's 8 registers in one more (register `k`'s
    /// at bit `k`).
    Q5,
    /// 8-bit codes stored unsigned (signed code + 128); the offset is
    /// always `-128 d`, so none is stored.
    Q8,
    /// 6-bit codes `q` standing for `q - 32`, with a scale per half block
    /// (16 weights) and no offset: GGUF's Q6_K, whose sub-blocks are 16 wide.
    /// As in Q6_K, a half block's scale is a signed 8-bit integer times an f16
    /// `d` per [`SUPER_BLOCKS`] blocks, so the columns are whole super-blocks.
    /// The low 4 bits are laid out as [`QuantKind::Q4`]'s, the high 2 bits of
    /// the block's 8 registers in 2 more (register `k`'s at bits `2 (k % 4)` of
    /// plane `k / 4`).
    Q6,
}

impl QuantKind {
    #[inline]
    fn block_bytes(self) -> usize {
        match self {
            QuantKind::Q4 | QuantKind::Q4K => BLOCK_BYTES_Q8 / 2,
            QuantKind::Q5 => BLOCK_BYTES_Q8 / 2 + BLOCK_BYTES_Q8 / 8,
            QuantKind::Q8 => BLOCK_BYTES_Q8,
            QuantKind::Q6 => BLOCK_BYTES_Q8 / 2 + BLOCK_BYTES_Q8 / 4,
        }
    }

    /// Scales per row and block of 32.
    #[inline]
    fn scales_per_block(self) -> usize {
        match self {
            QuantKind::Q6 => 2,
            QuantKind::Q4 | QuantKind::Q4K | QuantKind::Q5 | QuantKind::Q8 => 1,
        }
    }

    /// Whether blocks store an f16 offset `m` each (Q8's is `-128 d`, Q4K's
    /// an integer times its super-block's `-dmin`; Q6 has none).
    #[inline]
    fn stores_offsets(self) -> bool {
        matches!(self, QuantKind::Q4 | QuantKind::Q5)
    }

    /// Where code `k` (0..32) of row lane `lane` (0..16) lies within its
    /// group's block: the one layout that packing and reading share.
    #[inline]
    fn slot(self, k: usize, lane: usize) -> Slot {
        let (reg, byte) = (k / 4, lane * 4 + k % 4);
        let planes = BLOCK_BYTES_Q8 / 2 + byte;
        let (byte, high) = match self {
            QuantKind::Q8 => (reg * 64 + byte, false),
            _ => ((reg % 4) * 64 + byte, reg >= 4),
        };
        let bits = match self {
            QuantKind::Q5 => Some((planes, reg as u32)),
            QuantKind::Q6 => Some((planes + (reg / 4) * 64, 2 * (reg % 4) as u32)),
            QuantKind::Q4 | QuantKind::Q4K | QuantKind::Q8 => None,
        };
        Slot { byte, high, bits }
    }

    /// f16 factors per row and super-block (0: the kind has none).
    #[inline]
    fn super_scales(self) -> usize {
        match self {
            QuantKind::Q6 => 1,
            QuantKind::Q4K => 2,
            QuantKind::Q4 | QuantKind::Q5 | QuantKind::Q8 => 0,
        }
    }
}

/// A code's place within its group's block ([`QuantKind::slot`]).
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Its byte (for 4-bit and wider kinds' low 4 bits, a nibble of it).
    byte: usize,
    /// Whether it is that byte's high nibble.
    high: bool,
    /// For [`QuantKind::Q5`] and [`QuantKind::Q6`], the byte and bit offset
    /// of its high bits (one or two).
    bits: Option<(usize, u32)>,
}

/// A (rows, cols) weight matrix in blocks of 32: one or more parts of
/// consecutive rows, each of one [`QuantKind`] (a fused q/k/v projection of a
/// GGUF file mixes them).
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    parts: Vec<Part>,
}

/// Consecutive rows of a [`QMatrix`] in one kind, in the grouped layout.
#[derive(Debug, Clone)]
pub struct Part {
    pub kind: QuantKind,
    /// First row within the matrix.
    pub first_row: usize,
    pub rows: usize,
    pub cols: usize,
    q: Vec<u8>,
    /// f16 bits, (groups, blocks, 16); for kinds with super-blocks
    /// (groups, super-blocks, 16).
    d: Vec<u16>,
    /// Integer scales, (groups, blocks, 2, 16): [`QuantKind::Q6`]'s two
    /// half-block scales, [`QuantKind::Q4K`]'s scale and minimum; empty for
    /// the other kinds.
    sub: Vec<i8>,
    /// f16 bits, (groups, blocks, 16) where the kind stores offsets
    /// ([`QuantKind::stores_offsets`]); [`QuantKind::Q4K`]'s `-dmin`,
    /// (groups, super-blocks, 16); else empty.
    m: Vec<u16>,
}

impl QMatrix {
    fn single(part: Part) -> Self {
        Self {
            rows: part.rows,
            cols: part.cols,
            parts: vec![part],
        }
    }

    /// The parts, in row order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Whether the input rows are quantized per super-block of 256 (as
    /// llama.cpp's Q8_K for its k-quants; see [`QuantRaw::quantize_as`]):
    /// where every part's scales are integers per super-block (Q4K, Q6), so
    /// that their kernels apply them in integers. (Parts of other kinds read
    /// such rows too, Q8 on AVX2 only on the portable path.)
    pub fn per_super_rows(&self) -> bool {
        self.cols.is_multiple_of(BLOCK * SUPER_BLOCKS)
            && self
                .parts
                .iter()
                .all(|p| matches!(p.kind, QuantKind::Q4K | QuantKind::Q6))
    }

    /// Bytes read by one pass over the matrix (codes, scales, offsets).
    pub fn nbytes(&self) -> usize {
        self.parts.iter().map(Part::nbytes).sum()
    }

    /// Matrices of equal width stacked by rows (their parts kept as they are).
    pub fn concat(parts: Vec<QMatrix>) -> Result<Self, QuantError> {
        let Some(cols) = parts.first().map(|m| m.cols) else {
            return Err(QuantError::Shape("no matrices to stack".into()));
        };
        if let Some(bad) = parts.iter().find(|m| m.cols != cols) {
            return Err(QuantError::Shape(format!(
                "matrices to stack need equal widths: {cols} and {}",
                bad.cols
            )));
        }
        let mut rows = 0;
        let mut all = Vec::new();
        for m in parts {
            for mut p in m.parts {
                p.first_row = rows;
                rows += p.rows;
                all.push(p);
            }
        }
        Ok(Self {
            rows,
            cols,
            parts: all,
        })
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
        Ok(Self::single(Part::pack(
            QuantKind::Q4,
            q,
            scale,
            offset,
            &[],
            rows,
            cols,
        )))
    }

    /// From signed 8-bit codes (rows, cols) and per-block scales: `w = scale * q`.
    pub fn from_q8(q: &[i8], scale: &[f32], rows: usize, cols: usize) -> Result<Self, QuantError> {
        let offset: Vec<f32> = scale.iter().map(|&d| -128.0 * f16_round(d)).collect();
        check_dims(q.len(), scale.len(), offset.len(), rows, cols)?;
        let codes: Vec<u8> = q.iter().map(|&c| (c as u8) ^ 0x80).collect();
        Ok(Self::single(Part::pack(
            QuantKind::Q8,
            &codes,
            scale,
            &offset,
            &[],
            rows,
            cols,
        )))
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

    /// Row `r` as floats (tests, references and embedding lookups).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let part = self
            .parts
            .iter()
            .find(|p| r < p.first_row + p.rows)
            .expect("row in range");
        part.dequantize_row(r - part.first_row)
    }
}

impl Part {
    #[inline]
    fn blocks_per_row(&self) -> usize {
        self.cols / BLOCK
    }

    fn nbytes(&self) -> usize {
        self.q.len() + 2 * (self.d.len() + self.m.len()) + self.sub.len()
    }

    /// Unsigned codes (rows, cols) into the grouped layout; rows past the
    /// last are zero with zero scales (their outputs are never stored).
    /// `scale` holds [`QuantKind::scales_per_block`] values per row and
    /// block, `offset` one (none for [`QuantKind::Q6`]; for
    /// [`QuantKind::Q8`] it must be `-128 scale` and is not kept). For kinds
    /// with super-blocks, `scale` and `offset` are the integers and `supers`
    /// the [`QuantKind::super_scales`] factors per row and super-block (Q6:
    /// `d`; Q4K: `d`, `-dmin`); the other kinds take no `supers`.
    fn pack(
        kind: QuantKind,
        codes: &[u8],
        scale: &[f32],
        offset: &[f32],
        supers: &[f32],
        rows: usize,
        cols: usize,
    ) -> Self {
        let nb = cols / BLOCK;
        let groups = rows.div_ceil(GROUP_ROWS);
        let per_super = kind.super_scales();
        assert!(
            per_super == 0
                || (nb.is_multiple_of(SUPER_BLOCKS)
                    && supers.len() * SUPER_BLOCKS == rows * nb * per_super)
        );
        let super_len = groups * (nb / SUPER_BLOCKS) * GROUP_ROWS;
        let block_len = groups * nb * GROUP_ROWS;
        let mut m = Self {
            kind,
            first_row: 0,
            rows,
            cols,
            q: vec![0u8; groups * nb * kind.block_bytes()],
            d: vec![0u16; if per_super > 0 { super_len } else { block_len }],
            sub: vec![0i8; if per_super > 0 { 2 * block_len } else { 0 }],
            m: vec![
                0u16;
                match kind {
                    QuantKind::Q4 | QuantKind::Q5 => block_len,
                    QuantKind::Q4K => super_len,
                    QuantKind::Q8 | QuantKind::Q6 => 0,
                }
            ],
        };
        for r in 0..rows {
            for blk in 0..nb {
                m.store_scales(r, blk, scale, offset, supers);
                m.store_codes(r, blk, &codes[r * cols + blk * BLOCK..][..BLOCK]);
            }
        }
        m
    }

    /// Row `r`'s scales of block `blk`, from [`Part::pack`]'s arguments.
    fn store_scales(
        &mut self,
        r: usize,
        blk: usize,
        scale: &[f32],
        offset: &[f32],
        supers: &[f32],
    ) {
        let at = r * self.blocks_per_row() + blk;
        let per_super = self.kind.super_scales();
        if per_super == 0 {
            let s = self.scale_index(r, blk);
            self.d[s] = f32_to_f16(scale[at]);
            if self.kind.stores_offsets() {
                self.m[s] = f32_to_f16(offset[at]);
            }
            return;
        }
        let ints = match self.kind {
            QuantKind::Q6 => [scale[2 * at], scale[2 * at + 1]],
            _ => [scale[at], offset[at]],
        };
        for (which, v) in ints.into_iter().enumerate() {
            let i = self.sub_index(r, blk, which);
            self.sub[i] = v as i8;
        }
        if blk.is_multiple_of(SUPER_BLOCKS) {
            let (s, first) = (self.super_index(r, blk), at / SUPER_BLOCKS * per_super);
            self.d[s] = f32_to_f16(supers[first]);
            if self.kind == QuantKind::Q4K {
                self.m[s] = f32_to_f16(supers[first + 1]);
            }
        }
    }

    /// Row `r`'s unsigned codes of block `blk` into their bytes, nibbles and
    /// high bits ([`QuantKind::slot`]).
    fn store_codes(&mut self, r: usize, blk: usize, codes: &[u8]) {
        let kind = self.kind;
        let start = self.block_start(r, blk);
        let q = &mut self.q[start..][..kind.block_bytes()];
        for (k, &code) in codes.iter().enumerate() {
            let at = kind.slot(k, r % GROUP_ROWS);
            if kind == QuantKind::Q8 {
                q[at.byte] = code;
                continue;
            }
            let low = code & 0x0F;
            q[at.byte] |= if at.high { low << 4 } else { low };
            if let Some((byte, shift)) = at.bits {
                q[byte] |= (code >> 4) << shift;
            }
        }
    }

    /// Where row `r`'s codes of block `blk` start in `q`.
    #[inline]
    fn block_start(&self, r: usize, blk: usize) -> usize {
        ((r / GROUP_ROWS) * self.blocks_per_row() + blk) * self.kind.block_bytes()
    }

    /// Where [`QuantKind::Q6`] row `r`'s `d` for block `blk` is in `d`.
    #[inline]
    fn super_index(&self, r: usize, blk: usize) -> usize {
        let supers = self.blocks_per_row() / SUPER_BLOCKS;
        ((r / GROUP_ROWS) * supers + blk / SUPER_BLOCKS) * GROUP_ROWS + r % GROUP_ROWS
    }

    /// [`QuantKind::Q6`] row `r`'s scale of half `half` of block `blk`.
    #[inline]
    fn q6_scale(&self, r: usize, blk: usize, half: usize) -> f32 {
        f16_to_f32(self.d[self.super_index(r, blk)]) * self.sub[self.sub_index(r, blk, half)] as f32
    }

    /// Row `r`'s scale `d` and offset `m` of block `blk` (not for
    /// [`QuantKind::Q6`], whose half blocks have a scale each).
    #[inline]
    fn block_scales(&self, r: usize, blk: usize) -> (f32, f32) {
        match self.kind {
            QuantKind::Q4K => {
                let s = self.super_index(r, blk);
                let sc = self.sub[self.sub_index(r, blk, 0)] as f32;
                let mn = self.sub[self.sub_index(r, blk, 1)] as f32;
                (f16_to_f32(self.d[s]) * sc, f16_to_f32(self.m[s]) * mn)
            }
            QuantKind::Q8 => {
                let d = f16_to_f32(self.d[self.scale_index(r, blk)]);
                (d, -128.0 * d)
            }
            QuantKind::Q4 | QuantKind::Q5 => {
                let s = self.scale_index(r, blk);
                (f16_to_f32(self.d[s]), f16_to_f32(self.m[s]))
            }
            QuantKind::Q6 => unreachable!("Q6 has a scale per half block"),
        }
    }

    /// Where row `r`'s f16 scale (and offset, for kinds with one, in `m`)
    /// of block `blk` is, for kinds without super-blocks.
    #[inline]
    fn scale_index(&self, r: usize, blk: usize) -> usize {
        ((r / GROUP_ROWS) * self.blocks_per_row() + blk) * GROUP_ROWS + r % GROUP_ROWS
    }

    /// Where row `r`'s integer scale `which` (0 or 1) of block `blk` is in
    /// `sub`, for kinds with super-blocks.
    #[inline]
    fn sub_index(&self, r: usize, blk: usize, which: usize) -> usize {
        (((r / GROUP_ROWS) * self.blocks_per_row() + blk) * 2 + which) * GROUP_ROWS + r % GROUP_ROWS
    }

    #[inline]
    fn code(&self, r: usize, c: usize) -> u8 {
        let q = &self.q[self.block_start(r, c / BLOCK)..];
        let at = self.kind.slot(c % BLOCK, r % GROUP_ROWS);
        if self.kind == QuantKind::Q8 {
            return q[at.byte];
        }
        let low = if at.high {
            q[at.byte] >> 4
        } else {
            q[at.byte] & 0x0F
        };
        match at.bits {
            Some((byte, shift)) => {
                let mask = if self.kind == QuantKind::Q5 { 1 } else { 3 };
                low | (((q[byte] >> shift) & mask) << 4)
            }
            None => low,
        }
    }

    /// Weight (r, c) of this part as a float.
    #[inline]
    fn weight(&self, r: usize, c: usize) -> f32 {
        let blk = c / BLOCK;
        match self.kind {
            QuantKind::Q6 => {
                let d = self.q6_scale(r, blk, (c % BLOCK) / 16);
                d * (self.code(r, c) as i32 - 32) as f32
            }
            _ => {
                let (d, m) = self.block_scales(r, blk);
                d * self.code(r, c) as f32 + m
            }
        }
    }

    /// Row `r` of this part as floats.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        (0..self.cols).map(|c| self.weight(r, c)).collect()
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

#[cfg(test)]
mod tests;
