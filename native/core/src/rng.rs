//! Counter-based random numbers: a draw depends only on (seed, step), so a
//! seeded request samples the same tokens whatever else shares its batch.

/// SplitMix64 finaliser: a bijective mix with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Uniform f64 in [0, 1) for draw number `step` of stream `seed`.
pub fn uniform(seed: u64, step: u64) -> f64 {
    let bits = mix64(mix64(seed).wrapping_add(step.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    // The top 53 bits fill an f64 mantissa exactly.
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_step_repeat() {
        assert_eq!(uniform(7, 3), uniform(7, 3));
        assert_ne!(uniform(7, 3), uniform(7, 4));
        assert_ne!(uniform(7, 3), uniform(8, 3));
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
}
