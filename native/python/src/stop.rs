//! Binding of the core's stop-string matcher over decoded text deltas.

use mistralrs_serve_core::StopMatcher;
use pyo3::prelude::*;

use crate::errors::to_py_err;

/// Stop strings over a stream of decoded text deltas (see `mistralrs_serve_core::stop`).
#[pyclass(name = "StopMatcher", module = "mistralrs_serve._native")]
pub struct PyStopMatcher {
    inner: StopMatcher,
}

#[pymethods]
impl PyStopMatcher {
    #[new]
    fn new(stops: Vec<String>) -> PyResult<Self> {
        let inner = StopMatcher::new(stops).map_err(to_py_err)?;
        Ok(Self { inner })
    }

    /// Add decoded text; returns `(text to release now, index of the stop string matched)`.
    fn push(&mut self, delta: &str) -> (String, Option<usize>) {
        let push = self.inner.push(delta);
        (push.release, push.matched)
    }

    /// Release the held-back text at the end of generation.
    fn flush(&mut self) -> String {
        self.inner.flush()
    }

    #[getter]
    fn finished(&self) -> bool {
        self.inner.finished()
    }

    fn __repr__(&self) -> String {
        format!(
            "StopMatcher(stops={:?}, finished={})",
            self.inner.stops(),
            if self.inner.finished() {
                "True"
            } else {
                "False"
            }
        )
    }
}
