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
mod tests {
    use super::*;

    fn dry(allowed_length: usize, breakers: &[u32]) -> DryParams {
        DryParams {
            multiplier: 1.0,
            base: 2.0,
            allowed_length,
            sequence_breakers: breakers.to_vec(),
        }
    }

    #[test]
    fn penalises_the_token_that_continues_a_repeat() {
        // 1 2 3 4 ... 1 2 3 -> 4 would repeat a run of 3.
        let context = [1, 2, 3, 4, 9, 1, 2, 3];
        let lengths = repeat_lengths(&context, &dry(2, &[]));
        assert_eq!(lengths.get(&4), Some(&3));
        let mut logits = vec![0.0f32; 10];
        apply_dry(&mut logits, &dry(2, &[]), &context, &[]);
        assert_eq!(logits[4], -2.0); // 1 * 2^(3 - 2)
        assert!(logits.iter().enumerate().all(|(i, &x)| i == 4 || x == 0.0));
    }

    #[test]
    fn short_repeats_are_allowed() {
        let context = [5, 6, 7, 5];
        let mut logits = vec![0.0f32; 10];
        apply_dry(&mut logits, &dry(2, &[]), &context, &[]);
        assert!(logits.iter().all(|&x| x == 0.0), "{logits:?}");
    }

    #[test]
    fn breakers_stop_matches() {
        let context = [1, 2, 3, 4, 1, 2, 3];
        assert_eq!(repeat_lengths(&context, &dry(2, &[2])).get(&4), Some(&1));
        assert!(repeat_lengths(&context, &dry(2, &[3])).is_empty());
        assert!(repeat_lengths(&context, &dry(2, &[4])).is_empty());
    }

    #[test]
    fn prompt_and_output_form_one_context() {
        let mut split = vec![0.0f32; 10];
        let mut joined = vec![0.0f32; 10];
        apply_dry(&mut split, &dry(1, &[]), &[1, 2, 3, 4], &[1, 2, 3]);
        apply_dry(&mut joined, &dry(1, &[]), &[1, 2, 3, 4, 1, 2, 3], &[]);
        assert_eq!(split, joined);
        assert_eq!(split[4], -4.0);
    }

    #[test]
    fn bad_params_are_rejected() {
        let mut p = dry(2, &[]);
        p.base = 0.5;
        assert!(p.validate().is_err());
        p.base = 2.0;
        p.multiplier = f32::NAN;
        assert!(p.validate().is_err());
    }
}
