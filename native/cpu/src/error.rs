//! The errors of the CPU compute; the binding maps each variant once.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum AttentionError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("sequence {seq} has context length {ctx}; it must be >= 1")]
    Context { seq: usize, ctx: i64 },
    #[error("sequence {seq} uses block {block}, outside the cache's {num_blocks} blocks")]
    Block {
        seq: usize,
        block: i64,
        num_blocks: usize,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuantError {
    #[error("{0}")]
    Shape(String),
}

#[derive(Debug, Error)]
pub enum DecoderError {
    #[error("{0}")]
    Shape(String),
    #[error("row {row}: slot {slot} is outside the cache's {slots} slots")]
    Slot { row: usize, slot: i64, slots: usize },
    #[error(transparent)]
    Attention(#[from] AttentionError),
}
