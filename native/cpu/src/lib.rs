//! mistralrs-serve-cpu: the model's compute on the CPU, in pure Rust (no
//! Python): a fused decoder step over the paged KV cache, decode and prefill
//! attention over that cache, and block-quantized (4/8-bit) weight matrices
//! with their integer products. Each kernel picks its instruction set at run
//! time (AVX-512 where the CPU has it, AVX2, else portable loops).

pub mod attention;
pub mod decoder;
pub mod error;
pub mod exp;
pub mod quant;

pub use error::{AttentionError, DecoderError, QuantError};
