//! Bidirectional attention over packed rows, for encoders (embedding models):
//! the rows of a batch of sequences stored one after another, no padding, no
//! cache. Each query row attends over every row of its own sequence.
//!
//! `qkv` holds each row's q, k and v side by side (`3 * heads * head_dim`
//! floats), as one fused projection makes them; `out` gets each row's
//! attention (`heads * head_dim`), ready for the output projection. The work is
//! small (short sentences: tens of rows per sequence), so it runs on the
//! calling thread, one (sequence, head) at a time, with AVX2 where the CPU has
//! it (the same loops compiled for it) and portable code otherwise.

use crate::error::AttentionError;
use crate::exp::fast_exp;

/// Attention of packed sequences: rows `starts[s]..starts[s + 1]` are sequence `s`.
pub fn packed_attention(
    qkv: &[f32],
    starts: &[usize],
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<(), AttentionError> {
    let width = heads * head_dim;
    let rows = starts.last().copied().unwrap_or(0);
    if heads == 0 || head_dim == 0 {
        return Err(AttentionError::Shape(
            "heads and head_dim must be > 0".into(),
        ));
    }
    if qkv.len() != rows * 3 * width || out.len() != rows * width {
        return Err(AttentionError::Shape(format!(
            "{rows} rows of {heads} heads x {head_dim}: qkv has {} floats (expected {}), out {} (expected {})",
            qkv.len(),
            rows * 3 * width,
            out.len(),
            rows * width
        )));
    }
    if starts.first() != Some(&0) || starts.windows(2).any(|w| w[1] <= w[0]) {
        return Err(AttentionError::Shape(
            "starts must begin at 0 and grow strictly (every sequence has a row)".into(),
        ));
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA, checked just above.
        unsafe { attend_avx2(qkv, starts, heads, head_dim, scale, out) };
        return Ok(());
    }
    attend(qkv, starts, heads, head_dim, scale, out);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    qkv: &[f32],
    starts: &[usize],
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    attend(qkv, starts, heads, head_dim, scale, out);
}

/// The loops, inlined into each instruction set's entry point: head_dim 32, 64
/// or 128 take [`attend_fixed`], any other the plain loops.
#[inline(always)]
fn attend(
    qkv: &[f32],
    starts: &[usize],
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    match head_dim {
        32 => attend_fixed::<4>(qkv, starts, heads, scale, out),
        64 => attend_fixed::<8>(qkv, starts, heads, scale, out),
        128 => attend_fixed::<16>(qkv, starts, heads, scale, out),
        _ => attend_plain(qkv, starts, heads, head_dim, scale, out),
    }
}

/// head_dim = 8 C. Per (sequence, head): its keys transposed once into blocks of
/// eight keys (`[block][feature][8]`), so that a query's scores come eight at a
/// time, each from four independent partial sums over the features; the softmax
/// over those lanes (the padding ignored); the values summed into C accumulators
/// of eight features, held in registers. Every inner loop is a fixed eight wide,
/// one vector operation once compiled.
#[inline(always)]
fn attend_fixed<const C: usize>(
    qkv: &[f32],
    starts: &[usize],
    heads: usize,
    scale: f32,
    out: &mut [f32],
) {
    let head_dim = 8 * C;
    let width = heads * head_dim;
    let widest = starts
        .windows(2)
        .map(|w| (w[1] - w[0]).div_ceil(8) * 8)
        .max()
        .unwrap_or(0);
    let mut keys_t = vec![0.0f32; head_dim * widest];
    let mut scores = vec![0.0f32; widest];
    let row_of = |r: usize, part: usize, h: usize| {
        &qkv[r * 3 * width + part * width + h * head_dim..][..head_dim]
    };
    for seq in starts.windows(2) {
        let (first, n) = (seq[0], seq[1] - seq[0]);
        let blocks = n.div_ceil(8);
        for h in 0..heads {
            for j in 0..n {
                let (blk, lane) = (j / 8, j % 8);
                for (c, &k) in row_of(first + j, 1, h).iter().enumerate() {
                    keys_t[(blk * head_dim + c) * 8 + lane] = k;
                }
            }
            for i in 0..n {
                let q = row_of(first + i, 0, h);
                for blk in 0..blocks {
                    let mut parts = [[0.0f32; 8]; 4];
                    let kb = &keys_t[blk * head_dim * 8..][..head_dim * 8];
                    for (q4, k32) in q.chunks_exact(4).zip(kb.chunks_exact(32)) {
                        for (p, (&qc, k8)) in
                            parts.iter_mut().zip(q4.iter().zip(k32.chunks_exact(8)))
                        {
                            for l in 0..8 {
                                p[l] += qc * k8[l];
                            }
                        }
                    }
                    let s8 = &mut scores[blk * 8..][..8];
                    for l in 0..8 {
                        s8[l] = (parts[0][l] + parts[1][l] + (parts[2][l] + parts[3][l])) * scale;
                    }
                }
                let s = &mut scores[..blocks * 8];
                let max = s[..n].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                for s8 in s.chunks_exact_mut(8) {
                    for x in s8 {
                        *x = fast_exp(*x - max);
                    }
                }
                let inv = 1.0 / s[..n].iter().sum::<f32>();
                let mut acc = [[0.0f32; 8]; C];
                for (j, &p) in s[..n].iter().enumerate() {
                    for (a8, v8) in acc.iter_mut().zip(row_of(first + j, 2, h).chunks_exact(8)) {
                        for l in 0..8 {
                            a8[l] += p * v8[l];
                        }
                    }
                }
                let row = &mut out[(first + i) * width + h * head_dim..][..head_dim];
                for (o8, a8) in row.chunks_exact_mut(8).zip(&acc) {
                    for l in 0..8 {
                        o8[l] = a8[l] * inv;
                    }
                }
            }
        }
    }
}

/// Straightforward loops, for any head_dim.
fn attend_plain(
    qkv: &[f32],
    starts: &[usize],
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    let width = heads * head_dim;
    let row_of = |r: usize, part: usize, h: usize| {
        &qkv[r * 3 * width + part * width + h * head_dim..][..head_dim]
    };
    let mut scores = Vec::new();
    for seq in starts.windows(2) {
        for h in 0..heads {
            for i in seq[0]..seq[1] {
                let q = row_of(i, 0, h);
                scores.clear();
                scores.extend((seq[0]..seq[1]).map(|j| {
                    scale
                        * q.iter()
                            .zip(row_of(j, 1, h))
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                }));
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                scores.iter_mut().for_each(|x| *x = fast_exp(*x - max));
                let inv = 1.0 / scores.iter().sum::<f32>();
                let row = &mut out[i * width + h * head_dim..][..head_dim];
                row.fill(0.0);
                for (j, &p) in (seq[0]..seq[1]).zip(&scores) {
                    for (o, &v) in row.iter_mut().zip(row_of(j, 2, h)) {
                        *o += p * v;
                    }
                }
                row.iter_mut().for_each(|o| *o *= inv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-2, 2) from a counter (no generator needed).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        (0..n as u64)
            .map(|i| {
                let x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
                let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// The same attention in f64, one row at a time, straight from the definition.
    fn reference(qkv: &[f32], starts: &[usize], heads: usize, d: usize, scale: f64) -> Vec<f32> {
        let width = heads * d;
        let mut out = vec![0.0f32; starts.last().unwrap() * width];
        for seq in starts.windows(2) {
            for h in 0..heads {
                for i in seq[0]..seq[1] {
                    let at = |r: usize, part: usize, c: usize| {
                        qkv[r * 3 * width + part * width + h * d + c] as f64
                    };
                    let s: Vec<f64> = (seq[0]..seq[1])
                        .map(|j| scale * (0..d).map(|c| at(i, 0, c) * at(j, 1, c)).sum::<f64>())
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for c in 0..d {
                        let v: f64 = (seq[0]..seq[1]).zip(&e).map(|(j, p)| p * at(j, 2, c)).sum();
                        out[i * width + h * d + c] = (v / total) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_for_ragged_sequences() {
        for (heads, d) in [(12, 32), (3, 12), (2, 5)] {
            let starts = [0, 1, 6, 23, 56];
            let rows = starts[4];
            let qkv = values(rows * 3 * heads * d, d as u64);
            let mut out = vec![f32::NAN; rows * heads * d];
            let scale = 1.0 / (d as f32).sqrt();
            packed_attention(&qkv, &starts, heads, d, scale, &mut out).unwrap();
            let want = reference(&qkv, &starts, heads, d, scale as f64);
            let worst = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst < 2e-5, "heads {heads} d {d}: {worst}");
            // the portable loops agree with whatever the CPU ran
            let mut portable = vec![0.0f32; out.len()];
            attend(&qkv, &starts, heads, d, scale, &mut portable);
            let diff = out
                .iter()
                .zip(&portable)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff < 1e-6, "{diff}");
        }
    }

    #[test]
    fn a_row_attends_only_within_its_sequence() {
        // the same first sequence with and without a second one after it
        let (heads, d) = (2, 8);
        let qkv = values(9 * 3 * heads * d, 7);
        let mut alone = vec![0.0f32; 4 * heads * d];
        packed_attention(
            &qkv[..4 * 3 * heads * d],
            &[0, 4],
            heads,
            d,
            0.5,
            &mut alone,
        )
        .unwrap();
        let mut both = vec![0.0f32; 9 * heads * d];
        packed_attention(&qkv, &[0, 4, 9], heads, d, 0.5, &mut both).unwrap();
        assert_eq!(alone[..], both[..4 * heads * d]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let qkv = vec![0.0f32; 4 * 3 * 8];
        let mut out = vec![0.0f32; 4 * 8];
        assert!(packed_attention(&qkv, &[0, 4], 1, 8, 1.0, &mut out[..31]).is_err());
        assert!(packed_attention(&qkv, &[0, 5], 1, 8, 1.0, &mut out).is_err());
        assert!(packed_attention(&qkv, &[1, 4], 1, 8, 1.0, &mut out).is_err());
        assert!(packed_attention(&qkv, &[0, 2, 2, 4], 1, 8, 1.0, &mut out).is_err());
        assert!(packed_attention(&qkv, &[0, 4], 0, 8, 1.0, &mut out).is_err());
        assert!(packed_attention(&qkv, &[0, 4], 1, 8, 1.0, &mut out).is_ok());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release -p mistralrs-serve-cpu -- --ignored --nocapture packed_speed`
    #[test]
    #[ignore]
    fn packed_speed() {
        let lens = [
            13usize, 9, 17, 19, 8, 11, 15, 12, 18, 10, 14, 16, 13, 9, 17, 19, 8, 11, 15, 12, 18,
            10, 14, 16, 13, 9, 17, 19, 8, 11, 15, 12,
        ];
        let mut starts = vec![0usize];
        for l in lens {
            starts.push(starts.last().unwrap() + l);
        }
        let (heads, d) = (12, 32);
        let rows = *starts.last().unwrap();
        let qkv: Vec<f32> = (0..rows * 3 * heads * d)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let mut out = vec![0.0f32; rows * heads * d];
        for (name, portable) in [("dispatch", false), ("portable", true)] {
            let start = std::time::Instant::now();
            for _ in 0..200 {
                if portable {
                    attend(&qkv, &starts, heads, d, 0.2, &mut out);
                } else {
                    packed_attention(&qkv, &starts, heads, d, 0.2, &mut out).unwrap();
                }
            }
            println!(
                "{name}: {:.1} us per call, {rows} rows",
                start.elapsed().as_secs_f64() / 200.0 * 1e6
            );
        }
    }
}
