//! Binding of the continuous-batching scheduler: flat numpy arrays in and out.

use mistralrs_serve_core::{Scheduler, SchedulerConfig, SchedulerError, StepPlan};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyReadonlyArray1};
use pyo3::exceptions::{PyKeyError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn to_py_err(err: SchedulerError) -> PyErr {
    match err {
        SchedulerError::UnknownSequence(_) | SchedulerError::NotRunning(_) => {
            PyKeyError::new_err(err.to_string())
        }
        SchedulerError::InvalidConfig(_)
        | SchedulerError::DuplicateSequence(_)
        | SchedulerError::NoReservedSeat(_)
        | SchedulerError::TooManyChoices { .. }
        | SchedulerError::EmptyPrompt(_)
        | SchedulerError::TooLong { .. } => PyValueError::new_err(err.to_string()),
    }
}

/// Waiting/running queues, KV block pool and prefix cache of one model.
#[pyclass(name = "Scheduler", module = "mistralrs_serve._native")]
pub struct PyScheduler {
    inner: Scheduler,
}

#[pymethods]
impl PyScheduler {
    #[new]
    #[pyo3(signature = (
        *, num_blocks, block_size = 16, max_num_seqs = 256, max_num_batched_tokens = 2048,
        enable_prefix_caching = true, cache_salt = 0
    ))]
    fn new(
        num_blocks: usize,
        block_size: usize,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
        enable_prefix_caching: bool,
        cache_salt: u64,
    ) -> PyResult<Self> {
        let cfg = SchedulerConfig {
            num_blocks,
            block_size,
            max_num_seqs,
            max_num_batched_tokens,
            enable_prefix_caching,
            cache_salt,
        };
        Ok(Self {
            inner: Scheduler::new(cfg).map_err(to_py_err)?,
        })
    }

    /// Queue a sequence; `num_forks` seats are kept for its n > 1 choices.
    #[pyo3(signature = (seq_id, prompt_ids, num_forks = 0))]
    fn add(
        &mut self,
        seq_id: u64,
        prompt_ids: PyReadonlyArray1<'_, u32>,
        num_forks: usize,
    ) -> PyResult<()> {
        let ids = prompt_ids
            .as_slice()
            .map_err(|_| PyValueError::new_err("prompt_ids must be contiguous"))?;
        self.inner
            .add_group(seq_id, ids, num_forks)
            .map_err(to_py_err)
    }

    fn append_token(&mut self, seq_id: u64, token_id: u32) -> PyResult<()> {
        self.inner.append_token(seq_id, token_id).map_err(to_py_err)
    }

    fn fork(&mut self, parent_id: u64, child_id: u64) -> PyResult<()> {
        self.inner.fork(parent_id, child_id).map_err(to_py_err)
    }

    /// End a sequence (finished or aborted) and free its blocks.
    fn finish(&mut self, seq_id: u64) -> PyResult<()> {
        self.inner.finish(seq_id).map_err(to_py_err)
    }

    /// The next step's plan as a dict of numpy arrays (see StepPlan).
    ///
    /// Runs with the GIL held: a plan takes microseconds, and releasing the GIL
    /// while `self` is mutably borrowed would let another thread's read of a
    /// counter fail with "Already mutably borrowed".
    fn schedule<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        plan_to_dict(py, self.inner.schedule())
    }

    #[getter]
    fn num_waiting(&self) -> usize {
        self.inner.num_waiting()
    }

    #[getter]
    fn num_running(&self) -> usize {
        self.inner.num_running()
    }

    #[getter]
    fn has_work(&self) -> bool {
        self.inner.has_work()
    }

    #[getter]
    fn num_blocks(&self) -> usize {
        self.inner.pool().num_blocks()
    }

    #[getter]
    fn num_free_blocks(&self) -> usize {
        self.inner.pool().num_free()
    }

    #[getter]
    fn num_used_blocks(&self) -> usize {
        self.inner.pool().num_used()
    }

    #[getter]
    fn block_size(&self) -> usize {
        self.inner.config().block_size
    }

    #[getter]
    fn prefix_cache_queries(&self) -> u64 {
        self.inner.stats().prefix_cache_queries
    }

    #[getter]
    fn prefix_cache_hits(&self) -> u64 {
        self.inner.stats().prefix_cache_hits
    }

    #[getter]
    fn num_preemptions(&self) -> u64 {
        self.inner.stats().num_preemptions
    }
}

fn plan_to_dict(py: Python<'_>, plan: StepPlan) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    let widen = |v: &[u32]| v.iter().map(|&x| x as i64).collect::<Vec<i64>>();
    let num_seqs = plan.seq_ids.len();
    let tables = Array2::from_shape_vec((num_seqs, plan.max_blocks), plan.block_tables)
        .expect("block_tables holds seqs * max_blocks entries");
    let copies: Vec<i64> = plan
        .copy_ops
        .iter()
        .flat_map(|&(s, t)| [s as i64, t as i64])
        .collect();
    let copies =
        Array2::from_shape_vec((plan.copy_ops.len(), 2), copies).expect("two ids per copy");
    d.set_item(
        "seq_ids",
        plan.seq_ids
            .iter()
            .map(|&x| x as i64)
            .collect::<Vec<i64>>()
            .into_pyarray(py),
    )?;
    d.set_item("query_lens", widen(&plan.query_lens).into_pyarray(py))?;
    d.set_item("context_lens", widen(&plan.context_lens).into_pyarray(py))?;
    d.set_item("sample", plan.sample.into_pyarray(py))?;
    d.set_item("input_ids", widen(&plan.input_ids).into_pyarray(py))?;
    d.set_item("positions", widen(&plan.positions).into_pyarray(py))?;
    d.set_item("slot_mapping", plan.slot_mapping.into_pyarray(py))?;
    d.set_item("block_tables", tables.into_pyarray(py))?;
    d.set_item("copy_ops", copies.into_pyarray(py))?;
    d.set_item(
        "preempted",
        plan.preempted
            .iter()
            .map(|&x| x as i64)
            .collect::<Vec<i64>>()
            .into_pyarray(py),
    )?;
    Ok(d)
}
