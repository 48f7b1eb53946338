//! Attention straight over the paged KV cache, on the CPU.
//!
//! Query rows attend over their cached positions, read block by block
//! through their block table: no gather into a contiguous copy, no padding
//! to the longest context of the batch. The cache layout is the engine's:
//! `[num_blocks, block_size, num_kv_heads, head_dim]` per layer, in f32 or
//! bf16 (stored as `u16` bit patterns).
//!
//! Two entry points: [`paged_decode_attention`] (`decode`), one query row
//! per sequence over its whole context; and [`attend_tile`] (`tile`, with
//! the AVX-512 kernels in `tile16`), a tile of one sequence's rows over one
//! segment of their context, the unit of work the fused decoder spreads over
//! its threads. [`packed_attention`] (`packed`) is the encoders': packed
//! rows of whole sequences, bidirectional, no cache. `check` validates a batch against the cache; `layout` holds
//! the vector loads and transposes the AVX-512 kernels share.

mod check;
mod decode;
#[cfg(target_arch = "x86_64")]
mod decode_avx512;
#[cfg(target_arch = "x86_64")]
mod layout;
mod packed;
mod tile;
#[cfg(target_arch = "x86_64")]
mod tile16;
#[cfg(target_arch = "x86_64")]
mod tile_avx2;

pub use check::check_decode_batch;
pub use decode::paged_decode_attention;
pub use packed::packed_attention;
pub use tile::{
    attend_tile, merge_segments, segment_len, TileQuery, TileScratch, SEGMENT, TILE_ROWS,
};

/// An element type the cache may hold.
pub trait KvElem: Copy + Send + Sync {
    /// bf16 bits rather than f32 (picks the vector load in the AVX-512 kernel).
    const IS_BF16: bool;
    fn to_f32(self) -> f32;
}

impl KvElem for f32 {
    const IS_BF16: bool = false;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

/// bf16 as its bit pattern (numpy has no bf16; torch tensors are viewed as u16).
impl KvElem for u16 {
    const IS_BF16: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}

/// Shape of the model's attention and of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

/// One step's decode batch: a query row and a context per sequence.
pub struct DecodeBatch<'a> {
    /// (num_seqs, num_heads, head_dim) row-major.
    pub q: &'a [f32],
    /// (num_seqs, max_blocks) row-major block ids; entries past a sequence's
    /// last needed block are ignored.
    pub block_tables: &'a [i64],
    pub max_blocks: usize,
    /// Positions each sequence attends over (its cached tokens, the new one included).
    pub context_lens: &'a [i64],
    /// Softmax scale, usually 1 / sqrt(head_dim).
    pub scale: f32,
    /// A sliding window the tables were freed behind: the entries of blocks
    /// wholly before `context - window` (rounded down to a multiple of 8, where
    /// the tiles start) are never read, and may be -1. None: every entry is.
    pub window: Option<usize>,
}

#[cfg(test)]
mod tests;
