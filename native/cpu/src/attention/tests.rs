//! The kernels against a plain f64 softmax reference, and a row's partials
//! bit for bit whatever tile it runs in.

use super::*;
use crate::error::AttentionError;
use crate::exp::fast_exp;

/// A whole row's attention through segments and their merge.
#[allow(clippy::too_many_arguments)]
fn attend_full<T: KvElem>(
    shape: AttentionShape,
    table: &[i64],
    ctx: usize,
    q: &[f32],
    scale: f32,
    k: &[T],
    v: &[T],
    out: &mut [f32],
) {
    let segments = ctx.div_ceil(SEGMENT);
    let len = segment_len(shape);
    let mut parts = vec![0f32; segments * len];
    let mut scratch = TileScratch::default();
    for s in 0..segments {
        let ends = [ctx.min((s + 1) * SEGMENT)];
        let tile = TileQuery {
            table,
            first: s * SEGMENT,
            ends: &ends,
            starts: None,
            q,
            scale,
            softcap: None,
        };
        for kv_head in 0..shape.num_kv_heads {
            let out = [parts.as_mut_ptr().wrapping_add(s * len)];
            // SAFETY: parts holds every segment's heads.
            unsafe { attend_tile(shape, &tile, kv_head..kv_head + 1, k, v, &out, &mut scratch) };
        }
    }
    merge_segments(&parts, segments, shape, out);
}

/// The default model's attention, for the speed tests.
const DEFAULT_MODEL: AttentionShape = AttentionShape {
    num_heads: 9,
    num_kv_heads: 3,
    head_dim: 64,
    block_size: 16,
};

/// `cargo test --release -- --ignored --nocapture tile_speed`: a 512-token
/// prefill's attention on one thread (the default model's shape).
#[test]
#[ignore]
fn tile_speed() {
    let shape = DEFAULT_MODEL;
    let n = 512;
    let mut seed = 3u64;
    let elems = n * 3 * 64;
    let k: Vec<u16> = (0..elems)
        .map(|_| (lcg(&mut seed).to_bits() >> 16) as u16)
        .collect();
    let table: Vec<i64> = (0..(n / 16) as i64).collect();
    let q: Vec<f32> = (0..n * 9 * 64).map(|_| lcg(&mut seed)).collect();
    let len = segment_len(shape);
    let mut parts = vec![0f32; n * 4 * len];
    let mut scratch = TileScratch::default();
    let reps = 10;
    let t = std::time::Instant::now();
    let mut items = 0usize;
    for r0 in (0..n * reps).step_by(TILE_ROWS).map(|r| r % n) {
        let ctxs: Vec<usize> = (r0 + 1..r0 + TILE_ROWS + 1).collect();
        for seg in 0..ctxs[TILE_ROWS - 1].div_ceil(SEGMENT) {
            let first = seg * SEGMENT;
            let reach = ctxs.partition_point(|&c| c <= first);
            let ends: Vec<usize> = ctxs[reach..]
                .iter()
                .map(|&c| c.min(first + SEGMENT))
                .collect();
            items += ends
                .iter()
                .map(|e| (e - first).div_ceil(16) * 9)
                .sum::<usize>();
            let tile = TileQuery {
                table: &table,
                first,
                ends: &ends,
                starts: None,
                q: &q[(r0 + reach) * 9 * 64..][..ends.len() * 9 * 64],
                scale: 0.125,
                softcap: None,
            };
            let outs: Vec<*mut f32> = (0..ends.len())
                .map(|i| {
                    parts
                        .as_mut_ptr()
                        .wrapping_add(((r0 + reach + i) * 4 + seg) * len)
                })
                .collect();
            // SAFETY: one part per row and segment.
            unsafe { attend_tile(shape, &tile, 0..3, &k, &k, &outs, &mut scratch) };
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "512-row prefill, one layer: {:.2} ms, {:.1} ns per (row, head, 16 positions)",
        secs * 1e3 / reps as f64,
        secs * 1e9 / items as f64
    );
}

/// `cargo test --release -- --ignored --nocapture decode_speed`: one
/// decode row's attention over 384 positions, one layer, one thread.
#[test]
#[ignore]
fn decode_speed() {
    let shape = DEFAULT_MODEL;
    let ctx = 384;
    let mut seed = 5u64;
    // as many rows' caches as a decode batch's layers hold: far past L3
    let copies = 1024;
    let elems = copies * ctx * 3 * 64;
    let k: Vec<u16> = (0..elems).map(|i| (i as u16) & 0x3fff).collect();
    let tables: Vec<Vec<i64>> = (0..copies)
        .map(|c| ((c * ctx / 16) as i64..((c + 1) * ctx / 16) as i64).collect())
        .collect();
    let q: Vec<f32> = (0..9 * 64).map(|_| lcg(&mut seed)).collect();
    let len = segment_len(shape);
    let mut parts = vec![0f32; 3 * len];
    let mut scratch = TileScratch::default();
    let reps = 2000;
    let t = std::time::Instant::now();
    for rep in 0..reps {
        let table = &tables[(rep * 7) % copies];
        for seg in 0..3 {
            let ends = [(seg + 1) * SEGMENT];
            let tile = TileQuery {
                table,
                first: seg * SEGMENT,
                ends: &ends,
                starts: None,
                q: &q,
                scale: 0.125,
                softcap: None,
            };
            let out = [parts.as_mut_ptr().wrapping_add(seg * len)];
            // SAFETY: one part per segment.
            unsafe { attend_tile(shape, &tile, 0..3, &k, &k, &out, &mut scratch) };
        }
    }
    let secs = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "decode row, ctx {ctx}, one layer: {:.2} us, {:.1} ns per (head, 16 positions)",
        secs * 1e6,
        secs * 1e9 / (9 * ctx / 16) as f64
    );
}

/// Softmax weights of `scores`, soft-capped at `cap` first where there is one.
fn softmax64(scores: &[f64], cap: Option<f64>) -> Vec<f64> {
    let s: Vec<f64> = scores
        .iter()
        .map(|&v| cap.map_or(v, |c| c * (v / c).tanh()))
        .collect();
    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
    let total: f64 = e.iter().sum();
    e.iter().map(|v| v / total).collect()
}

/// A tile of windowed rows with soft-capped scores (Gemma 2's `cap tanh(s /
/// cap)`) against an f64 reference, whose scores without the cap give
/// weights far from these.
#[test]
fn soft_capped_scores_match_the_reference() {
    let shape = AttentionShape {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        block_size: 8,
    };
    let (d, cap, mut seed) = (16, 1.5f32, 5u64);
    let elems = 8 * 8 * 2 * d;
    let k: Vec<f32> = (0..elems).map(|_| 3.0 * lcg(&mut seed)).collect();
    let v: Vec<f32> = (0..elems).map(|_| lcg(&mut seed)).collect();
    let table: Vec<i64> = (0..8).rev().collect();
    let (ends, starts) = ([40, 41, 60], [20, 21, 30]);
    let q: Vec<f32> = (0..3 * 4 * d).map(|_| 3.0 * lcg(&mut seed)).collect();
    let len = segment_len(shape);
    let mut parts = vec![0f32; 3 * len];
    let outs: Vec<*mut f32> = (0..3)
        .map(|i| parts.as_mut_ptr().wrapping_add(i * len))
        .collect();
    let tile = TileQuery {
        table: &table,
        first: 0,
        ends: &ends,
        starts: Some(&starts),
        q: &q,
        scale: 0.25,
        softcap: Some(cap),
    };
    let mut scratch = TileScratch::default();
    // SAFETY: one part per row.
    unsafe { attend_tile(shape, &tile, 0..2, &k, &v, &outs, &mut scratch) };
    let at = |p: usize, kv: usize| ((table[p / 8] as usize * 8 + p % 8) * 2 + kv) * d;
    let mut uncapped_gap = 0f64;
    for i in 0..3 {
        let mut got = vec![0f32; 4 * d];
        merge_segments(&parts[i * len..][..len], 1, shape, &mut got);
        for h in 0..4 {
            let qh = &q[(i * 4 + h) * d..][..d];
            let score = |p: usize| {
                let s: f64 = qh
                    .iter()
                    .zip(&k[at(p, h / 2)..][..d])
                    .map(|(a, b)| (a * b) as f64)
                    .sum();
                s * 0.25
            };
            let scores: Vec<f64> = (starts[i]..ends[i]).map(score).collect();
            let (w, plain) = (
                softmax64(&scores, Some(cap as f64)),
                softmax64(&scores, None),
            );
            uncapped_gap = w
                .iter()
                .zip(&plain)
                .fold(uncapped_gap, |a, (x, y)| a.max((x - y).abs()));
            for c in 0..d {
                let want: f64 = (starts[i]..ends[i])
                    .zip(&w)
                    .map(|(p, w)| w * v[at(p, h / 2) + c] as f64)
                    .sum();
                let g = got[h * d + c] as f64;
                assert!(
                    (g - want).abs() <= 1e-4,
                    "row {i} head {h} [{c}]: {g} vs {want}"
                );
            }
        }
    }
    assert!(
        uncapped_gap > 0.1,
        "the cap changes the weights: {uncapped_gap}"
    );
}

#[test]
fn a_row_is_the_same_in_any_tile() {
    // rows of one sequence at consecutive positions, tiled as a prefill
    // chunk would be, against each row alone: bit-identical partials
    let shape = AttentionShape {
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 32,
        block_size: 16,
    };
    let (mut seed, num_blocks) = (11u64, 24);
    let mut bf16s = || -> Vec<u16> {
        (0..num_blocks * 16 * 2 * 32)
            .map(|_| (lcg(&mut seed).to_bits() >> 16) as u16)
            .collect()
    };
    let (k, v) = (bf16s(), bf16s());
    let table: Vec<i64> = (0..num_blocks as i64)
        .map(|b| (b * 5) % num_blocks as i64)
        .collect();
    let len = segment_len(shape);
    let mut scratch = TileScratch::default();
    for (first, ends) in [
        (0, vec![1, 2, 3, 4, 5, 6, 7, 8]),
        (128, vec![130, 131, 150]),
        (256, vec![300, 301, 302, 303, 304, 305, 306, 307]),
        (0, vec![128, 128, 17, 16]),
        (128, (140..140 + TILE_ROWS).collect()),
    ] {
        let q: Vec<f32> = (0..ends.len() * 6 * 32).map(|_| lcg(&mut seed)).collect();
        let tile = TileQuery {
            table: &table,
            first,
            ends: &ends,
            starts: None,
            q: &q,
            scale: 0.2,
            softcap: None,
        };
        let mut together = vec![0f32; ends.len() * len];
        let mut alone = vec![0f32; ends.len() * len];
        // the whole tile, every kv head in one unit...
        let outs: Vec<*mut f32> = (0..ends.len())
            .map(|i| together.as_mut_ptr().wrapping_add(i * len))
            .collect();
        // SAFETY: one part per row.
        unsafe { attend_tile(shape, &tile, 0..2, &k, &v, &outs, &mut scratch) };
        // ...and each row alone, a kv head at a time
        for kv_head in 0..2 {
            for i in 0..ends.len() {
                let one = TileQuery {
                    ends: &ends[i..i + 1],
                    starts: None,
                    q: &q[i * 6 * 32..][..6 * 32],
                    ..tile
                };
                let out = [alone.as_mut_ptr().wrapping_add(i * len)];
                // SAFETY: as above.
                unsafe {
                    attend_tile(
                        shape,
                        &one,
                        kv_head..kv_head + 1,
                        &k,
                        &v,
                        &out,
                        &mut scratch,
                    )
                };
            }
        }
        assert!(
            together
                .iter()
                .zip(&alone)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "tile {first} {ends:?}"
        );
    }
}

/// `cargo test --release -- --ignored --nocapture row_speed`
#[test]
#[ignore]
fn row_speed() {
    let shape = DEFAULT_MODEL;
    let ctx = 640;
    let blocks = ctx / 16;
    let k = vec![0x3f80u16; blocks * 16 * 3 * 64];
    let table: Vec<i64> = (0..blocks as i64).collect();
    let q = vec![0.01f32; 9 * 64];
    let mut out = vec![0f32; 9 * 64];
    let reps = 2000;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        attend_full(shape, &table, ctx, &q, 0.125, &k, &k, &mut out);
    }
    let per = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "attend segments, ctx {ctx}: {:.1} us per row (all heads), {:.1} ns per position",
        per * 1e6,
        per * 1e9 / ctx as f64
    );
    let batch = DecodeBatch {
        q: &q,
        block_tables: &table,
        max_blocks: blocks,
        context_lens: &[ctx as i64],
        scale: 0.125,
        window: None,
    };
    let t = std::time::Instant::now();
    for _ in 0..reps {
        paged_decode_attention(shape, &batch, &k, &k, &mut out).unwrap();
    }
    let per = t.elapsed().as_secs_f64() / reps as f64;
    println!("decode kernel ctx {ctx}: {:.1} us per row", per * 1e6);
}

#[test]
fn bf16_cache_rows_match_the_reference() {
    // a bf16 cache takes the bf16-pair kernels where the CPU has them
    // (queries and weights rounded to bf16 too): against the reference
    // on the same cached values, within bf16 rounding
    // (whole chunks of 16 are read in place where a block holds them:
    // blocks of 16 and 32; blocks of 8 are copied)
    let mut seed = 21u64;
    for (heads, kv_heads, d, ctx, bs) in [
        (9, 3, 64, 300usize, 16usize),
        (4, 2, 32, 17, 16),
        (2, 1, 128, 129, 16),
        (8, 8, 64, 40, 16),
        (9, 3, 64, 150, 32),
        (4, 2, 64, 70, 8),
    ] {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
            block_size: bs,
        };
        let num_blocks = ctx.div_ceil(bs) + 1;
        let len = num_blocks * bs * kv_heads * d;
        let bf16 = |v: f32| (v.to_bits() >> 16) as u16;
        let k: Vec<u16> = (0..len).map(|_| bf16(lcg(&mut seed) * 2.0)).collect();
        let v: Vec<u16> = (0..len).map(|_| bf16(lcg(&mut seed))).collect();
        let widen = |x: &[u16]| {
            x.iter()
                .map(|&b| f32::from_bits((b as u32) << 16))
                .collect::<Vec<f32>>()
        };
        let table: Vec<i64> = (0..num_blocks as i64).rev().collect();
        let q: Vec<f32> = (0..heads * d).map(|_| lcg(&mut seed)).collect();
        let scale = 1.0 / (d as f32).sqrt();
        let (out, want) = with_reference(
            shape,
            &table,
            ctx,
            &q,
            scale,
            (&k, &v),
            (&widen(&k), &widen(&v)),
        );
        let worst = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 3e-3, "{shape:?} ctx {ctx}: worst error {worst}");
    }
}

#[test]
fn rows_match_the_reference() {
    let mut seed = 7u64;
    let mut next = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let cases: [(usize, usize, usize, usize, usize); 6] = [
        (16, 9, 3, 64, 37),
        (16, 4, 2, 32, 16),
        (4, 6, 2, 16, 9),
        (16, 2, 1, 128, 1),
        (8, 8, 1, 64, 100),
        (16, 9, 3, 64, 300),
    ];
    for (block_size, heads, kv_heads, d, ctx) in cases {
        let shape = AttentionShape {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: d,
            block_size,
        };
        let num_blocks = ctx.div_ceil(block_size) + 2;
        let cache_len = num_blocks * block_size * kv_heads * d;
        let k: Vec<f32> = (0..cache_len).map(|_| next()).collect();
        let v: Vec<f32> = (0..cache_len).map(|_| next()).collect();
        let table: Vec<i64> = (0..num_blocks as i64).rev().collect();
        let q: Vec<f32> = (0..heads * d).map(|_| next() * 2.0).collect();
        let (out, want) = with_reference(shape, &table, ctx, &q, 0.3, (&k, &v), (&k, &v));
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "{shape:?}: {a} vs {b}");
        }
    }
}

/// One row through segments and their merge, and the reference on the
/// same cache (`wide`: its values as f32).
fn with_reference<T: KvElem>(
    shape: AttentionShape,
    table: &[i64],
    ctx: usize,
    q: &[f32],
    scale: f32,
    (k, v): (&[T], &[T]),
    wide: (&[f32], &[f32]),
) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0f32; q.len()];
    attend_full(shape, table, ctx, q, scale, k, v, &mut out);
    let ctxs = [ctx as i64];
    let batch = DecodeBatch {
        q,
        block_tables: table,
        max_blocks: table.len(),
        context_lens: &ctxs,
        scale,
        window: None,
    };
    (out, reference(shape, &batch, wide.0, wide.1))
}

/// Plain softmax attention over positions laid out by the table.
fn reference(shape: AttentionShape, batch: &DecodeBatch<'_>, k: &[f32], v: &[f32]) -> Vec<f32> {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim: d,
        block_size,
    } = shape;
    let groups = num_heads / num_kv_heads;
    let n = batch.context_lens.len();
    let mut out = vec![0.0f32; n * num_heads * d];
    for s in 0..n {
        let ctx = batch.context_lens[s] as usize;
        for h in 0..num_heads {
            let kvh = h / groups;
            let q = &batch.q[(s * num_heads + h) * d..][..d];
            let row = |p: usize| {
                let b = batch.block_tables[s * batch.max_blocks + p / block_size] as usize;
                ((b * block_size + p % block_size) * num_kv_heads + kvh) * d
            };
            let scores: Vec<f64> = (0..ctx)
                .map(|p| {
                    let kr = &k[row(p)..][..d];
                    q.iter()
                        .zip(kr)
                        .map(|(a, b)| (*a as f64) * (*b as f64))
                        .sum::<f64>()
                        * batch.scale as f64
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let z: f64 = w.iter().sum();
            for j in 0..d {
                let acc: f64 = (0..ctx).map(|p| w[p] * v[row(p) + j] as f64).sum();
                out[(s * num_heads + h) * d + j] = (acc / z) as f32;
            }
        }
    }
    out
}

fn lcg(state: &mut u64) -> f32 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn case(shape: AttentionShape, ctxs: &[i64], num_blocks: usize, seed: u64) {
    let mut st = seed;
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    } = shape;
    let n = ctxs.len();
    let elems = num_blocks * block_size * num_kv_heads * head_dim;
    let k: Vec<f32> = (0..elems).map(|_| lcg(&mut st) * 2.0).collect();
    let v: Vec<f32> = (0..elems).map(|_| lcg(&mut st)).collect();
    let q: Vec<f32> = (0..n * num_heads * head_dim)
        .map(|_| lcg(&mut st) * 2.0)
        .collect();
    let max_blocks = ctxs
        .iter()
        .map(|&c| (c as usize).div_ceil(block_size))
        .max()
        .unwrap();
    // a shuffled table per sequence, unused entries -1
    let mut tables = vec![-1i64; n * max_blocks];
    for s in 0..n {
        for j in 0..(ctxs[s] as usize).div_ceil(block_size) {
            tables[s * max_blocks + j] = ((s * 7 + j * 13 + 3) % num_blocks) as i64;
        }
    }
    let batch = DecodeBatch {
        q: &q,
        block_tables: &tables,
        max_blocks,
        context_lens: ctxs,
        scale: 1.0 / (head_dim as f32).sqrt(),
        window: None,
    };
    let want = reference(shape, &batch, &k, &v);
    let mut got = vec![f32::NAN; q.len()];
    paged_decode_attention(shape, &batch, &k, &v, &mut got).unwrap();
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 2e-5 + 2e-5 * b.abs(),
            "f32 {i}: {a} vs {b}"
        );
    }
    // bf16 cache: the reference over the rounded values
    let to_bf16 = |x: &f32| (x.to_bits() >> 16) as u16;
    let (kb, vb): (Vec<u16>, Vec<u16>) = (
        k.iter().map(to_bf16).collect(),
        v.iter().map(to_bf16).collect(),
    );
    let (kr, vr): (Vec<f32>, Vec<f32>) = (
        kb.iter().map(|x| x.to_f32()).collect(),
        vb.iter().map(|x| x.to_f32()).collect(),
    );
    let want = reference(shape, &batch, &kr, &vr);
    paged_decode_attention(shape, &batch, &kb, &vb, &mut got).unwrap();
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 2e-5 + 2e-5 * b.abs(),
            "bf16 {i}: {a} vs {b}"
        );
    }
}

#[test]
fn matches_reference_over_shapes() {
    let smol = AttentionShape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
    };
    case(smol, &[1], 4, 1);
    case(smol, &[15, 16, 17, 33], 16, 2);
    case(smol, &[600, 3, 250], 64, 3); // parallel path (>= 4096 positions)
    let odd = AttentionShape {
        num_heads: 7,
        num_kv_heads: 7,
        head_dim: 37,
        block_size: 5,
    };
    case(odd, &[1, 11, 24], 12, 4);
    let mqa = AttentionShape {
        num_heads: 4,
        num_kv_heads: 1,
        head_dim: 8,
        block_size: 1,
    };
    case(mqa, &[9, 2], 12, 5);
}

#[test]
fn rejects_bad_plans() {
    let shape = AttentionShape {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        block_size: 2,
    };
    let cache = vec![0.0f32; 3 * 2 * 4];
    let q = vec![0.0f32; 8];
    let mut out = vec![0.0f32; 8];
    let run = |tables: &[i64], ctx: &[i64], out: &mut [f32]| {
        let batch = DecodeBatch {
            q: &q,
            block_tables: tables,
            max_blocks: 2,
            context_lens: ctx,
            scale: 1.0,
            window: None,
        };
        paged_decode_attention(shape, &batch, &cache, &cache, out)
    };
    assert!(run(&[0, 1], &[4], &mut out).is_ok());
    assert!(matches!(
        run(&[0, 3], &[4], &mut out),
        Err(AttentionError::Block { block: 3, .. })
    ));
    assert!(matches!(
        run(&[0, -1], &[4], &mut out),
        Err(AttentionError::Block { .. })
    ));
    assert!(run(&[0, -1], &[2], &mut out).is_ok()); // unused entry ignored
    assert!(matches!(
        run(&[0, 1], &[0], &mut out),
        Err(AttentionError::Context { .. })
    ));
    assert!(matches!(
        run(&[0, 1], &[5], &mut out),
        Err(AttentionError::Shape(_))
    ));
    assert!(matches!(
        run(&[0, 1], &[4], &mut out[..4]),
        Err(AttentionError::Shape(_))
    ));
}

#[test]
fn fast_exp_is_accurate() {
    let mut x = -100.0f32;
    while x <= 0.0 {
        let (got, want) = (fast_exp(x) as f64, (x as f64).exp());
        if x >= -87.0 {
            // the f32 rounding of x * log2(e) grows with |x|
            let rel = 2e-7 + 8e-8 * (x.abs() as f64);
            assert!(
                (got - want).abs() <= rel * want,
                "exp({x}) = {got}, want {want}"
            );
        } else {
            assert!(got <= 1e-37);
        }
        x += 0.0137;
    }
    assert_eq!(fast_exp(0.0), 1.0);
}
