//! The one mapping from each core and CPU error enum to a Python exception.
//! The matches are exhaustive: a new variant does not compile until it is
//! given its exception here.

use mistralrs_serve_core::{GrammarError, SamplerError, SchedulerError, StopError};
use mistralrs_serve_cpu::{AttentionError, DecoderError, QuantError};
use pyo3::exceptions::{PyKeyError, PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// An error of the Rust crates that Python sees as one exception type.
pub(crate) trait IntoPyErr: std::fmt::Display + Sized {
    fn into_py_err(self) -> PyErr;
}

/// For `map_err`: `result.map_err(to_py_err)`.
pub(crate) fn to_py_err<E: IntoPyErr>(err: E) -> PyErr {
    err.into_py_err()
}

impl IntoPyErr for SamplerError {
    fn into_py_err(self) -> PyErr {
        match self {
            Self::InvalidParam(_) | Self::Shape(_) | Self::TokenOutOfRange { .. } => {
                PyValueError::new_err(self.to_string())
            }
            Self::NoCandidate => PyRuntimeError::new_err(self.to_string()),
        }
    }
}

impl IntoPyErr for SchedulerError {
    fn into_py_err(self) -> PyErr {
        match self {
            Self::UnknownSequence(_) | Self::NotRunning(_) => PyKeyError::new_err(self.to_string()),
            Self::InvalidConfig(_)
            | Self::DuplicateSequence(_)
            | Self::NoReservedSeat(_)
            | Self::TooManyChoices { .. }
            | Self::EmptyPrompt(_)
            | Self::BadSpan { .. }
            | Self::SpanOverBudget { .. }
            | Self::TooLong { .. } => PyValueError::new_err(self.to_string()),
        }
    }
}

impl IntoPyErr for GrammarError {
    fn into_py_err(self) -> PyErr {
        match self {
            Self::Vocabulary(_) | Self::Compile(_) | Self::Shape(_) => {
                PyValueError::new_err(self.to_string())
            }
            // The matcher is left in its sticky error state; Python sees why.
            Self::Matcher(_) => PyRuntimeError::new_err(self.to_string()),
        }
    }
}

impl IntoPyErr for StopError {
    fn into_py_err(self) -> PyErr {
        match self {
            Self::Empty { .. } => PyValueError::new_err(self.to_string()),
        }
    }
}

impl IntoPyErr for AttentionError {
    fn into_py_err(self) -> PyErr {
        match self {
            Self::Shape(_) | Self::Context { .. } | Self::Block { .. } => {
                PyValueError::new_err(self.to_string())
            }
        }
    }
}

impl IntoPyErr for QuantError {
    fn into_py_err(self) -> PyErr {
        match self {
            Self::Shape(_) => PyValueError::new_err(self.to_string()),
        }
    }
}

impl IntoPyErr for DecoderError {
    fn into_py_err(self) -> PyErr {
        match self {
            Self::Shape(_) | Self::Slot { .. } => PyValueError::new_err(self.to_string()),
            Self::Attention(err) => err.into_py_err(),
        }
    }
}
