//! DRY ("don't repeat yourself") penalty: a token that would extend a
//! repetition of an earlier stretch of the context is penalised by
//! `multiplier * base^(match_length - allowed_length)`, where the match is
//! the longest suffix of the context that also ends just before an earlier
//! occurrence of that token. Sequence breakers end a match.

use std::collections::HashMap;

use crate::error::SamplerError;

/// Longest match considered; bounds the work per step on degenerate input.
const MAX_MATCH_LENGTH: usize = 512;

#[derive(Clone, Debug, PartialEq)]
pub struct DryParams {
    pub multiplier: f32,
    pub base: f32,
    pub allowed_length: usize,
    pub sequence_breakers: Vec<u32>,
}

impl DryParams {
    pub fn validate(&self) -> Result<(), SamplerError> {
        if !(self.multiplier.is_finite() && self.multiplier >= 0.0) {
            return Err(SamplerError::InvalidParam(
                "dry_multiplier must be a finite number >= 0".into(),
            ));
        }
        if !(self.base.is_finite() && self.base >= 1.0) {
            return Err(SamplerError::InvalidParam(
                "dry_base must be a finite number >= 1".into(),
            ));
        }
        Ok(())
    }

    fn is_breaker(&self, id: u32) -> bool {
        self.sequence_breakers.contains(&id)
    }
}

/// Subtract the DRY penalty from `logits`, given the whole context.
pub fn apply_dry(logits: &mut [f32], dry: &DryParams, prompt_ids: &[u32], output_ids: &[u32]) {
    if dry.multiplier == 0.0 {
        return;
    }
    let context: Vec<u32> = prompt_ids.iter().chain(output_ids).copied().collect();
    for (id, length) in repeat_lengths(&context, dry) {
        if length >= dry.allowed_length {
            if let Some(x) = logits.get_mut(id as usize) {
                let excess = (length - dry.allowed_length) as i32;
                *x -= dry.multiplier * dry.base.powi(excess);
            }
        }
    }
}

/// For each token that follows an earlier occurrence of the context's last
/// token, the longest match between the context's suffix and the stretch
/// ending at that occurrence.
fn repeat_lengths(context: &[u32], dry: &DryParams) -> HashMap<u32, usize> {
    let mut lengths = HashMap::new();
    let Some((&last, earlier)) = context.split_last() else {
        return lengths;
    };
    if dry.is_breaker(last) {
        return lengths;
    }
    let n = context.len();
    for (end, &id) in earlier.iter().enumerate() {
        let next = context[end + 1];
        if id != last || dry.is_breaker(next) {
            continue;
        }
        let mut length = 1;
        while length <= end && length < MAX_MATCH_LENGTH {
            let mine = context[n - 1 - length];
            if context[end - length] != mine || dry.is_breaker(mine) {
                break;
            }
            length += 1;
        }
        let best = lengths.entry(next).or_insert(0);
        *best = (*best).max(length);
    }
    lengths
}

#[cfg(test)]
#[path = "dry_tests.rs"]
mod tests;
