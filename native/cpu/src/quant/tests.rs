//! The matrix kernels against the dequantized weights, the vector paths
//! against the loops, and (ignored) their speed.

use super::activations::{self, quantize_blocks};
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

/// Every path this CPU runs gives the portable sums: Q4 and Q8 matrices, batches
/// of 1 to 11 rows, and row ranges that start and end inside groups and halves.
#[test]
fn every_supported_path_matches_the_loops() {
    let mut rng = Rng::new(7);
    let paths = KernelPath::ALL;
    let (rows, cols) = (45, 160);
    let (q, scale, offset) = q4_parts(&mut rng, rows, cols);
    let q4 = QMatrix::from_q4(&q, &scale, &offset, rows, cols).unwrap();
    // 8-bit codes at both ends of the range: |s| = 128 must not saturate
    let mut w8 = random(&mut rng, rows * cols, 0.9);
    w8[0] = -0.9;
    w8[1] = 0.9;
    let q8 = QMatrix::quantize_q8(&w8, rows, cols).unwrap();
    for w in [&q4, &q8] {
        for batch in [1, 3, 8, 11] {
            let mut xs: Vec<Vec<f32>> = (0..batch).map(|_| random(&mut rng, cols, 2.0)).collect();
            xs[0][..32].fill(-127.0); // activation codes of -127 against the extreme weights
            let mut acts = QuantBatch::of_rows(&xs, cols);
            for range in [0..rows, 3..rows, 5..13, 17..40, 9..10] {
                let n = range.len();
                let mut slow = vec![0f32; batch * n];
                gemm_portable(w, &mut acts, range.clone(), &mut slow, n);
                for path in paths.into_iter().filter(|p| p.supported()) {
                    let mut fast = vec![f32::NAN; batch * n];
                    gemm_path(path, w, &mut acts, range.clone(), &mut fast, n);
                    for (i, (f, s)) in fast.iter().zip(&slow).enumerate() {
                        assert!(
                            (f - s).abs() <= 1e-4 * s.abs().max(1.0),
                            "{path:?} {:?} batch {batch} rows {range:?} [{i}]: {f} vs {s}",
                            w.parts()[0].kind
                        );
                    }
                }
            }
        }
    }
}

/// Random blocks of GGUF type `t` with sane f16 scale fields (the rest random bytes).
fn gguf_blocks(rng: &mut Rng, t: GgufType, blocks: usize) -> Vec<u8> {
    let (_, size) = t.block();
    let mut data: Vec<u8> = (0..blocks * size)
        .map(|_| (rng.next_u64() % 256) as u8)
        .collect();
    // (byte offset, magnitude) of each f16 field
    let fields: &[(usize, f32)] = match t {
        GgufType::Q4_0 | GgufType::Q5_0 | GgufType::Q8_0 => &[(0, 0.02)],
        GgufType::Q4_1 | GgufType::Q5_1 => &[(0, 0.02), (2, 0.3)],
        GgufType::Q4K | GgufType::Q5K => &[(0, 0.002), (2, 0.004)],
        GgufType::Q6K => &[(208, 0.0005)],
    };
    for b in data.chunks_exact_mut(size) {
        for &(at, mag) in fields {
            let v = f32_to_f16(mag * (0.5 + rng.next_f32()));
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    data
}

const ALL_GGUF: [GgufType; 8] = [
    GgufType::Q4_0,
    GgufType::Q4_1,
    GgufType::Q5_0,
    GgufType::Q5_1,
    GgufType::Q8_0,
    GgufType::Q4K,
    GgufType::Q5K,
    GgufType::Q6K,
];

/// Every GGUF type, and a fused projection of three kinds whose part
/// boundaries fall inside groups of 16, on every path against the loops, and
/// the loops against the dequantized weights, with activation rows quantized
/// per block, per super-block, and both in one chunk.
#[test]
fn gguf_types_and_mixed_parts_on_every_path() {
    let mut rng = Rng::new(11);
    let cols = 512;
    let mut matrices: Vec<QMatrix> = ALL_GGUF
        .iter()
        .map(|&t| {
            let rows = 21;
            let data = gguf_blocks(&mut rng, t, rows * cols / t.block().0);
            QMatrix::from_gguf(t, &data, rows, cols).unwrap()
        })
        .collect();
    let parts = [
        (GgufType::Q8_0, 13),
        (GgufType::Q4K, 20),
        (GgufType::Q6K, 12),
    ];
    let stacked: Vec<QMatrix> = parts
        .iter()
        .map(|&(t, rows)| {
            let data = gguf_blocks(&mut rng, t, rows * cols / t.block().0);
            QMatrix::from_gguf(t, &data, rows, cols).unwrap()
        })
        .collect();
    let mixed = QMatrix::concat(stacked.clone()).unwrap();
    assert_eq!((mixed.rows, mixed.parts().len()), (45, 3));
    assert_eq!(mixed.dequantize_row(20), stacked[1].dequantize_row(7));
    assert_eq!(
        mixed.nbytes(),
        stacked.iter().map(QMatrix::nbytes).sum::<usize>()
    );
    matrices.push(mixed);
    // rows per block of 32, per super-block of 256, and a chunk of both
    let modes = [Some(false), Some(true), None];
    for (w, mode) in matrices.iter().flat_map(|w| modes.map(|m| (w, m))) {
        for batch in [1, 5, 9] {
            let xs: Vec<Vec<f32>> = (0..batch).map(|_| random(&mut rng, cols, 2.0)).collect();
            let mut acts = QuantBatch::default();
            acts.reserve(batch, cols);
            for (r, x) in xs.iter().enumerate() {
                let per_super = mode.unwrap_or(r % 2 == 1);
                // SAFETY: the batch is this thread's alone.
                unsafe { acts.raw().quantize_as(r, x, cols, per_super) };
            }
            for range in [0..w.rows, 5..w.rows - 2, 12..14] {
                let n = range.len();
                let mut slow = vec![0f32; batch * n];
                gemm_portable(w, &mut acts, range.clone(), &mut slow, n);
                for (b, x) in xs.iter().enumerate() {
                    for (i, r) in range.clone().enumerate() {
                        let row = w.dequantize_row(r);
                        let exact: f32 = row.iter().zip(x).map(|(a, b)| a * b).sum();
                        let size: f32 = row.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
                        let got = slow[b * n + i];
                        assert!(
                            (got - exact).abs() <= 0.01 * size + 1e-6,
                            "row {r}: {got} vs {exact}"
                        );
                    }
                }
                for path in KernelPath::ALL.into_iter().filter(|p| p.supported()) {
                    let mut fast = vec![f32::NAN; batch * n];
                    gemm_path(path, w, &mut acts, range.clone(), &mut fast, n);
                    for (i, (f, s)) in fast.iter().zip(&slow).enumerate() {
                        assert!(
                            (f - s).abs() <= 1e-4 * s.abs().max(1.0),
                            "{path:?} {:?} rows {range:?} [{i}]: {f} vs {s}",
                            w.parts()[0].kind
                        );
                    }
                }
            }
        }
    }
}

/// What one pass over a part reads, per weight: the codes' bits, one f16
/// scale per 32 (Q6, as Q6_K: an 8-bit one per 16 and an f16 per 256; Q4K,
/// as Q4_K: an 8-bit scale and minimum per 32 and two f16s per 256) and an
/// f16 offset per 32 only where the kind stores one (Q8's is implied).
#[test]
fn parts_read_their_bits_per_weight() {
    let mut rng = Rng::new(13);
    let (rows, cols) = (32, 256);
    // Q4_K keeps its integer scales except where the VNNI loop (which has none) runs
    let q4k = if kernel_path() == KernelPath::Avx512 {
        5.0
    } else {
        4.625
    };
    for (t, bits) in [
        (GgufType::Q4_0, 5.0),
        (GgufType::Q4K, q4k),
        (GgufType::Q5_0, 6.0),
        (GgufType::Q5K, 6.0),
        (GgufType::Q8_0, 8.5),
        (GgufType::Q6K, 6.5625),
    ] {
        let data = gguf_blocks(&mut rng, t, rows * cols / t.block().0);
        let w = QMatrix::from_gguf(t, &data, rows, cols).unwrap();
        let got = 8.0 * w.nbytes() as f64 / (rows * cols) as f64;
        assert_eq!(got, bits, "{t:?}");
    }
}

#[test]
fn gguf_shapes_are_checked() {
    let mut rng = Rng::new(12);
    let data = gguf_blocks(&mut rng, GgufType::Q4K, 4);
    assert!(QMatrix::from_gguf(GgufType::Q4K, &data, 2, 512).is_ok());
    assert!(QMatrix::from_gguf(GgufType::Q4K, &data, 2, 500).is_err()); // not whole blocks
    assert!(QMatrix::from_gguf(GgufType::Q4K, &data[1..], 2, 512).is_err()); // short
    assert!(QMatrix::from_gguf(GgufType::Q4K, &data, 3, 512).is_err());
    let narrow = QMatrix::from_gguf(
        GgufType::Q4_0,
        &gguf_blocks(&mut rng, GgufType::Q4_0, 2),
        1,
        64,
    )
    .unwrap();
    assert!(QMatrix::concat(vec![
        narrow,
        QMatrix::from_gguf(GgufType::Q4K, &data, 2, 512).unwrap()
    ])
    .is_err());
    assert!(QMatrix::concat(vec![]).is_err());
    assert_eq!(GgufType::from_name("Q6_K"), Some(GgufType::Q6K));
    assert_eq!(GgufType::from_name("IQ4_XS"), None);
}

/// Q4_0 blocks decode to ggml's values: d * (nibble - 8), element j in the
/// low nibble of byte j and j + 16 in its high one.
#[test]
fn q4_0_blocks_decode_as_ggml_lays_them_out() {
    let mut block = vec![0u8; 18];
    block[..2].copy_from_slice(&f32_to_f16(0.5).to_le_bytes());
    for j in 0..16 {
        block[2 + j] = (j as u8) | ((15 - j as u8) << 4);
    }
    let row = QMatrix::from_gguf(GgufType::Q4_0, &block, 1, 32)
        .unwrap()
        .dequantize_row(0);
    for j in 0..16 {
        assert_eq!(row[j], 0.5 * (j as f32 - 8.0));
        assert_eq!(row[j + 16], 0.5 * (7.0 - j as f32));
    }
}

#[test]
fn path_names_parse() {
    assert_eq!(KernelPath::from_name(" AVX2 "), Some(KernelPath::Avx2));
    assert_eq!(KernelPath::from_name("avx512"), Some(KernelPath::Avx512));
    assert_eq!(
        KernelPath::from_name("portable"),
        Some(KernelPath::Portable)
    );
    assert_eq!(KernelPath::from_name("sse"), None);
    assert_eq!(
        KernelPath::from_name("NEON-dotprod"),
        Some(KernelPath::NeonDot)
    );
    // a cap stays on its architecture's paths
    for cap in KernelPath::ALL {
        let path = KernelPath::capped_at(cap);
        assert!(path.supported());
        assert!(
            path == KernelPath::Portable || path.name()[..3] == cap.name()[..3],
            "{cap:?} {path:?}"
        );
    }
    assert!(kernel_path().supported());
}

#[test]
fn bad_shapes_are_errors() {
    assert!(QMatrix::from_q4(&[0; 10], &[1.0], &[0.0], 1, 10).is_err());
    assert!(QMatrix::from_q4(&[0; 64], &[1.0], &[0.0], 1, 64).is_err());
    assert!(QMatrix::from_q4(&[], &[], &[], 1, 0).is_err());
    assert!(QMatrix::from_q4(&[16; 32], &[1.0], &[0.0], 1, 32).is_err());
    assert!(QMatrix::quantize_q8(&[0.0; 40], 1, 40).is_err());
}

/// Rows per super-block take llama.cpp's Q8_K rule: the value of largest
/// size maps to -128, its opposite to 127 (not 128), one scale per 256,
/// sums per 16 codes; a super-block of zeros is all zeros.
#[test]
fn super_rows_quantize_as_q8_k() {
    let cols = 512;
    let mut x: Vec<f32> = (0..256).map(|i| ((i % 7) as f32 - 3.0) * 0.25).collect();
    x[5] = 2.0;
    x[9] = -2.0;
    let mut batch = QuantBatch::of_rows_as(&[x.clone()], cols, true);
    let raw = batch.raw();
    let row = raw.row(0, cols);
    // SAFETY: the batch is alive and only read here.
    let (codes, d, sums) = unsafe {
        let codes: Vec<i8> = (0..cols)
            .map(|c| *row.q.add(c / BLOCK * activations::ROW_Q_STEP + c % BLOCK))
            .collect();
        let d: Vec<f32> = (0..cols / BLOCK).map(|b| *row.d.add(b * BATCH)).collect();
        let sums: Vec<i16> = (0..activations::SUMS * 2)
            .map(|i| {
                *row.sums
                    .add(i / activations::SUMS * activations::SUPER_STEP + i % activations::SUMS)
            })
            .collect();
        (codes, d, sums)
    };
    assert_eq!((codes[5], codes[9]), (-128, 127));
    assert_eq!(codes[0], 48); // -0.75 * -128 / 2
    assert!(d[..8].iter().all(|&v| v == 2.0 / -128.0));
    assert!(codes[256..].iter().all(|&c| c == 0) && d[8..].iter().all(|&v| v == 0.0));
    for (h, &s) in sums.iter().enumerate() {
        let own: i32 = codes[h * 16..h * 16 + 16].iter().map(|&c| c as i32).sum();
        assert_eq!(s as i32, own, "sum {h}");
    }
}

#[test]
fn zero_activations_give_offsets_only() {
    let w = QMatrix::from_q4(&[3; 64], &[1.0, 1.0], &[0.5, 0.5], 1, 64).unwrap();
    let mut acts = QuantBatch::of_rows(&[[0.0; 64]], 64);
    let mut out = [1.0f32];
    gemm(&w, &mut acts, 0..1, &mut out, 1);
    assert_eq!(out[0], 0.0);
}

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

    /// `cargo test --release -- --ignored --nocapture kquant_prefill_speed`:
    /// one thread's GMAC/s on a prefill's 512 rows through GGUF k-quant (and
    /// Q8_0) matrices of a 1B model's width, activations quantized per block
    /// of 32 and, for the k-quants, per super-block of 256 (whose AVX2 loop
    /// scales in integers).
    #[test]
    #[ignore]
    fn kquant_prefill_speed() {
        let (n, rows, cols) = (512, 1024, 2048);
        let mut rng = Rng::new(5);
        let rows_x: Vec<Vec<f32>> = (0..n).map(|_| random(&mut rng, cols, 1.0)).collect();
        let mut out = vec![0f32; n * rows];
        for t in [GgufType::Q4K, GgufType::Q6K, GgufType::Q8_0] {
            let data = gguf_blocks(&mut rng, t, rows * cols / t.block().0);
            let w = QMatrix::from_gguf(t, &data, rows, cols).unwrap();
            for per_super in [false, w.per_super_rows()] {
                let mut xs = QuantBatch::of_rows_as(&rows_x, cols, per_super);
                gemm(&w, &mut xs, 0..rows, &mut out, rows);
                let t0 = std::time::Instant::now();
                for _ in 0..4 {
                    gemm(&w, &mut xs, 0..rows, &mut out, rows);
                }
                let secs = t0.elapsed().as_secs_f64() / 4.0;
                println!(
                    "{t:?} rows per super-block {per_super}: {:.1} GMAC/s",
                    (rows * cols * n) as f64 / secs / 1e9
                );
            }
        }
    }
}
