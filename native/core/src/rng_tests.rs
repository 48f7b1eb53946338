//! The counter-based generator: repeatable, never zero, uniform.

use super::*;

#[test]
fn same_seed_and_step_repeat() {
    assert_eq!(uniform(7, 3), uniform(7, 3));
    assert_ne!(uniform(7, 3), uniform(7, 4));
    assert_ne!(uniform(7, 3), uniform(8, 3));
}

#[test]
fn draws_are_never_zero() {
    // mix64(0) == 0: the default seed's first draw used to be exactly 0.
    assert!(uniform(0, 0) > 1e-3, "{}", uniform(0, 0));
    for seed in [0, 1, u64::MAX] {
        for step in [0, 1, u64::MAX] {
            let u = uniform(seed, step);
            assert!(u > 0.0 && u < 1.0, "{seed} {step} {u}");
        }
    }
}

#[test]
fn draws_are_uniform() {
    let n = 100_000;
    let mut buckets = [0usize; 10];
    for step in 0..n {
        let u = uniform(42, step);
        assert!((0.0..1.0).contains(&u));
        buckets[(u * 10.0) as usize] += 1;
    }
    // Each bucket expects 10_000 with sd ~95; 6 sd is far from flaky.
    for count in buckets {
        assert!((9_430..=10_570).contains(&count), "bucket count {count}");
    }
}
