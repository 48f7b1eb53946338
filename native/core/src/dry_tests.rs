//! DRY: the penalised continuation, the allowed length, breakers, params.

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
