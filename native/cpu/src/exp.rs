//! e^x as the softmaxes and SiLU take it: one polynomial, written once for
//! the compiler to vectorise (`fast_exp`) and once as 16 AVX-512 lanes
//! (`exp16`).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// e^x for x <= 0 (softmax after subtracting the max), branch-free so the
/// loop over a score row vectorises: 2^(x log2 e) split into an integer
/// power, built in the exponent bits, times a degree-6 polynomial of the
/// fraction in [-0.5, 0.5]. Relative error ~2e-7 + 6e-8 |x| (the
/// rounding of x * log2 e); 0 below -87.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    // clamped at 2^127 too: e^x for x > 88 stays finite (huge), where the
    // exponent bits would otherwise overflow
    let t = (x * std::f32::consts::LOG2_E).clamp(-126.0, 127.0);
    let n = t.round_ties_even();
    let f = t - n; // [-0.5, 0.5]
                   // 2^f = e^(f ln2), Taylor to the 6th power: |y| <= 0.35, remainder ~1.2e-7
    let ln2 = std::f32::consts::LN_2;
    let y = f * ln2;
    let p = 1.0
        + y * (1.0
            + y * (0.5
                + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y * (1.0 / 120.0 + y * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let r = p * scale;
    if x < -87.0 {
        0.0
    } else {
        r
    }
}
/// e^x per lane: 2^(x log2 e) as 2^n times a degree-6 polynomial of the
/// fraction (`fast_exp`'s, fused); 0 far below, infinity far above.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp16(x: __m512) -> __m512 {
    let t = _mm512_max_ps(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        _mm512_set1_ps(-126.0),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(std::f32::consts::LN_2));
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}
