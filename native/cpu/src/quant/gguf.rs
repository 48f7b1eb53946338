//! GGUF's block-quantized tensors into [`QMatrix`] parts, from the file's
//! bytes: each block's codes and scales read as ggml lays them out
//! (`ggml-common.h`), then repacked into the grouped layout without going
//! through floats.
//!
//! - Q4_0 and Q4_1 become [`QuantKind::Q4`];
//! - Q4_K becomes [`QuantKind::Q4K`], its scales as the file's, where the
//!   AVX2 or portable kernel runs; where AVX-512 VNNI does (whose loop has no
//!   Q4K) it becomes [`QuantKind::Q4`], its 6-bit sub-block scales and
//!   minimums folded into an f16 scale and offset per 32;
//! - Q5_0, Q5_1 and Q5_K (5-bit codes, Q5_K's scales folded as Q4_K's)
//!   become [`QuantKind::Q5`];
//! - Q8_0 becomes [`QuantKind::Q8`];
//! - Q6_K (16-wide sub-blocks) becomes [`QuantKind::Q6`], still 6 bits and
//!   its scales as the file's (8-bit integers times an f16 per 256).
//!
//! The one rounding: a folded Q4_K or Q5_K sub-block scale (an f16 times a
//! 6-bit integer) is stored as f16, a relative change under 2^-11 (llama.cpp
//! multiplies them in f32).

use super::f16::f16_to_f32;
use super::{check_dims, kernel_path, KernelPath, Part, QMatrix, QuantKind, BLOCK};
use crate::error::QuantError;

/// The GGUF tensor types a [`QMatrix`] is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgufType {
    /// By ggml's name ("Q4_K", ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "Q4_0" => GgufType::Q4_0,
            "Q4_1" => GgufType::Q4_1,
            "Q5_0" => GgufType::Q5_0,
            "Q5_1" => GgufType::Q5_1,
            "Q8_0" => GgufType::Q8_0,
            "Q4_K" => GgufType::Q4K,
            "Q5_K" => GgufType::Q5K,
            "Q6_K" => GgufType::Q6K,
            _ => return None,
        })
    }

    /// (weights, bytes) of one block.
    pub fn block(self) -> (usize, usize) {
        match self {
            GgufType::Q4_0 => (32, 18),
            GgufType::Q4_1 => (32, 20),
            GgufType::Q5_0 => (32, 22),
            GgufType::Q5_1 => (32, 24),
            GgufType::Q8_0 => (32, 34),
            GgufType::Q4K => (256, 144),
            GgufType::Q5K => (256, 176),
            GgufType::Q6K => (256, 210),
        }
    }

    fn kind(self) -> QuantKind {
        match self {
            GgufType::Q4_0 | GgufType::Q4_1 => QuantKind::Q4,
            GgufType::Q4K if kernel_path() == KernelPath::Avx512 => QuantKind::Q4,
            GgufType::Q4K => QuantKind::Q4K,
            GgufType::Q5_0 | GgufType::Q5_1 | GgufType::Q5K => QuantKind::Q5,
            GgufType::Q8_0 => QuantKind::Q8,
            GgufType::Q6K => QuantKind::Q6,
        }
    }
}

/// One block's codes (unsigned), its scales (one per 32 weights, or per 16
/// for Q6) and offsets (one per 32; Q6 has none: its codes stand for
/// q - 32). For kinds with super-blocks (Q6, Q4K) the scales and offsets
/// are the file's integers, and their factors go to `supers`.
struct Decoded<'a> {
    codes: &'a mut [u8],
    scales: &'a mut [f32],
    offsets: &'a mut [f32],
    supers: &'a mut [f32],
}

#[inline]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// 32 4-bit codes: element j in the low nibble of qs[j], j + 16 in the high one.
fn nibbles(qs: &[u8], out: &mut [u8]) {
    for j in 0..16 {
        out[j] = qs[j] & 0x0F;
        out[j + 16] = qs[j] >> 4;
    }
}

/// Q4_K's and Q5_K's 6-bit scale and minimum of sub-block `j` (0..8).
fn scale_min_k4(j: usize, s: &[u8]) -> (f32, f32) {
    let (sc, m) = if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    };
    (sc as f32, m as f32)
}

fn decode(t: GgufType, kind: QuantKind, b: &[u8], out: Decoded) {
    let Decoded {
        codes,
        scales,
        offsets,
        supers,
    } = out;
    match t {
        GgufType::Q4_0 => {
            let d = f16_at(b, 0);
            nibbles(&b[2..18], codes);
            (scales[0], offsets[0]) = (d, -8.0 * d);
        }
        GgufType::Q4_1 => {
            nibbles(&b[4..20], codes);
            (scales[0], offsets[0]) = (f16_at(b, 0), f16_at(b, 2));
        }
        GgufType::Q5_0 | GgufType::Q5_1 => {
            let q5_1 = t == GgufType::Q5_1;
            let d = f16_at(b, 0);
            let at = if q5_1 { 4 } else { 2 };
            let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
            nibbles(&b[at + 4..at + 20], codes);
            for (j, c) in codes.iter_mut().enumerate() {
                *c |= (((qh >> j) & 1) as u8) << 4;
            }
            scales[0] = d;
            offsets[0] = if q5_1 { f16_at(b, 2) } else { -16.0 * d };
        }
        GgufType::Q8_0 => {
            let d = f16_at(b, 0);
            for (c, &q) in codes.iter_mut().zip(&b[2..34]) {
                *c = q ^ 0x80; // signed code + 128
            }
            (scales[0], offsets[0]) = (d, -128.0 * d);
        }
        GgufType::Q4K | GgufType::Q5K => {
            let (d, dmin) = decode_k4(t, b, codes, scales, offsets);
            if kind == QuantKind::Q4K {
                (supers[0], supers[1]) = (d, -dmin);
            } else {
                // folded: one f16 scale and offset per 32
                for (s, o) in scales.iter_mut().zip(offsets.iter_mut()) {
                    (*s, *o) = (d * *s, -dmin * *o);
                }
            }
        }
        GgufType::Q6K => supers[0] = decode_q6k(b, codes, scales),
    }
}

/// Q4_K (d, dmin, 12 bytes of scales, 128 of nibbles) and Q5_K (the same
/// with 32 bytes of fifth bits before the nibbles): 64 weights per 32 bytes
/// of nibbles, low nibbles first, `w = d sc q - dmin m` per 32. The integer
/// `sc` and `m` go out as scales and offsets; `(d, dmin)` is returned.
fn decode_k4(
    t: GgufType,
    b: &[u8],
    codes: &mut [u8],
    scales: &mut [f32],
    offsets: &mut [f32],
) -> (f32, f32) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let sc = &b[4..16];
    let (qh, qs) = if t == GgufType::Q5K {
        (Some(&b[16..48]), &b[48..176])
    } else {
        (None, &b[16..144])
    };
    for chunk in 0..4 {
        let q = &qs[32 * chunk..32 * chunk + 32];
        for l in 0..32 {
            let (lo, hi) = (q[l] & 0x0F, q[l] >> 4);
            let (lo5, hi5) = match qh {
                Some(h) => (
                    ((h[l] >> (2 * chunk)) & 1) << 4,
                    ((h[l] >> (2 * chunk + 1)) & 1) << 4,
                ),
                None => (0, 0),
            };
            codes[64 * chunk + l] = lo | lo5;
            codes[64 * chunk + 32 + l] = hi | hi5;
        }
        for sub in [2 * chunk, 2 * chunk + 1] {
            (scales[sub], offsets[sub]) = scale_min_k4(sub, sc);
        }
    }
    (d, dmin)
}

/// Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 signed 8-bit
/// scales (one per 16 weights), d; `w = d sc (q - 32)`. The scales go out
/// as the integers `sc`; `d` is returned.
fn decode_q6k(b: &[u8], codes: &mut [u8], scales: &mut [f32]) -> f32 {
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for half in 0..2 {
        let (ql, qh) = (&ql[64 * half..], &qh[32 * half..]);
        let out = &mut codes[128 * half..];
        for l in 0..32 {
            let q = [
                (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (i, v) in q.into_iter().enumerate() {
                out[32 * i + l] = v;
            }
        }
    }
    for (s, &c) in scales.iter_mut().zip(sc) {
        *s = (c as i8) as f32;
    }
    d
}

impl QMatrix {
    /// A (rows, cols) tensor of GGUF type `t` from its bytes (rows of blocks,
    /// as the file stores them).
    pub fn from_gguf(
        t: GgufType,
        data: &[u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, QuantError> {
        let (per_block, block_bytes) = t.block();
        if cols == 0 || !cols.is_multiple_of(per_block) {
            return Err(QuantError::Shape(format!(
                "{t:?} rows of {cols} weights are not whole blocks of {per_block}"
            )));
        }
        let blocks = rows * cols / per_block;
        if data.len() != blocks * block_bytes {
            return Err(QuantError::Shape(format!(
                "({rows}, {cols}) {t:?} needs {} bytes, got {}",
                blocks * block_bytes,
                data.len()
            )));
        }
        let kind = t.kind();
        let spb = kind.scales_per_block();
        let mut codes = vec![0u8; rows * cols];
        let mut scales = vec![0f32; rows * cols / BLOCK * spb];
        let mut offsets = vec![
            0f32;
            if kind == QuantKind::Q6 {
                0
            } else {
                rows * cols / BLOCK
            }
        ];
        let subs = per_block / BLOCK; // blocks of 32 per GGUF block
        let mut no_offsets = [0f32; 8];
        let per_super = kind.super_scales();
        let mut supers = vec![0f32; blocks * per_super];
        let mut no_super = [0f32; 2];
        for (i, b) in data.chunks_exact(block_bytes).enumerate() {
            let out = Decoded {
                supers: if supers.is_empty() {
                    &mut no_super
                } else {
                    &mut supers[i * per_super..(i + 1) * per_super]
                },
                codes: &mut codes[i * per_block..][..per_block],
                scales: &mut scales[i * subs * spb..][..subs * spb],
                offsets: if offsets.is_empty() {
                    &mut no_offsets[..subs]
                } else {
                    &mut offsets[i * subs..][..subs]
                },
            };
            decode(t, kind, b, out);
        }
        if kind != QuantKind::Q6 {
            check_dims(codes.len(), scales.len(), offsets.len(), rows, cols)?;
        }
        Ok(Self::single(Part::pack(
            kind, &codes, &scales, &offsets, &supers, rows, cols,
        )))
    }
}
