//! The per-row operations of a step: RMSNorm, SwiGLU, rotary embedding and
//! the residual add, each built for AVX-512 when the CPU has it, else AVX2.

#[cfg(target_arch = "x86_64")]
use crate::exp::exp16;
use crate::exp::fast_exp;

/// Runs `$body` compiled with AVX-512 when the CPU has it, else with AVX2
/// and FMA when it has those (the loops are written for the vectoriser),
/// else as plain code.
macro_rules! with_avx512 {
    ($name:ident ($($arg:ident: $ty:ty),*) $body:block) => {
        pub(super) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,fma")]
                unsafe fn wide($($arg: $ty),*) $body
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $body
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512 (checked just above).
                    return unsafe { wide($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body
        }
    };
}

/// `out = silu(g) * u`, silu(g) = g / (1 + e^-g).
pub(super) fn swiglu(g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { swiglu_avx512(g, u, out) };
        }
    }
    swiglu_loop(g, u, out)
}

with_avx512!(swiglu_loop(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + fast_exp(-g)) * u;
    }
});

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn swiglu_avx512(g: &[f32], u: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = out.len().min(g.len()).min(u.len());
    for i in (0..n).step_by(16) {
        let mask: __mmask16 = (((1u32 << 16.min(n - i)) - 1) & 0xFFFF) as u16;
        let gv = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(i));
        let uv = _mm512_maskz_loadu_ps(mask, u.as_ptr().add(i));
        let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        let silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0), e));
        _mm512_mask_storeu_ps(out.as_mut_ptr().add(i), mask, _mm512_mul_ps(silu, uv));
    }
}

with_avx512!(rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // 16 running sums (lane-parallel: vector adds, no serial chain), then
    // those in a fixed order
    let mut lanes = [0f32; 16];
    let whole = x.len() / 16 * 16;
    for chunk in x[..whole].chunks_exact(16) {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += v * v;
        }
    }
    let tail = x[whole..].iter().map(|v| v * v).sum::<f32>();
    let mean_sq = (lanes.iter().sum::<f32>() + tail) / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
});

with_avx512!(gelu_tanh_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    // gelu(g) = g / 2 (1 + tanh(y)), y = sqrt(2 / pi) (g + 0.044715 g^3); 1 + tanh(y) = 2 / (1 + e^-2y)
    const C: f32 = 0.797_884_6;
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        let y = C * (g + 0.044_715 * g * g * g);
        *o = g / (1.0 + fast_exp(-2.0 * y)) * u;
    }
});

/// Rotates the two halves of `head` (neox style).
pub(super) fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let (a, b) = head.split_at_mut(cos.len());
    for (((x1, x2), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
        let (v1, v2) = (*x1, *x2);
        *x1 = v1 * c - v2 * s;
        *x2 = v2 * c + v1 * s;
    }
}

pub(super) fn add_rows(x: &mut [f32], delta: &[f32], bias: Option<&[f32]>, hidden: usize) {
    for (xr, dr) in x.chunks_exact_mut(hidden).zip(delta.chunks_exact(hidden)) {
        match bias {
            Some(b) => xr
                .iter_mut()
                .zip(dr)
                .zip(b)
                .for_each(|((v, d), b)| *v += d + b),
            None => xr.iter_mut().zip(dr).for_each(|(v, d)| *v += d),
        }
    }
}
