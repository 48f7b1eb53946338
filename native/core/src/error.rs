//! The errors of the core; the binding maps each variant once.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SamplerError {
    #[error("invalid sampling parameter: {0}")]
    InvalidParam(String),
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("token id {id} is out of range for a vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("no token can be sampled: every logit is -inf or NaN after processing")]
    NoCandidate,
}

#[derive(Debug, Error, Clone, PartialEq)]
pub enum SchedulerError {
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    #[error("sequence {0} already exists")]
    DuplicateSequence(u64),
    #[error("sequence {0} is unknown (finished or never added)")]
    UnknownSequence(u64),
    #[error("sequence {0} is not running")]
    NotRunning(u64),
    #[error("sequence {0} has no fork seat left (add it with add_group)")]
    NoReservedSeat(u64),
    #[error("sequence {seq_id} asks for {wanted} choices; at most {max} sequences run at once")]
    TooManyChoices {
        seq_id: u64,
        wanted: usize,
        max: usize,
    },
    #[error("sequence {0} has an empty prompt")]
    EmptyPrompt(u64),
    #[error(
        "sequence {seq_id}: content span {start}..{end} is empty or outside its {len}-token prompt"
    )]
    BadSpan {
        seq_id: u64,
        start: usize,
        end: usize,
        len: usize,
    },
    #[error(
        "sequence {seq_id}: a whole content span of {len} tokens exceeds the step budget of {budget}"
    )]
    SpanOverBudget {
        seq_id: u64,
        len: usize,
        budget: usize,
    },
    #[error("sequence {seq_id} needs {needed} KV blocks; the cache has {available}")]
    TooLong {
        seq_id: u64,
        needed: usize,
        available: usize,
    },
}
