//! The one error type of the core; the binding maps each variant once.

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
