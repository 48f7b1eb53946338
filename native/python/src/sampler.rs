//! Binding of the core's CPU sampler: validated sampling options, and one
//! `sample` call per step over a batch of logits rows with the GIL released.

use mistralrs_serve_core::{sample_batch, DryParams, SampleOutput, SamplingParams, TokenHistory};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::convert::{logits_array, matrix, token_arrays};
use crate::errors::to_py_err;
use crate::scheduler::PyScheduler;

/// Validated sampling options of one request, built once per request.
#[pyclass(frozen, name = "SamplingParams", module = "mistralrs_serve._native")]
pub struct PySamplingParams {
    inner: SamplingParams,
}

#[pymethods]
impl PySamplingParams {
    #[new]
    #[pyo3(signature = (
        *, temperature = 1.0, top_k = 0, top_p = 1.0, min_p = 0.0, repetition_penalty = 1.0,
        presence_penalty = 0.0, frequency_penalty = 0.0, logit_bias = Vec::new(),
        dry_multiplier = 0.0, dry_base = 1.75, dry_allowed_length = 2,
        dry_sequence_breakers = Vec::new(), seed = 0, return_logprob = false, num_top_logprobs = 0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        temperature: f32,
        top_k: usize,
        top_p: f32,
        min_p: f32,
        repetition_penalty: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        logit_bias: Vec<(u32, f32)>,
        dry_multiplier: f32,
        dry_base: f32,
        dry_allowed_length: usize,
        dry_sequence_breakers: Vec<u32>,
        seed: u64,
        return_logprob: bool,
        num_top_logprobs: usize,
    ) -> PyResult<Self> {
        let dry = (dry_multiplier != 0.0).then_some(DryParams {
            multiplier: dry_multiplier,
            base: dry_base,
            allowed_length: dry_allowed_length,
            sequence_breakers: dry_sequence_breakers,
        });
        let inner = SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            dry,
            seed,
            return_logprob,
            num_top_logprobs,
        };
        inner.validate().map_err(to_py_err)?;
        Ok(Self { inner })
    }

    #[getter]
    fn temperature(&self) -> f32 {
        self.inner.temperature
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.inner.seed
    }

    #[getter]
    fn num_top_logprobs(&self) -> usize {
        self.inner.num_top_logprobs
    }

    fn __repr__(&self) -> String {
        format!("{:?}", self.inner)
    }
}

type SampleArrays<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray2<f32>>,
);

/// Sample one token per row of `logits` (modified in place). Returns
/// `(token_ids, logprobs, top_ids, top_logprobs)`; logprobs are NaN where
/// not asked for, and the top arrays are padded with -1 / NaN to the widest
/// row's `num_top_logprobs`.
///
/// Row i's history (for penalties and DRY) is read where it lives: the
/// scheduler's tokens of `seq_ids[i]`, borrowed, not copied; or, for a caller
/// without a scheduler, `prompt_ids[i]` and `output_ids[i]`.
#[pyfunction]
#[pyo3(signature = (logits, params, steps, scheduler = None, seq_ids = None, *, prompt_ids = None, output_ids = None))]
#[allow(clippy::too_many_arguments)]
pub fn sample<'py>(
    py: Python<'py>,
    logits: Bound<'py, PyAny>,
    params: Vec<Bound<'py, PySamplingParams>>,
    steps: Vec<u64>,
    scheduler: Option<Bound<'py, PyScheduler>>,
    seq_ids: Option<Vec<u64>>,
    prompt_ids: Option<Vec<Bound<'py, PyAny>>>,
    output_ids: Option<Vec<Bound<'py, PyAny>>>,
) -> PyResult<SampleArrays<'py>> {
    let mut logits = logits_array(&logits)?;
    let vocab_size = logits.as_array().ncols();
    let rows = logits
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("logits must be aligned"))?;
    // Shared borrow while the GIL is released: only the engine thread, which is
    // here, mutates the scheduler; other threads only read its counters.
    let sched = scheduler.as_ref().map(|s| s.borrow());
    let arrays;
    let histories = match (&sched, &seq_ids, &prompt_ids, &output_ids) {
        (Some(sched), Some(ids), None, None) => sched.histories(ids)?,
        (None, None, Some(prompts), Some(outputs)) => {
            arrays = explicit_histories(prompts, outputs)?;
            arrays
                .0
                .iter()
                .zip(&arrays.1)
                .map(|(p, o)| TokenHistory {
                    prompt_ids: p.as_slice().expect("checked"),
                    output_ids: o.as_slice().expect("checked"),
                })
                .collect()
        }
        _ => {
            return Err(PyValueError::new_err(
                "pass the histories as scheduler and seq_ids, or as prompt_ids and output_ids",
            ))
        }
    };
    let param_refs: Vec<&SamplingParams> = params.iter().map(|p| &p.get().inner).collect();
    let outputs = py
        .detach(|| sample_batch(rows, vocab_size, &param_refs, &histories, &steps))
        .map_err(to_py_err)?;
    Ok(to_arrays(py, &outputs))
}

type TokenArrays<'py> = Vec<PyReadonlyArray1<'py, u32>>;

fn explicit_histories<'py>(
    prompt_ids: &[Bound<'py, PyAny>],
    output_ids: &[Bound<'py, PyAny>],
) -> PyResult<(TokenArrays<'py>, TokenArrays<'py>)> {
    if prompt_ids.len() != output_ids.len() {
        return Err(PyValueError::new_err(format!(
            "prompt_ids and output_ids differ in length ({} and {})",
            prompt_ids.len(),
            output_ids.len()
        )));
    }
    Ok((
        token_arrays("prompt_ids", prompt_ids)?,
        token_arrays("output_ids", output_ids)?,
    ))
}

fn to_arrays<'py>(py: Python<'py>, outputs: &[SampleOutput]) -> SampleArrays<'py> {
    let width = outputs
        .iter()
        .map(|o| o.top_logprobs.len())
        .max()
        .unwrap_or(0);
    let ids: Vec<i64> = outputs.iter().map(|o| o.token_id as i64).collect();
    let logprobs: Vec<f32> = outputs.iter().map(|o| o.logprob).collect();
    let mut top_ids = vec![-1i64; outputs.len() * width];
    let mut top_lps = vec![f32::NAN; outputs.len() * width];
    for (row, out) in outputs.iter().enumerate() {
        for (j, &(id, lp)) in out.top_logprobs.iter().enumerate() {
            top_ids[row * width + j] = id as i64;
            top_lps[row * width + j] = lp;
        }
    }
    (
        ids.into_pyarray(py),
        logprobs.into_pyarray(py),
        matrix(py, outputs.len(), width, top_ids),
        matrix(py, outputs.len(), width, top_lps),
    )
}
