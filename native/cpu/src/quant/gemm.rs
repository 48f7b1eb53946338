//! The integer matrix products: AVX-512 VNNI where the CPU has it, AVX2
//! where it has that (`gemm_avx2.rs`); on aarch64 NEON with the dot-product
//! instructions or without (`gemm_neon.rs`); else the same sums in plain
//! Rust. `MISTRALRS_SERVE_CPU_PATH` (avx512, avx2, neon-dotprod, neon,
//! portable) caps the choice, so that every path this CPU runs can be tested
//! and measured.

use std::ops::Range;
use std::sync::OnceLock;

use super::activations::{RowAt, ROW_Q_STEP};
use super::{Part, QMatrix, QuantBatch, QuantKind, QuantRaw, BATCH, BLOCK};

/// `out[b * out_stride + i]` = row `rows.start + i` of `w` · activation row
/// `b` of `xs` (quantized at `w.cols` columns), for every row in `rows` and
/// every activation row: each weight block is read from memory once for the
/// whole batch.
pub fn gemm(
    w: &QMatrix,
    xs: &mut QuantBatch,
    rows: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    let n = check_out(w, xs, &rows, out, out_stride);
    // SAFETY: `xs` is borrowed for the call; `out` holds every index written
    // (checked just above).
    unsafe { gemm_into(w, xs.raw(), n, rows, out.as_mut_ptr(), out_stride) }
}

/// The activation rows of `xs`, after checking that `out` holds every
/// product of them with `w`'s rows `rows`.
#[inline]
fn check_out(
    w: &QMatrix,
    xs: &QuantBatch,
    rows: &Range<usize>,
    out: &[f32],
    out_stride: usize,
) -> usize {
    assert!(rows.end <= w.rows && out_stride >= rows.len());
    let n = xs.rows();
    assert!(n == 0 || out.len() >= (n - 1) * out_stride + rows.len());
    n
}

/// [`gemm`] into raw memory, so threads can fill disjoint rows of one output.
/// Fastest when `rows` starts on a group of 16.
///
/// The activations are the first `n` rows of `xs`, quantized at `w.cols`.
///
/// # Safety
/// `xs`'s batch is alive, its first `n` rows quantized at `w.cols` columns
/// and not written meanwhile; `out` must be valid for writes at
/// `b * out_stride + i` for every activation row `b` and `i < rows.len()`,
/// and nothing else may access those elements meanwhile.
pub unsafe fn gemm_into(
    w: &QMatrix,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    out_stride: usize,
) {
    assert!(rows.end <= w.rows && n <= xs.rows);
    assert!(
        w.cols / BLOCK <= xs.blocks,
        "activations narrower than the matrix"
    );
    // SAFETY: per the contract.
    unsafe { gemm_on(kernel_path(), w, xs, n, rows, out, out_stride) }
}

/// [`gemm_into`] on `path`, which the CPU must run ([`KernelPath::supported`]),
/// part by part.
///
/// # Safety
/// As [`gemm_into`].
unsafe fn gemm_on(
    path: KernelPath,
    w: &QMatrix,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    out_stride: usize,
) {
    assert!(path.supported(), "{path:?} kernels on a CPU without them");
    for p in w.parts() {
        let lo = rows.start.max(p.first_row);
        let hi = rows.end.min(p.first_row + p.rows);
        if lo >= hi {
            continue;
        }
        let local = lo - p.first_row..hi - p.first_row;
        // SAFETY: the part's rows lo..hi are columns lo - rows.start.. of the output, per the contract.
        unsafe {
            part_on(
                path.for_kind(p.kind),
                p,
                xs,
                n,
                local,
                out.add(lo - rows.start),
                out_stride,
            )
        }
    }
}

/// One part's rows `rows` on `path`.
///
/// # Safety
/// As [`gemm_into`], for the part.
unsafe fn part_on(
    path: KernelPath,
    w: &Part,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    out_stride: usize,
) {
    // The AVX2 loops for signed codes (Q8, and Q6 on rows per block) take
    // the weights' signs onto the activation codes, which overflows for a
    // code of -128: only rows quantized per super-block have those, and the
    // decoder gives them only to Q4K and Q6 parts, all rows at once.
    #[cfg(target_arch = "x86_64")]
    // SAFETY: per the contract, the rows are quantized and not written meanwhile.
    let path = match (path, w.kind, unsafe { xs.any_per_super(0..n) }) {
        (KernelPath::Avx2, QuantKind::Q8, true) => KernelPath::Portable,
        // SAFETY: as above.
        (KernelPath::Avx2, QuantKind::Q6, true) if !unsafe { xs.per_super(0..n) } => {
            KernelPath::Portable
        }
        _ => path,
    };
    match path {
        // SAFETY (both vector paths): the CPU has their features (asserted); the rest per the contract.
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => unsafe { avx512::gemm(w, xs, n, rows, out, out_stride) },
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => unsafe { super::gemm_avx2::gemm(w, xs, n, rows, out, out_stride) },
        // SAFETY (both NEON paths): as above.
        #[cfg(target_arch = "aarch64")]
        KernelPath::NeonDot => unsafe {
            super::gemm_neon::gemm(w, xs, n, rows, out, out_stride, true)
        },
        #[cfg(target_arch = "aarch64")]
        KernelPath::Neon => unsafe {
            super::gemm_neon::gemm(w, xs, n, rows, out, out_stride, false)
        },
        // SAFETY: per the contract.
        _ => unsafe { portable_into(w, xs, n, rows, out, out_stride) },
    }
}

/// The instruction set of the integer products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    Portable,
    /// AVX2, FMA and F16C.
    Avx2,
    /// AVX-512 F/BW/VNNI and F16C.
    Avx512,
    /// aarch64 NEON (ARMv8.0).
    Neon,
    /// aarch64 NEON with the dot-product instructions (ARMv8.2 `dotprod`).
    NeonDot,
}

impl KernelPath {
    /// Every path, fastest first within each architecture's.
    pub const ALL: [KernelPath; 5] = [
        KernelPath::Avx512,
        KernelPath::Avx2,
        KernelPath::NeonDot,
        KernelPath::Neon,
        KernelPath::Portable,
    ];

    /// The path a part of `kind` takes on this one: the AVX-512 kernel has
    /// no loop for the kinds with high bit planes ([`QuantKind::Q5`], Q6) or
    /// integer scales ([`QuantKind::Q4K`], which GGUF loading makes only
    /// where AVX-512 does not run), which then run on AVX2 (every AVX-512 CPU
    /// has it).
    fn for_kind(self, kind: QuantKind) -> Self {
        match (self, kind) {
            (KernelPath::Avx512, QuantKind::Q4K | QuantKind::Q5 | QuantKind::Q6) if has_avx2() => {
                KernelPath::Avx2
            }
            (KernelPath::Avx512, QuantKind::Q4K | QuantKind::Q5 | QuantKind::Q6) => {
                KernelPath::Portable
            }
            _ => self,
        }
    }

    /// Whether this CPU runs the path.
    pub fn supported(self) -> bool {
        match self {
            KernelPath::Portable => true,
            KernelPath::Avx2 => has_avx2(),
            KernelPath::Avx512 => has_vnni(),
            KernelPath::Neon => cfg!(target_arch = "aarch64"),
            KernelPath::NeonDot => has_neon_dotprod(),
        }
    }

    /// Its name in `MISTRALRS_SERVE_CPU_PATH` (and in benchmarks' output).
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Portable => "portable",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512 => "avx512",
            KernelPath::Neon => "neon",
            KernelPath::NeonDot => "neon-dotprod",
        }
    }

    /// From its name in `MISTRALRS_SERVE_CPU_PATH`.
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim().to_ascii_lowercase();
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    fn is_arm(self) -> bool {
        matches!(self, KernelPath::Neon | KernelPath::NeonDot)
    }

    /// The fastest path this CPU runs that is `cap` or slower than it on
    /// `cap`'s architecture (Portable where none is).
    pub fn capped_at(cap: KernelPath) -> KernelPath {
        Self::ALL
            .into_iter()
            .skip_while(|p| *p != cap)
            .find(|p| p.supported() && (p.is_arm() == cap.is_arm() || *p == KernelPath::Portable))
            .unwrap_or(KernelPath::Portable)
    }
}

/// The fastest path this CPU runs, capped by `MISTRALRS_SERVE_CPU_PATH`
/// (read once; an unknown name, or one of the other architecture's paths,
/// caps nothing).
pub fn kernel_path() -> KernelPath {
    static PATH: OnceLock<KernelPath> = OnceLock::new();
    *PATH.get_or_init(|| {
        let best = KernelPath::ALL.into_iter().find(|p| p.supported());
        let cap = std::env::var("MISTRALRS_SERVE_CPU_PATH")
            .ok()
            .and_then(|v| KernelPath::from_name(&v))
            .filter(|cap| {
                *cap == KernelPath::Portable || cap.is_arm() == cfg!(target_arch = "aarch64")
            });
        match cap {
            Some(cap) => KernelPath::capped_at(cap),
            None => best.unwrap_or(KernelPath::Portable),
        }
    })
}

/// Whether this CPU runs the NEON kernel with the dot-product instructions.
pub fn has_neon_dotprod() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        super::gemm_neon::has_dotprod()
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

/// Whether the AVX2 kernel runs on this CPU.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`gemm`] on a given path (tests and benchmarks compare the paths).
pub fn gemm_path(
    path: KernelPath,
    w: &QMatrix,
    xs: &mut QuantBatch,
    rows: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    let n = check_out(w, xs, &rows, out, out_stride);
    assert!(w.cols / BLOCK <= xs.blocks);
    // SAFETY: `xs` is borrowed for the call; `out` holds every index written
    // (checked just above).
    unsafe { gemm_on(path, w, xs.raw(), n, rows, out.as_mut_ptr(), out_stride) }
}

/// [`gemm_into`] in plain Rust.
///
/// # Safety
/// As [`gemm_into`].
unsafe fn portable_into(
    w: &Part,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    out_stride: usize,
) {
    for b in 0..n {
        for (i, r) in rows.clone().enumerate() {
            // SAFETY: per the contract.
            unsafe { *out.add(b * out_stride + i) = dot_portable(w, xs.row(b, w.cols), r) };
        }
    }
}

/// Whether the AVX-512 VNNI kernel runs on this CPU.
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The same sums as the vector kernels, in plain Rust.
pub fn gemm_portable(
    w: &QMatrix,
    xs: &mut QuantBatch,
    rows: Range<usize>,
    out: &mut [f32],
    out_stride: usize,
) {
    gemm_path(KernelPath::Portable, w, xs, rows, out, out_stride)
}

/// Row `r` of `w` against the activation row `x`, in the float operations of the
/// AVX2 and NEON kernels, in their order: per block `acc = fma(Σ q x, d dx, acc)`
/// then `acc = fma(m, dx Σ x, acc)`; Q8's codes taken signed (its offset term
/// then drops), Q6's halves one fma each. The integer sums are exact on every
/// path, so the paths agree to the last bit (AVX-512's Q8, which keeps the
/// offset term, to its rounding).
///
/// # Safety
/// `x` is a live row quantized at `w.cols` columns.
unsafe fn dot_portable(w: &Part, x: RowAt, r: usize) -> f32 {
    let mut acc = 0f32;
    let sum = |codes: *const i8, cols: std::ops::Range<usize>, bias: i32, blk: usize| -> f32 {
        cols.map(|j| (w.code(r, blk * BLOCK + j) as i32 - bias) * *codes.add(j) as i32)
            .sum::<i32>() as f32
    };
    for blk in 0..w.blocks_per_row() {
        let codes = x.q.add(blk * ROW_Q_STEP);
        let dx = *x.d.add(blk * BATCH);
        match w.kind {
            QuantKind::Q6 => {
                // codes standing for q - 32, a scale per half block, no offset
                for half in 0..2 {
                    let isum = sum(codes, 16 * half..16 * half + 16, 32, blk);
                    acc = isum.mul_add(w.q6_scale(r, blk, half) * dx, acc);
                }
            }
            QuantKind::Q8 => {
                // d dx Σ u x - 128 d dx Σ x = d dx Σ (u - 128) x
                acc = sum(codes, 0..BLOCK, 128, blk).mul_add(w.block_scales(r, blk).0 * dx, acc);
            }
            QuantKind::Q4 | QuantKind::Q4K | QuantKind::Q5 => {
                let (d, m) = w.block_scales(r, blk);
                acc = sum(codes, 0..BLOCK, 0, blk).mul_add(d * dx, acc);
                acc = m.mul_add(*x.dsum.add(blk * BATCH), acc);
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::super::{Part, QuantKind, QuantRaw, BATCH, BLOCK, GROUP_ROWS};

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub(super) unsafe fn gemm(
        w: &Part,
        xs: QuantRaw,
        n: usize,
        rows: Range<usize>,
        out: *mut f32,
        stride: usize,
    ) {
        if rows.is_empty() {
            return;
        }
        for g in rows.start / GROUP_ROWS..rows.end.div_ceil(GROUP_ROWS) {
            // rows of this group inside `rows`, as lanes [lo, hi)
            let first = g * GROUP_ROWS;
            let lo = rows.start.max(first) - first;
            let hi = rows.end.min(first + GROUP_ROWS) - first;
            let mask: __mmask16 = (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16;
            // output column of lane 0 (may be "negative" for a first partial group: only masked lanes are stored)
            let col0 = (first as isize) - (rows.start as isize);
            for c in 0..n.div_ceil(BATCH) {
                let out = out.wrapping_offset((c * BATCH * stride) as isize + col0);
                // the chunk's first row at the matrix's width
                let chunk = xs.row(c * BATCH, w.cols);
                by_rows!(
                    BATCH.min(n - c * BATCH),
                    group(w, g, chunk, out, stride, mask)
                )
            }
        }
    }

    /// One group of 16 weight rows against N activation rows.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn group<const N: usize>(
        w: &Part,
        g: usize,
        xs: super::RowAt,
        out: *mut f32,
        stride: usize,
        mask: __mmask16,
    ) {
        let nb = w.blocks_per_row();
        let bytes = w.kind.block_bytes();
        let codes = w.q.as_ptr().add(g * nb * bytes);
        let scales = w.d.as_ptr().add(g * nb * GROUP_ROWS);
        let offsets = w.m.as_ptr().wrapping_add(g * nb * GROUP_ROWS);
        let low = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm512_setzero_ps(); N];
        let mut regs = [_mm512_setzero_si512(); 8];
        for blk in 0..nb {
            let p = codes.add(blk * bytes);
            match w.kind {
                QuantKind::Q4 => {
                    for k in 0..4 {
                        let v = _mm512_loadu_si512(p.add(k * 64).cast());
                        regs[k] = _mm512_and_si512(v, low);
                        regs[k + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                    }
                }
                QuantKind::Q8 => {
                    for (k, r) in regs.iter_mut().enumerate() {
                        *r = _mm512_loadu_si512(p.add(k * 64).cast());
                    }
                }
                QuantKind::Q4K | QuantKind::Q5 | QuantKind::Q6 => {
                    unreachable!("Q4K, Q5 and Q6 parts take the AVX2 kernel (KernelPath::for_kind)")
                }
            }
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(blk * GROUP_ROWS).cast()));
            // Q8 stores no offsets: theirs is -128 d
            let mw = match w.kind {
                QuantKind::Q8 => _mm512_mul_ps(dw, _mm512_set1_ps(-128.0)),
                _ => _mm512_cvtph_ps(_mm256_loadu_si256(offsets.add(blk * GROUP_ROWS).cast())),
            };
            // the chunk's rows of this block: codes side by side, then scales
            let xq = xs.q.add(blk * BATCH * BLOCK).cast::<i32>();
            let (xd, xdsum) = (xs.d.add(blk * BATCH), xs.dsum.add(blk * BATCH));
            for (j, a) in acc.iter_mut().enumerate() {
                let mut isum = _mm512_setzero_si512();
                for (k, r) in regs.iter().enumerate() {
                    let codes = xq.add(j * BLOCK / 4 + k).read_unaligned();
                    isum = _mm512_dpbusd_epi32(isum, *r, _mm512_set1_epi32(codes));
                }
                let s = _mm512_mul_ps(dw, _mm512_set1_ps(*xd.add(j)));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), s, *a);
                *a = _mm512_fmadd_ps(mw, _mm512_set1_ps(*xdsum.add(j)), *a);
            }
        }
        for (b, a) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(b * stride), mask, *a);
        }
    }
}
