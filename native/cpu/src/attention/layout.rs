//! Cache rows into registers: bf16 or f32 elements widened to f32 lanes,
//! and 16 rows of keys transposed so that a lane is a position.

use std::arch::x86_64::*;

use super::KvElem;

/// 16 values from `p` as f32 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn load16<T: KvElem>(p: *const T) -> __m512 {
    if T::IS_BF16 {
        let bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast::<__m256i>()));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
    } else {
        _mm512_loadu_ps(p.cast::<f32>())
    }
}

/// Transposes the 16x16 block `rows[j][c]` (row stride `stride` floats)
/// into `out[c * 16 + j]`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose16(rows: *const f32, stride: usize, out: *mut f32) {
    let mut r = [_mm512_setzero_ps(); 16];
    for (j, v) in r.iter_mut().enumerate() {
        *v = _mm512_loadu_ps(rows.add(j * stride));
    }
    // 32-bit, then 64-bit interleaves within 128-bit lanes
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for i in 0..4 {
        for h in 0..2 {
            let (a, b) = (t[4 * i + h], t[4 * i + h + 2]);
            r[4 * i + h] =
                _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
            r[4 * i + h + 2] =
                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
        }
    }
    // 128-bit lanes: first pairs of 4-row groups, then pairs of 8-row groups
    for i in 0..2 {
        for h in 0..4 {
            let (a, b) = (r[8 * i + h], r[8 * i + h + 4]);
            t[8 * i + h] = _mm512_shuffle_f32x4::<0x88>(a, b);
            t[8 * i + h + 4] = _mm512_shuffle_f32x4::<0xDD>(a, b);
        }
    }
    for h in 0..8 {
        let (a, b) = (t[h], t[h + 8]);
        r[h] = _mm512_shuffle_f32x4::<0x88>(a, b);
        r[h + 8] = _mm512_shuffle_f32x4::<0xDD>(a, b);
    }
    for (c, v) in r.iter().enumerate() {
        let j = [0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15][c];
        _mm512_storeu_ps(out.add(j * 16), *v);
    }
}
