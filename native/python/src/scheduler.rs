//! Binding of the continuous-batching scheduler: flat numpy arrays in, a typed
//! `StepPlan` of numpy arrays out.

use mistralrs_serve_core::{
    ContentSpan, Scheduler, SchedulerConfig, SchedulerError, StepPlan, TokenHistory,
};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1};
use pyo3::prelude::*;

use crate::convert::{contiguous, matrix, seq_id_array, widen};
use crate::errors::to_py_err;

/// A sequence's prompt and appended tokens, as numpy arrays.
type TokenArrays<'py> = (Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<u32>>);

/// Waiting/running queues, KV block pool and prefix cache of one model.
#[pyclass(name = "Scheduler", module = "mistralrs_serve._native")]
pub struct PyScheduler {
    inner: Scheduler,
}

impl PyScheduler {
    /// The histories of `seq_ids`, borrowed for the sampler.
    pub(crate) fn histories(&self, seq_ids: &[u64]) -> PyResult<Vec<TokenHistory<'_>>> {
        seq_ids
            .iter()
            .map(|&id| {
                self.inner
                    .history(id)
                    .ok_or_else(|| to_py_err(SchedulerError::UnknownSequence(id)))
            })
            .collect()
    }
}

#[pymethods]
impl PyScheduler {
    #[new]
    #[pyo3(signature = (
        *, num_blocks, block_size = 16, max_num_seqs = 256, max_num_batched_tokens = 2048,
        enable_prefix_caching = true, cache_salt = 0, sliding_window = None, kv_groups = None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        num_blocks: usize,
        block_size: usize,
        max_num_seqs: usize,
        max_num_batched_tokens: usize,
        enable_prefix_caching: bool,
        cache_salt: u64,
        sliding_window: Option<usize>,
        kv_groups: Option<Vec<Option<usize>>>,
    ) -> PyResult<Self> {
        let cfg = SchedulerConfig {
            num_blocks,
            block_size,
            max_num_seqs,
            max_num_batched_tokens,
            enable_prefix_caching,
            cache_salt,
            sliding_window,
            kv_groups: kv_groups.unwrap_or_default(),
        };
        Ok(Self {
            inner: Scheduler::new(cfg).map_err(to_py_err)?,
        })
    }

    /// Queue a sequence; `num_forks` seats are kept for its n > 1 choices;
    /// `spans` are (start, end, key, whole) prompt spans of content the ids do
    /// not tell apart (an image's placeholders), kept apart in the prefix
    /// cache; a whole one is never cut between two chunks.
    #[pyo3(signature = (seq_id, prompt_ids, num_forks = 0, spans = None))]
    fn add(
        &mut self,
        seq_id: u64,
        prompt_ids: PyReadonlyArray1<'_, u32>,
        num_forks: usize,
        spans: Option<Vec<(usize, usize, u64, bool)>>,
    ) -> PyResult<()> {
        let ids = contiguous("prompt_ids", &prompt_ids)?;
        let spans: Vec<ContentSpan> = spans
            .unwrap_or_default()
            .into_iter()
            .map(|(start, end, key, whole)| ContentSpan {
                start,
                end,
                key,
                whole,
            })
            .collect();
        self.inner
            .add_with_spans(seq_id, ids, num_forks, &spans)
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

    /// The next step's plan.
    ///
    /// Runs with the GIL held: a plan takes microseconds, and releasing the GIL
    /// while `self` is mutably borrowed would let another thread's read of a
    /// counter fail with "Already mutably borrowed".
    fn schedule(&mut self, py: Python<'_>) -> PyStepPlan {
        to_py_plan(py, self.inner.schedule(), self.inner.num_groups())
    }

    /// Copies of a sequence's prompt and of the tokens appended since.
    fn history<'py>(&self, py: Python<'py>, seq_id: u64) -> PyResult<TokenArrays<'py>> {
        let h = self
            .inner
            .history(seq_id)
            .ok_or_else(|| to_py_err(SchedulerError::UnknownSequence(seq_id)))?;
        Ok((
            h.prompt_ids.to_vec().into_pyarray(py),
            h.output_ids.to_vec().into_pyarray(py),
        ))
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

    /// The window every layer attends within, behind which blocks are freed; None: none.
    #[getter]
    fn sliding_window(&self) -> Option<usize> {
        self.inner.config().sliding_window
    }

    /// Each KV group's window (None: a group of global layers); one group: `[sliding_window]`.
    #[getter]
    fn kv_groups(&self) -> Vec<Option<usize>> {
        self.inner.config().group_windows()
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

/// One step's work as the scheduler planned it: flat arrays, sequences in plan order.
///
/// A sequence's tokens are `query_lens[i]` consecutive rows of the token arrays, after the
/// rows of the sequences before it.
#[pyclass(frozen, name = "StepPlan", module = "mistralrs_serve._native")]
pub struct PyStepPlan {
    /// (S,) int64: the sequence of each plan row.
    #[pyo3(get)]
    seq_ids: Py<PyArray1<i64>>,
    /// (S,) int64: tokens each sequence computes in this step.
    #[pyo3(get)]
    query_lens: Py<PyArray1<i64>>,
    /// (S,) int64: cached tokens of each sequence once this step has run.
    #[pyo3(get)]
    context_lens: Py<PyArray1<i64>>,
    /// (S,) bool: whether the step computes a sequence's last known token, so one is sampled.
    #[pyo3(get)]
    sample: Py<PyArray1<bool>>,
    /// (T,) int64: the token ids to compute, each sequence's rows in order.
    #[pyo3(get)]
    input_ids: Py<PyArray1<i64>>,
    /// (T,) int64: the position of each token in its sequence.
    #[pyo3(get)]
    positions: Py<PyArray1<i64>>,
    /// (T,) int64: the KV-cache slot each token writes (block * block_size + offset), in
    /// the first KV group.
    #[pyo3(get)]
    slot_mapping: Py<PyArray1<i64>>,
    /// (S, max_blocks) int32: each sequence's block ids in the first KV group, padded with
    /// -1; -1 too for the blocks freed behind a sliding window (attention reads from the
    /// window's first block).
    #[pyo3(get)]
    block_tables: Py<PyArray2<i32>>,
    /// (G, T) int64: `slot_mapping` of every KV group.
    #[pyo3(get)]
    group_slot_mapping: Py<PyArray2<i64>>,
    /// (G * S, max_blocks) int32: `block_tables` of every KV group, group after group.
    #[pyo3(get)]
    group_block_tables: Py<PyArray2<i32>>,
    /// Number of KV groups (G).
    #[pyo3(get)]
    num_groups: usize,
    /// (k, 2) int64: (source, destination) blocks to copy before the model runs.
    #[pyo3(get)]
    copy_ops: Py<PyArray2<i64>>,
    /// (P,) int64: sequences preempted by this step (their KV is recomputed later).
    #[pyo3(get)]
    preempted: Py<PyArray1<i64>>,
    /// (R,) int64: the token row of each sampled sequence (its last row), in plan order.
    #[pyo3(get)]
    logit_rows: Py<PyArray1<i64>>,
    /// (R,) int64: the sampled sequences, in plan order (`seq_ids[sample]`).
    #[pyo3(get)]
    sampled_seq_ids: Py<PyArray1<i64>>,
    /// Number of sequences (S).
    #[pyo3(get)]
    num_seqs: usize,
    /// Number of tokens (T).
    #[pyo3(get)]
    num_tokens: usize,
    /// Whether every sequence computes one token and samples it (a pure decode step).
    #[pyo3(get)]
    is_decode_only: bool,
}

#[pymethods]
impl PyStepPlan {
    fn __repr__(&self) -> String {
        format!(
            "StepPlan(num_seqs={}, num_tokens={})",
            self.num_seqs, self.num_tokens
        )
    }
}

fn to_py_plan(py: Python<'_>, plan: StepPlan, num_groups: usize) -> PyStepPlan {
    let (num_seqs, num_tokens) = (plan.seq_ids.len(), plan.input_ids.len());
    let first_slots = plan.slot_mapping[..num_tokens].to_vec();
    let first_tables = plan.block_tables[..num_seqs * plan.max_blocks].to_vec();
    let mut logit_rows = Vec::new();
    let mut sampled = Vec::new();
    let mut end = 0i64;
    for ((&id, &len), &sample) in plan.seq_ids.iter().zip(&plan.query_lens).zip(&plan.sample) {
        end += i64::from(len);
        if sample {
            logit_rows.push(end - 1);
            sampled.push(id);
        }
    }
    let is_decode_only = plan.query_lens.iter().all(|&q| q == 1) && plan.sample.iter().all(|&s| s);
    let copies: Vec<i64> = plan
        .copy_ops
        .iter()
        .flat_map(|&(s, t)| [i64::from(s), i64::from(t)])
        .collect();
    PyStepPlan {
        seq_ids: seq_id_array(py, &plan.seq_ids),
        query_lens: widen(py, &plan.query_lens),
        context_lens: widen(py, &plan.context_lens),
        sample: plan.sample.into_pyarray(py).unbind(),
        input_ids: widen(py, &plan.input_ids),
        positions: widen(py, &plan.positions),
        slot_mapping: first_slots.into_pyarray(py).unbind(),
        block_tables: matrix(py, num_seqs, plan.max_blocks, first_tables).unbind(),
        group_slot_mapping: matrix(py, num_groups, num_tokens, plan.slot_mapping).unbind(),
        group_block_tables: matrix(
            py,
            num_groups * num_seqs,
            plan.max_blocks,
            plan.block_tables,
        )
        .unbind(),
        num_groups,
        copy_ops: matrix(py, plan.copy_ops.len(), 2, copies).unbind(),
        preempted: seq_id_array(py, &plan.preempted),
        logit_rows: logit_rows.into_pyarray(py).unbind(),
        sampled_seq_ids: seq_id_array(py, &sampled),
        num_seqs,
        num_tokens,
        is_decode_only,
    }
}
