//! The checks a decode batch passes before any kernel reads the cache.

use super::{AttentionShape, DecodeBatch};
use crate::error::AttentionError;

/// Checks a batch against the cache sizes and the output length.
pub fn check_decode_batch(
    shape: AttentionShape,
    batch: &DecodeBatch<'_>,
    k_len: usize,
    v_len: usize,
    out_len: usize,
) -> Result<(), AttentionError> {
    validate(shape, batch, k_len, v_len, out_len).map(|_| ())
}

pub(super) fn validate(
    shape: AttentionShape,
    batch: &DecodeBatch<'_>,
    k_len: usize,
    v_len: usize,
    out_len: usize,
) -> Result<usize, AttentionError> {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    } = shape;
    if num_heads == 0 || num_kv_heads == 0 || head_dim == 0 || block_size == 0 {
        return Err(AttentionError::Shape(format!(
            "every dimension must be > 0: {shape:?}"
        )));
    }
    if !num_heads.is_multiple_of(num_kv_heads) {
        return Err(AttentionError::Shape(format!(
            "num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )));
    }
    let row = num_heads * head_dim;
    if !batch.q.len().is_multiple_of(row) {
        return Err(AttentionError::Shape(format!(
            "q has {} values, not a multiple of num_heads * head_dim = {row}",
            batch.q.len()
        )));
    }
    let num_seqs = batch.q.len() / row;
    if out_len != batch.q.len() {
        return Err(AttentionError::Shape(format!(
            "out has {out_len} values, q has {}",
            batch.q.len()
        )));
    }
    if batch.context_lens.len() != num_seqs
        || batch.block_tables.len() != num_seqs * batch.max_blocks
    {
        return Err(AttentionError::Shape(format!(
            "{num_seqs} query rows but {} context lengths and {} block-table entries for {} columns",
            batch.context_lens.len(),
            batch.block_tables.len(),
            batch.max_blocks
        )));
    }
    let block_elems = block_size * num_kv_heads * head_dim;
    if k_len != v_len || !k_len.is_multiple_of(block_elems) {
        return Err(AttentionError::Shape(format!(
            "k/v caches have {k_len}/{v_len} values; both must be whole blocks of {block_elems}"
        )));
    }
    let num_blocks = k_len / block_elems;
    for (seq, &ctx) in batch.context_lens.iter().enumerate() {
        if ctx < 1 {
            return Err(AttentionError::Context { seq, ctx });
        }
        let needed = (ctx as usize).div_ceil(block_size);
        if needed > batch.max_blocks {
            return Err(AttentionError::Shape(format!(
                "sequence {seq} attends over {ctx} positions: {needed} blocks, the table has {}",
                batch.max_blocks
            )));
        }
        let first_read = batch
            .window
            .map_or(0, |w| (ctx as usize).saturating_sub(w) / 8 * 8 / block_size);
        let table = &batch.block_tables[seq * batch.max_blocks..][first_read..needed];
        if let Some(&block) = table.iter().find(|&&b| b < 0 || b as usize >= num_blocks) {
            return Err(AttentionError::Block {
                seq,
                block,
                num_blocks,
            });
        }
    }
    Ok(num_seqs)
}
