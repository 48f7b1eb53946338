//! Binding of the core's llguidance grammars: vocabulary, matchers, and the
//! batch bitmask fill with the GIL released.

use mistralrs_serve_core::grammar::{
    apply_bitmask, bitmask_words, fill_bitmasks, ConstraintKind, GrammarMatcher, Vocabulary,
};
use numpy::PyReadwriteArray2;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::convert::{logits_array, readwrite};
use crate::errors::to_py_err;

/// The tokenizer's side of grammars, built once per model.
#[pyclass(frozen, name = "GrammarVocabulary", module = "mistralrs_serve._native")]
pub struct PyGrammarVocabulary {
    inner: Vocabulary,
}

#[pymethods]
impl PyGrammarVocabulary {
    /// `tokens[i]`: the bytes of token i (special tokens prefixed with 0xFF,
    /// empty for ids no text maps to); `eos_ids[0]` is the grammar's EOS.
    #[new]
    fn new(py: Python<'_>, tokens: Vec<Bound<'_, PyBytes>>, eos_ids: Vec<u32>) -> PyResult<Self> {
        let tokens: Vec<Vec<u8>> = tokens.iter().map(|t| t.as_bytes().to_vec()).collect();
        let inner = py
            .detach(|| Vocabulary::new(tokens, eos_ids))
            .map_err(to_py_err)?;
        Ok(Self { inner })
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// u32 words per bitmask row.
    #[getter]
    fn words_per_row(&self) -> usize {
        bitmask_words(self.inner.vocab_size())
    }

    /// A matcher for `source`, a grammar of `kind` (regex, json_schema,
    /// json_object, lark, llguidance). ValueError when it does not compile.
    fn compile(&self, py: Python<'_>, kind: &str, source: &str) -> PyResult<PyGrammarMatcher> {
        let kind = ConstraintKind::parse(kind).ok_or_else(|| {
            PyValueError::new_err(format!(
                "unknown grammar type {kind:?}; expected regex, json_schema, json_object, lark or llguidance"
            ))
        })?;
        let inner = py
            .detach(|| self.inner.compile(kind, source))
            .map_err(to_py_err)?;
        Ok(PyGrammarMatcher { inner })
    }
}

/// The grammar state of one sequence.
#[pyclass(name = "GrammarMatcher", module = "mistralrs_serve._native")]
pub struct PyGrammarMatcher {
    inner: GrammarMatcher,
}

#[pymethods]
impl PyGrammarMatcher {
    /// Advance over a sampled token. RuntimeError when the grammar rejects it
    /// (the matcher then stays in error).
    fn consume(&mut self, token: u32) -> PyResult<()> {
        self.inner.consume(token).map_err(to_py_err)
    }

    fn rollback(&mut self, num_tokens: usize) -> PyResult<()> {
        self.inner.rollback(num_tokens).map_err(to_py_err)
    }

    fn fork(&self) -> Self {
        Self {
            inner: self.inner.fork(),
        }
    }

    fn is_accepting(&mut self) -> bool {
        self.inner.is_accepting()
    }

    #[getter]
    fn is_stopped(&self) -> bool {
        self.inner.is_stopped()
    }

    #[getter]
    fn error(&self) -> Option<String> {
        self.inner.error()
    }
}

fn bitmask_array<'py>(obj: &Bound<'py, PyAny>) -> PyResult<PyReadwriteArray2<'py, u32>> {
    readwrite("bitmask", "a writeable, C-contiguous 2-D uint32 array", obj)
}

/// Fill row i of `bitmask` (rows x words_per_row, uint32) from matcher i, in
/// parallel with the GIL released. Returns each row's error message or None;
/// a failed row is all zero.
#[pyfunction]
pub fn fill_token_bitmasks(
    py: Python<'_>,
    matchers: Vec<Bound<'_, PyGrammarMatcher>>,
    bitmask: Bound<'_, PyAny>,
) -> PyResult<Vec<Option<String>>> {
    let mut out = bitmask_array(&bitmask)?;
    let words = out.as_array().ncols();
    if out.as_array().nrows() != matchers.len() {
        return Err(PyValueError::new_err(format!(
            "bitmask has {} rows for {} matchers",
            out.as_array().nrows(),
            matchers.len()
        )));
    }
    let mut guards = matchers
        .iter()
        .map(|m| {
            m.try_borrow_mut()
                .map_err(|_| PyValueError::new_err("a matcher is listed twice or is in use"))
        })
        .collect::<PyResult<Vec<_>>>()?;
    let mut inner: Vec<&mut GrammarMatcher> = guards.iter_mut().map(|g| &mut g.inner).collect();
    let out = out.as_slice_mut().expect("checked C-contiguous");
    let errors = py
        .detach(|| fill_bitmasks(&mut inner, out, words))
        .map_err(to_py_err)?;
    Ok(errors
        .into_iter()
        .map(|e| e.map(|e| e.to_string()))
        .collect())
}

/// Set `logits[r, t]` (float32, rows x vocab) to -inf where bit t of
/// `bitmask` row r is 0.
#[pyfunction]
pub fn apply_token_bitmask(
    py: Python<'_>,
    logits: Bound<'_, PyAny>,
    bitmask: Bound<'_, PyAny>,
) -> PyResult<()> {
    let mut logits = logits_array(&logits)?;
    let vocab = logits.as_array().ncols();
    let mask = bitmask_array(&bitmask)?;
    let words = mask.as_array().ncols();
    let mask = mask.as_slice().expect("checked C-contiguous");
    let rows = logits.as_slice_mut().expect("checked C-contiguous");
    py.detach(|| apply_bitmask(rows, vocab, mask, words))
        .map_err(to_py_err)
}
