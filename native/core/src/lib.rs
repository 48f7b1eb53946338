//! mistralrs-serve-core: the per-request, per-step bookkeeping of the server
//! in pure Rust (no Python): sampling, the block pool, the prefix cache,
//! continuous-batching scheduling, stop strings, CPU decode attention over
//! the paged cache, grammar masks (llguidance).

pub mod attention;
pub mod block_pool;
pub mod decoder;
pub mod dry;
pub mod error;
pub mod grammar;
pub mod prefix_cache;
pub mod quant;
pub mod rng;
pub mod sampler;
pub mod scheduler;
pub mod stop;

pub use dry::DryParams;
pub use error::{AttentionError, SamplerError, SchedulerError};
pub use grammar::{GrammarError, GrammarMatcher, Vocabulary};
pub use sampler::{sample_batch, sample_row, SampleOutput, SamplingParams, TokenHistory};
pub use scheduler::{Scheduler, SchedulerConfig, SchedulerStats, StepPlan};
pub use stop::{StopError, StopMatcher, StopPush};
