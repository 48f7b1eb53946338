//! mistralrs-serve-core: the per-request, per-step bookkeeping of the server
//! in pure Rust (no Python): sampling now; scheduling, the block pool, the
//! prefix cache and grammar masks as they arrive.

pub mod dry;
pub mod error;
pub mod rng;
pub mod sampler;

pub use dry::DryParams;
pub use error::SamplerError;
pub use sampler::{sample_batch, sample_row, SampleOutput, SamplingParams, TokenHistory};
