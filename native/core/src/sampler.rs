//! Logits processing and sampling on f32 rows (the CPU path).
//!
//! Processors run in a fixed order: DRY, repetition penalty, presence and
//! frequency penalties, logit bias, temperature, then the truncation filters
//! top-k, top-p and min-p. Reported logprobs are the log-softmax of the
//! logits after penalties, bias and temperature (temperature 1 when greedy),
//! before truncation: the filters would turn most entries into -inf, which
//! neither JSON nor a caller can use.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::dry::{apply_dry, DryParams};
use crate::error::SamplerError;
use crate::rng::uniform;

/// Rows per batch below which rayon's fork/join costs more than it saves
/// (vocab 49152: one row of top-p sampling takes about 0.3 ms).
const MIN_ROWS_FOR_PARALLEL: usize = 4;

/// Validated per-request sampling options.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no cap.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// 1 means off.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub logit_bias: Vec<(u32, f32)>,
    pub dry: Option<DryParams>,
    pub seed: u64,
    /// Return the chosen token's logprob.
    pub return_logprob: bool,
    /// How many of the most likely tokens to report with their logprobs.
    pub num_top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
            dry: None,
            seed: 0,
            return_logprob: false,
            num_top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Check ranges once, when a request arrives, not at every step.
    pub fn validate(&self) -> Result<(), SamplerError> {
        let bad = |name: &str, why: &str| Err(SamplerError::InvalidParam(format!("{name} {why}")));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", "must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", "must be a finite number > 0");
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return bad("presence_penalty/frequency_penalty", "must be finite");
        }
        if self.logit_bias.iter().any(|(_, b)| !b.is_finite()) {
            return bad("logit_bias", "values must be finite");
        }
        match &self.dry {
            Some(dry) => dry.validate(),
            None => Ok(()),
        }
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Tokens seen so far by one sequence, for the penalties.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenHistory<'a> {
    pub prompt_ids: &'a [u32],
    pub output_ids: &'a [u32],
}

/// One sampled token with the logprobs asked for.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOutput {
    pub token_id: u32,
    /// NaN when not asked for.
    pub logprob: f32,
    /// Most likely first.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Process and sample every row of `logits` (row-major, `vocab_size`
/// columns), modifying the rows in place: they are left holding the processed
/// logits (after penalties and bias, then, for sampled rows with a
/// temperature other than 1, shifted by the row's maximum and divided by it). `steps[i]` is the number of tokens
/// row `i` has generated so far: with the request seed it fixes the random
/// draw, so a seeded request samples the same tokens whatever its batch.
pub fn sample_batch(
    logits: &mut [f32],
    vocab_size: usize,
    params: &[&SamplingParams],
    histories: &[TokenHistory<'_>],
    steps: &[u64],
) -> Result<Vec<SampleOutput>, SamplerError> {
    let num_rows = params.len();
    if vocab_size == 0 || logits.len() != num_rows * vocab_size {
        return Err(SamplerError::Shape(format!(
            "logits hold {} values, expected {} rows x {} vocab",
            logits.len(),
            num_rows,
            vocab_size
        )));
    }
    if histories.len() != num_rows || steps.len() != num_rows {
        return Err(SamplerError::Shape(format!(
            "{} rows of params, {} histories, {} steps",
            num_rows,
            histories.len(),
            steps.len()
        )));
    }
    let run = |(i, row): (usize, &mut [f32])| sample_row(row, params[i], histories[i], steps[i]);
    if num_rows >= MIN_ROWS_FOR_PARALLEL {
        logits
            .par_chunks_mut(vocab_size)
            .enumerate()
            .map(run)
            .collect()
    } else {
        logits.chunks_mut(vocab_size).enumerate().map(run).collect()
    }
}

/// Process and sample one row in place.
pub fn sample_row(
    logits: &mut [f32],
    params: &SamplingParams,
    history: TokenHistory<'_>,
    step: u64,
) -> Result<SampleOutput, SamplerError> {
    apply_penalties(logits, params, history)?;
    if !params.is_greedy() && params.temperature != 1.0 {
        apply_temperature(logits, params.temperature);
    }
    let token_id = if params.is_greedy() {
        argmax(logits)?
    } else {
        draw(logits, params, uniform(params.seed, step))?
    };
    Ok(with_logprobs(logits, params, token_id))
}

/// Divide by the temperature after shifting the row so its largest logit is
/// 0. The shift changes neither the softmax nor the draw, but keeps a tiny
/// temperature (valid, e.g. 1e-40) from overflowing the best logits to +inf,
/// which made `inf - inf = NaN` and left nothing to sample.
fn apply_temperature(logits: &mut [f32], temperature: f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let shift = if max.is_finite() { max } else { 0.0 };
    logits
        .iter_mut()
        .for_each(|x| *x = (*x - shift) / temperature);
}

/// DRY, repetition, presence/frequency penalties and logit bias.
pub fn apply_penalties(
    logits: &mut [f32],
    params: &SamplingParams,
    history: TokenHistory<'_>,
) -> Result<(), SamplerError> {
    if let Some(dry) = &params.dry {
        apply_dry(logits, dry, history.prompt_ids, history.output_ids);
    }
    if params.repetition_penalty != 1.0 {
        let seen = history.prompt_ids.iter().chain(history.output_ids);
        apply_repetition_penalty(logits, seen, params.repetition_penalty);
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        for (id, count) in count_tokens(history.output_ids) {
            if let Some(x) = logits.get_mut(id as usize) {
                *x -= params.frequency_penalty * count as f32 + params.presence_penalty;
            }
        }
    }
    for &(id, bias) in &params.logit_bias {
        let vocab = logits.len();
        let x = logits
            .get_mut(id as usize)
            .ok_or(SamplerError::TokenOutOfRange { id, vocab })?;
        *x += bias;
    }
    Ok(())
}

/// CTRL-style: divide positive logits, multiply negative ones, once per
/// distinct token seen.
fn apply_repetition_penalty<'a>(
    logits: &mut [f32],
    seen: impl Iterator<Item = &'a u32>,
    penalty: f32,
) {
    let mut done = vec![false; logits.len()];
    for &id in seen {
        let i = id as usize;
        if i < logits.len() && !done[i] {
            done[i] = true;
            let x = logits[i];
            logits[i] = if x > 0.0 { x / penalty } else { x * penalty };
        }
    }
}

fn count_tokens(ids: &[u32]) -> HashMap<u32, u32> {
    let mut counts = HashMap::new();
    for &id in ids {
        *counts.entry(id).or_insert(0) += 1;
    }
    counts
}

/// Index of the largest logit; the first one on ties. NaN never wins.
///
/// The largest value first, over lanes the compiler keeps in vector
/// registers (`x > m ? x : m` is a vector max that passes NaN over), then
/// the first index holding it: two branch-free passes over a large
/// vocabulary instead of one that branches on every logit.
pub fn argmax(logits: &[f32]) -> Result<u32, SamplerError> {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            *m = if x > *m { x } else { *m };
        }
    }
    let best = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if best == f32::NEG_INFINITY {
        return Err(SamplerError::NoCandidate);
    }
    let at = logits.iter().position(|&x| x == best);
    Ok(at.expect("the largest value is in the row") as u32)
}

/// Candidates left after top-k, top-p and min-p, most likely first, with
/// their unnormalised probabilities.
fn truncated_candidates(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f32)> {
    let mut ids: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize] > f32::NEG_INFINITY)
        .collect();
    let by_logit_desc = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
    if params.top_k > 0 && params.top_k < ids.len() {
        ids.select_nth_unstable_by(params.top_k - 1, by_logit_desc);
        ids.truncate(params.top_k);
    }
    if ids.is_empty() {
        return Vec::new();
    }
    let max = ids
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut cands: Vec<(u32, f32)> = ids
        .into_iter()
        .map(|i| (i, (logits[i as usize] - max).exp()))
        .collect();
    if params.top_p < 1.0 {
        cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        keep_top_p(&mut cands, params.top_p);
    }
    if params.min_p > 0.0 {
        // The best candidate has probability exp(0) = 1 before normalisation.
        cands.retain(|&(_, p)| p >= params.min_p);
    }
    cands
}

/// Keep the shortest prefix whose mass reaches `top_p` (at least one token).
/// The sums are f64: over a 50k-150k vocabulary an f32 running sum drifts by
/// about 1e-4 of the mass, which moved the cut by up to a dozen tokens.
fn keep_top_p(sorted: &mut Vec<(u32, f32)>, top_p: f32) {
    let total: f64 = sorted.iter().map(|c| c.1 as f64).sum();
    let threshold = top_p as f64 * total;
    let mut cumulative = 0.0f64;
    let mut keep = sorted.len();
    for (i, &(_, p)) in sorted.iter().enumerate() {
        cumulative += p as f64;
        if cumulative >= threshold {
            keep = i + 1;
            break;
        }
    }
    sorted.truncate(keep.max(1));
}

fn draw(logits: &[f32], params: &SamplingParams, u: f64) -> Result<u32, SamplerError> {
    let cands = truncated_candidates(logits, params);
    let total: f64 = cands.iter().map(|c| c.1 as f64).sum();
    if !(total > 0.0 && total.is_finite()) {
        return Err(SamplerError::NoCandidate);
    }
    let target = u * total;
    let mut cumulative = 0.0;
    for &(id, p) in &cands {
        cumulative += p as f64;
        if cumulative > target {
            return Ok(id);
        }
    }
    // Rounding left target at the very top: the last candidate owns it.
    Ok(cands[cands.len() - 1].0)
}

fn with_logprobs(logits: &[f32], params: &SamplingParams, token_id: u32) -> SampleOutput {
    let wants_any = params.return_logprob || params.num_top_logprobs > 0;
    if !wants_any {
        return SampleOutput {
            token_id,
            logprob: f32::NAN,
            top_logprobs: Vec::new(),
        };
    }
    let log_z = log_sum_exp(logits);
    let logprob = |id: u32| logits[id as usize] - log_z;
    let top_logprobs = top_n(logits, params.num_top_logprobs)
        .into_iter()
        .map(|id| (id, logprob(id)))
        .collect();
    SampleOutput {
        token_id,
        logprob: logprob(token_id),
        top_logprobs,
    }
}

fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return max;
    }
    let sum: f64 = logits.iter().map(|&x| ((x - max) as f64).exp()).sum();
    max + sum.ln() as f32
}

/// Ids of the `n` largest logits, largest first (lower id first on ties).
pub fn top_n(logits: &[f32], n: usize) -> Vec<u32> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    ids.select_nth_unstable_by(n - 1, order);
    ids.truncate(n);
    ids.sort_unstable_by(order);
    ids
}

#[cfg(test)]
#[path = "sampler_tests.rs"]
mod tests;
