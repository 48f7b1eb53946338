//! Counter-based random numbers: a draw depends only on (seed, step), so a
//! seeded request samples the same tokens whatever else shares its batch.

/// SplitMix64 finaliser: a bijective mix with full avalanche.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64's increment (2^64 / golden ratio, odd).
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// Uniform f64 in the open interval (0, 1) for draw number `step` of stream
/// `seed`: SplitMix64's output number `step` from state `mix64(seed)`.
///
/// The state advances before it is mixed, as in SplitMix64: `mix64(0) == 0`,
/// so mixing `mix64(seed) + step * gamma` made (seed 0, step 0), the first
/// draw of the default seed, exactly 0. And the draw is the midpoint of its
/// 2^-53 bucket, so it is never 0: a draw of 0 picks the first candidate in
/// the list however small its probability (e^-100 after a logit bias).
pub fn uniform(seed: u64, step: u64) -> f64 {
    let state = mix64(seed).wrapping_add(step.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA));
    // The top 53 bits fill an f64 mantissa exactly.
    ((mix64(state) >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
#[path = "rng_tests.rs"]
mod tests;
