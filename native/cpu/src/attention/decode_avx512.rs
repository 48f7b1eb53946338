//! Hand-written AVX-512 spans for head_dim 64 and 128 (the autovectorised
//! loops reduce each dot product with a chain of scalar adds and keep the
//! output accumulators in memory; here they stay in registers): 2.5x the
//! portable loop at 560 positions, the cache in L2.

use std::arch::x86_64::*;

use super::decode::Span;
use super::layout::load16;
use super::{AttentionShape, KvElem};
use crate::exp::fast_exp;

/// `attend_span` for head_dim = 16 * TILES, in one pass over the cache:
/// block by block, keys then values of the block (contiguous rows, still
/// in L1 for the values), with the softmax kept online (running max and
/// sum per head; the output rescaled when the max grows).
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn span<T: KvElem, const TILES: usize>(
    span: &Span<'_>,
    q: &[f32],
    k: &[T],
    v: &[T],
    part: &mut [f32],
) {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    } = span.shape;
    debug_assert_eq!(head_dim, 16 * TILES);
    let groups = num_heads / num_kv_heads;
    let row_len = num_kv_heads * head_dim;
    assert!(q.len() >= num_heads * head_dim && part.len() >= num_heads * (head_dim + 2));
    let (stats, out) = part.split_at_mut(2 * num_heads);
    let (maxes, sums) = stats.split_at_mut(num_heads);
    maxes.fill(f32::NEG_INFINITY);
    sums.fill(0.0);
    out.fill(0.0);
    // probabilities of the block's positions, [h * block_size + j]
    let mut probs = vec![0.0f32; num_heads * block_size];
    let mut pos = span.first;
    while pos < span.end {
        let block_idx = pos / block_size;
        let stop = span.end.min((block_idx + 1) * block_size);
        let n = stop - pos;
        let first_row = (span.table[block_idx] as usize * block_size + pos % block_size) * row_len;
        // the block's rows lie inside the cache (validated block ids)
        assert!(first_row + n * row_len <= k.len() && first_row + n * row_len <= v.len());
        let keys = k.as_ptr().add(first_row);
        for j in 0..n {
            for kv_head in 0..num_kv_heads {
                let key = keys.add(j * row_len + kv_head * head_dim);
                let kt: [__m512; TILES] = std::array::from_fn(|t| load16(key.add(t * 16)));
                for h in kv_head * groups..(kv_head + 1) * groups {
                    let qh = q.as_ptr().add(h * head_dim);
                    let mut acc = _mm512_mul_ps(_mm512_loadu_ps(qh), kt[0]);
                    for (t, kv) in kt.iter().enumerate().skip(1) {
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh.add(t * 16)), *kv, acc);
                    }
                    probs[h * block_size + j] = _mm512_reduce_add_ps(acc) * span.scale;
                }
            }
        }
        let values = v.as_ptr().add(first_row);
        for h in 0..num_heads {
            let p = &mut probs[h * block_size..][..n];
            let block_max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = maxes[h].max(block_max);
            let correction = fast_exp(maxes[h] - new_max); // 0 on the first block
            maxes[h] = new_max;
            for x in p.iter_mut() {
                *x = fast_exp(*x - new_max);
            }
            sums[h] = sums[h] * correction + p.iter().sum::<f32>();
            let o = out.as_mut_ptr().add(h * head_dim);
            let scale = _mm512_set1_ps(correction);
            let mut acc: [__m512; TILES] =
                std::array::from_fn(|t| _mm512_mul_ps(scale, _mm512_loadu_ps(o.add(t * 16))));
            let col = (h / groups) * head_dim;
            for (j, &w) in p.iter().enumerate() {
                let value = values.add(j * row_len + col);
                let weight = _mm512_set1_ps(w);
                for (t, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(weight, load16(value.add(t * 16)), *a);
                }
            }
            for (t, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.add(t * 16), *a);
            }
        }
        pos = stop;
    }
}
