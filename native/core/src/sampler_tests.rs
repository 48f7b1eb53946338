use super::*;

fn params() -> SamplingParams {
    SamplingParams::default()
}

fn greedy() -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        ..params()
    }
}

fn sample(
    logits: &[f32],
    p: &SamplingParams,
    history: TokenHistory<'_>,
    step: u64,
) -> SampleOutput {
    sample_row(&mut logits.to_vec(), p, history, step).unwrap()
}

#[test]
fn greedy_picks_argmax_first_on_ties() {
    let out = sample(
        &[0.1, 3.0, 3.0, -1.0],
        &greedy(),
        TokenHistory::default(),
        0,
    );
    assert_eq!(out.token_id, 1);
    assert!(out.logprob.is_nan());
}

#[test]
fn argmax_skips_nan_and_fails_on_all_neg_inf() {
    assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN]).unwrap(), 1);
    assert_eq!(
        argmax(&[f32::NEG_INFINITY; 3]),
        Err(SamplerError::NoCandidate)
    );
}

/// The first largest index by one plain scan: what [`argmax`] must agree with.
fn argmax_by_scan(row: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in row.iter().enumerate() {
        if x > best.map_or(f32::NEG_INFINITY, |b| b.1) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
}

#[test]
fn argmax_over_long_rows_matches_a_plain_scan() {
    // rows past one chunk of lanes, with ties across lanes and chunks, NaNs,
    // infinities and a tail shorter than a chunk
    let mut state = 7u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as u32
    };
    for len in [17, 31, 64, 100, 1000, 4099] {
        for _ in 0..20 {
            let mut row: Vec<f32> = (0..len).map(|_| (next() % 50) as f32 - 25.0).collect();
            for _ in 0..3 {
                let at = next() as usize % len;
                row[at] = match next() % 4 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => f32::INFINITY,
                    _ => 24.0,
                };
            }
            assert_eq!(argmax(&row).ok(), argmax_by_scan(&row), "{row:?}");
        }
    }
    let mut ties = vec![0.0f32; 200];
    (ties[37], ties[150], ties[5]) = (2.0, 2.0, f32::NAN);
    assert_eq!(argmax(&ties).unwrap(), 37);
    assert_eq!(
        argmax(&[f32::NEG_INFINITY; 40]),
        Err(SamplerError::NoCandidate)
    );
    assert_eq!(argmax(&[f32::NAN; 40]), Err(SamplerError::NoCandidate));
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative() {
    let mut logits = vec![2.0, -2.0, 2.0];
    let p = SamplingParams {
        repetition_penalty: 2.0,
        ..params()
    };
    let hist = TokenHistory {
        prompt_ids: &[0, 0],
        output_ids: &[1],
    };
    apply_penalties(&mut logits, &p, hist).unwrap();
    assert_eq!(logits, vec![1.0, -4.0, 2.0]);
}

#[test]
fn presence_and_frequency_use_output_counts_only() {
    let mut logits = vec![0.0; 4];
    let p = SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        ..params()
    };
    let hist = TokenHistory {
        prompt_ids: &[3, 3],
        output_ids: &[1, 1, 2],
    };
    apply_penalties(&mut logits, &p, hist).unwrap();
    assert_eq!(logits, vec![0.0, -1.0, -0.75, 0.0]);
}

#[test]
fn logit_bias_adds_and_checks_range() {
    let mut logits = vec![0.0; 3];
    let p = SamplingParams {
        logit_bias: vec![(2, 100.0)],
        ..greedy()
    };
    apply_penalties(&mut logits, &p, TokenHistory::default()).unwrap();
    assert_eq!(logits[2], 100.0);
    let bad = SamplingParams {
        logit_bias: vec![(3, 1.0)],
        ..greedy()
    };
    let err = sample_row(&mut [0.0; 3], &bad, TokenHistory::default(), 0).unwrap_err();
    assert_eq!(err, SamplerError::TokenOutOfRange { id: 3, vocab: 3 });
}

#[test]
fn top_k_one_is_greedy() {
    let logits = [0.3, 0.1, 2.5, 2.4];
    let p = SamplingParams {
        top_k: 1,
        ..params()
    };
    for step in 0..50 {
        assert_eq!(
            sample(&logits, &p, TokenHistory::default(), step).token_id,
            2
        );
    }
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_the_mass() {
    // probabilities 0.5, 0.3, 0.2 (as logits of their logs)
    let logits: Vec<f32> = [0.5f32, 0.3, 0.2].iter().map(|p| p.ln()).collect();
    let p = SamplingParams {
        top_p: 0.75,
        ..params()
    };
    let c = truncated_candidates(&logits, &p);
    assert_eq!(c.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 1]);
    let p = SamplingParams {
        top_p: 0.4,
        ..params()
    };
    assert_eq!(truncated_candidates(&logits, &p).len(), 1);
}

#[test]
fn top_p_cut_is_exact_over_a_large_flat_vocabulary() {
    // One token at p = 1 and 99_999 at q = e^-0.1 (relative): 0.9 of the mass
    // is reached at exactly 90_000 tokens. An f32 running sum made it 90_007.
    let mut logits = vec![0.0f32; 100_000];
    logits[0] = 0.1;
    let p = SamplingParams {
        top_p: 0.9,
        ..params()
    };
    assert_eq!(truncated_candidates(&logits, &p).len(), 90_000);
}

#[test]
fn min_p_is_relative_to_the_best_token() {
    let logits: Vec<f32> = [0.6f32, 0.3, 0.1].iter().map(|p| p.ln()).collect();
    let p = SamplingParams {
        min_p: 0.2,
        ..params()
    };
    let ids: Vec<u32> = truncated_candidates(&logits, &p)
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&0) && ids.contains(&1));
}

#[test]
fn seeded_sampling_repeats_and_differs_between_seeds() {
    let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |seed| -> Vec<u32> {
        let p = SamplingParams { seed, ..params() };
        (0..64)
            .map(|s| sample(&logits, &p, TokenHistory::default(), s).token_id)
            .collect()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn sampling_frequencies_follow_the_distribution() {
    let probs = [0.5f32, 0.25, 0.125, 0.125];
    let logits: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let p = SamplingParams {
        seed: 9,
        ..params()
    };
    let n = 40_000;
    let mut counts = [0usize; 4];
    for step in 0..n {
        counts[sample(&logits, &p, TokenHistory::default(), step).token_id as usize] += 1;
    }
    for (count, prob) in counts.iter().zip(probs) {
        let expected = prob as f64 * n as f64;
        let sd = (expected * (1.0 - prob as f64)).sqrt();
        assert!((*count as f64 - expected).abs() < 6.0 * sd, "{counts:?}");
    }
}

#[test]
fn a_biased_away_token_is_never_drawn_by_the_default_seed() {
    // Seed 0, step 0 drew u = 0, which picked token 0 at probability e^-100.
    let logits = [0.0f32, 100.0, 0.0];
    for seed in 0..50 {
        let p = SamplingParams { seed, ..params() };
        for step in 0..4 {
            assert_eq!(
                sample(&logits, &p, TokenHistory::default(), step).token_id,
                1
            );
        }
    }
}

#[test]
fn temperature_sharpens() {
    let logits = [1.0f32, 0.0];
    let count = |t: f32| {
        let p = SamplingParams {
            temperature: t,
            seed: 3,
            ..params()
        };
        (0..4000)
            .filter(|&s| sample(&logits, &p, TokenHistory::default(), s).token_id == 0)
            .count()
    };
    assert!(count(0.25) > count(1.0) + 600);
}

#[test]
fn tiny_temperature_acts_like_argmax_instead_of_failing() {
    // 1 / 1e-40 overflows f32: scaling without the shift gave inf - inf = NaN.
    let logits = [0.0f32, 2.0, 1.0, -3.0];
    for t in [1e-40f32, 1e-37, 1e-20] {
        let p = SamplingParams {
            temperature: t,
            return_logprob: true,
            ..params()
        };
        for step in 0..20 {
            let out = sample(&logits, &p, TokenHistory::default(), step);
            assert_eq!(out.token_id, 1, "temperature {t}");
            assert_eq!(out.logprob, 0.0, "temperature {t}");
        }
    }
}

#[test]
fn logprobs_are_log_softmax_after_temperature() {
    let logits = [2.0f32, 1.0, 0.0];
    let p = SamplingParams {
        temperature: 0.5,
        top_k: 1,
        return_logprob: true,
        num_top_logprobs: 2,
        ..params()
    };
    let out = sample(&logits, &p, TokenHistory::default(), 0);
    let scaled = [4.0f64, 2.0, 0.0];
    let z = scaled.iter().map(|x| x.exp()).sum::<f64>().ln();
    assert_eq!(out.token_id, 0);
    assert!((out.logprob as f64 - (4.0 - z)).abs() < 1e-5);
    assert_eq!(
        out.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>(),
        vec![0, 1]
    );
    assert!((out.top_logprobs[1].1 as f64 - (2.0 - z)).abs() < 1e-5);
}

#[test]
fn greedy_logprobs_use_temperature_one() {
    let logits = [0.0f32, 0.0];
    let p = SamplingParams {
        return_logprob: true,
        ..greedy()
    };
    let out = sample(&logits, &p, TokenHistory::default(), 0);
    assert!((out.logprob - 0.5f32.ln()).abs() < 1e-6);
}

#[test]
fn batch_matches_rows_and_checks_shapes() {
    let vocab = 50;
    let rows = 9;
    let logits: Vec<f32> = (0..vocab * rows)
        .map(|i| ((i * 7919) % 101) as f32 / 10.0)
        .collect();
    let ps: Vec<SamplingParams> = (0..rows)
        .map(|i| SamplingParams {
            seed: i as u64,
            top_p: 0.9,
            return_logprob: true,
            num_top_logprobs: 3,
            ..params()
        })
        .collect();
    let refs: Vec<&SamplingParams> = ps.iter().collect();
    let hist = vec![TokenHistory::default(); rows];
    let steps: Vec<u64> = (0..rows as u64).collect();
    let out = sample_batch(&mut logits.clone(), vocab, &refs, &hist, &steps).unwrap();
    for i in 0..rows {
        let one = sample(
            &logits[i * vocab..(i + 1) * vocab],
            &ps[i],
            hist[i],
            steps[i],
        );
        assert_eq!(out[i], one);
    }
    let err = sample_batch(&mut logits.clone(), vocab + 1, &refs, &hist, &steps);
    assert!(matches!(err, Err(SamplerError::Shape(_))));
}

#[test]
fn validate_rejects_out_of_range() {
    let bad = [
        SamplingParams {
            temperature: -1.0,
            ..params()
        },
        SamplingParams {
            temperature: f32::NAN,
            ..params()
        },
        SamplingParams {
            top_p: 0.0,
            ..params()
        },
        SamplingParams {
            top_p: 1.5,
            ..params()
        },
        SamplingParams {
            min_p: 2.0,
            ..params()
        },
        SamplingParams {
            repetition_penalty: 0.0,
            ..params()
        },
        SamplingParams {
            logit_bias: vec![(0, f32::INFINITY)],
            ..params()
        },
    ];
    for p in bad {
        assert!(p.validate().is_err(), "{p:?}");
    }
    assert!(params().validate().is_ok());
}

#[test]
fn top_n_orders_and_breaks_ties_by_id() {
    assert_eq!(top_n(&[1.0, 3.0, 3.0, 2.0], 3), vec![1, 2, 3]);
    assert_eq!(top_n(&[1.0], 5), vec![0]);
    assert!(top_n(&[1.0], 0).is_empty());
}
