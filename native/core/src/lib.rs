//! mistralrs-serve-core: the per-request, per-step bookkeeping of the server
//! in pure Rust (no Python): the continuous-batching scheduler, the KV block
//! pool and prefix cache, the CPU sampler (penalties, DRY, seeded draws),
//! stop tokens and strings, and grammar masks (llguidance). The model's
//! compute on the CPU lives in `mistralrs-serve-cpu`.

pub mod block_pool;
pub mod dry;
pub mod error;
pub mod grammar;
pub mod prefix_cache;
pub mod rng;
pub mod sampler;
pub mod scheduler;
pub mod stop;

pub use dry::DryParams;
pub use error::{SamplerError, SchedulerError};
pub use grammar::{GrammarError, GrammarMatcher, Vocabulary};
pub use sampler::{sample_batch, sample_row, SampleOutput, SamplingParams, TokenHistory};
pub use scheduler::{ContentSpan, Scheduler, SchedulerConfig, SchedulerStats, StepPlan};
pub use stop::{StopError, StopMatcher, StopPush};
