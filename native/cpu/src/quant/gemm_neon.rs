//! The integer matrix product on aarch64: the grouped layout of the x86
//! kernels read a quarter group (4 rows, one f32x4 register of lanes) at a
//! time. A register of the layout holds, per row, 4 consecutive weights,
//! which is exactly what the dot-product instruction `sdot` sums: each i32
//! lane gets the 4 products of its row's 4 bytes with the 4 activation
//! bytes broadcast to every lane. Without the dot-product extension
//! (ARMv8.0 cores such as the Cortex-A53/A72), `smull` widens the 16
//! products to i16 and `sadalp` adds neighbours into i32 lanes: two
//! accumulators (rows 0-1 and 2-3), folded once per half block by `addp`.
//!
//! Codes are made signed before the products, so one loop serves every
//! kind: 4- and 5-bit codes are below 128 already; 8-bit ones, stored `s +
//! 128`, are flipped back to `s` (and since their offset is `-128 d`, the
//! block is `d dx Σ s x` with no offset term); 6-bit ones become `q - 32`.
//! The sums are per half block (16 weights), for [`QuantKind::Q6`]'s two
//! scales; the other kinds add the halves.
//!
//! `sdot` and the f16 widening are written as inline assembly: their
//! intrinsics are not stable Rust. Rows quantized per super-block take the
//! same per-block sums (every block keeps its `dx` and `dx Σ qx`).

use std::arch::aarch64::*;
use std::arch::asm;
use std::ops::Range;

use super::activations::RowAt;
use super::{Part, QuantKind, QuantRaw, BATCH, BLOCK, GROUP_ROWS, SUPER_BLOCKS};

/// Rows of a quarter group: the 4 f32 lanes of a register.
const QUARTER: usize = 4;
/// Bytes of one register of the layout (16 rows x 4 weights); a quarter's
/// share of it is 16.
const REG_BYTES: usize = 64;
/// Where a 4-bit-or-wider kind's high bit planes start within a block.
const PLANES: usize = 4 * REG_BYTES;

/// Whether this CPU has the dot-product instructions (ARMv8.2 `dotprod`).
pub(super) fn has_dotprod() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

/// How a half block's 4 registers are summed against the activation codes.
trait Sums {
    /// Per row lane, Σ codes x activation codes over registers `4 h .. 4 h + 4`.
    ///
    /// # Safety
    /// `x` points at the block's 32 activation codes; the CPU runs the variant.
    unsafe fn half(regs: &[int8x16_t; 8], h: usize, x: *const i8) -> int32x4_t;
}

/// `sdot` (ARMv8.2 dot product).
struct Dot;
/// `smull` + `sadalp` (ARMv8.0).
struct Widen;

impl Sums for Dot {
    #[inline(always)]
    unsafe fn half(regs: &[int8x16_t; 8], h: usize, x: *const i8) -> int32x4_t {
        let mut acc = vdupq_n_s32(0);
        for (k, reg) in regs.iter().enumerate().skip(4 * h).take(4) {
            acc = sdot(acc, *reg, broadcast4(x, k));
        }
        acc
    }
}

impl Sums for Widen {
    #[inline(always)]
    unsafe fn half(regs: &[int8x16_t; 8], h: usize, x: *const i8) -> int32x4_t {
        let (mut rows01, mut rows23) = (vdupq_n_s32(0), vdupq_n_s32(0));
        for (k, reg) in regs.iter().enumerate().skip(4 * h).take(4) {
            let xb = broadcast4(x, k);
            rows01 = vpadalq_s16(rows01, vmull_s8(vget_low_s8(*reg), vget_low_s8(xb)));
            rows23 = vpadalq_s16(rows23, vmull_high_s8(*reg, xb));
        }
        vpaddq_s32(rows01, rows23)
    }
}

/// `acc += ` the 4 products of each i32 lane's 4 bytes of `a` and `b`.
#[inline]
#[target_feature(enable = "neon,dotprod")]
unsafe fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: the caller runs on a CPU with the dot-product extension.
    unsafe {
        asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack)
        );
    }
    acc
}

/// Activation codes `4k .. 4k + 4` of the block at `x`, in every i32 lane.
#[inline(always)]
unsafe fn broadcast4(x: *const i8, k: usize) -> int8x16_t {
    vreinterpretq_s8_s32(vdupq_n_s32(x.cast::<i32>().add(k).read_unaligned()))
}

/// 4 f16 at `p` as f32 (`fcvtl`, in every ARMv8 core).
#[inline(always)]
unsafe fn f16x4(p: *const u16) -> float32x4_t {
    let h = vld1_u16(p);
    let out: float32x4_t;
    asm!("fcvtl {o:v}.4s, {h:v}.4h", o = out(vreg) out, h = in(vreg) h, options(pure, nomem, nostack));
    out
}

/// 4 signed bytes at `p` as f32.
#[inline(always)]
unsafe fn i8x4(p: *const i8) -> float32x4_t {
    let bytes = vcreate_s8(u64::from(p.cast::<u32>().read_unaligned()));
    vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(bytes))))
}

/// See [`super::gemm::gemm_into`]; `dot`: the CPU has the dot-product instructions.
pub(super) unsafe fn gemm(
    w: &Part,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    stride: usize,
    dot: bool,
) {
    if rows.is_empty() {
        return;
    }
    if dot {
        gemm_dot(w, xs, n, rows, out, stride)
    } else {
        gemm_of::<Widen>(w, xs, n, rows, out, stride)
    }
}

#[target_feature(enable = "neon,dotprod")]
unsafe fn gemm_dot(
    w: &Part,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    gemm_of::<Dot>(w, xs, n, rows, out, stride)
}

#[inline(always)]
unsafe fn gemm_of<S: Sums>(
    w: &Part,
    xs: QuantRaw,
    n: usize,
    rows: Range<usize>,
    out: *mut f32,
    stride: usize,
) {
    for quarter in rows.start / QUARTER..rows.end.div_ceil(QUARTER) {
        // rows of this quarter inside `rows`, as lanes [lo, hi)
        let first = quarter * QUARTER;
        let lanes = rows.start.max(first) - first..rows.end.min(first + QUARTER) - first;
        // output column of lane 0 (may be "negative" for a first partial quarter: only `lanes` are stored)
        let col0 = (first as isize) - (rows.start as isize);
        for c in 0..n.div_ceil(BATCH) {
            let out = out.wrapping_offset((c * BATCH * stride) as isize + col0);
            let chunk = xs.row(c * BATCH, w.cols);
            let at = Quarter {
                w,
                group: quarter / 4,
                lane0: quarter % 4 * QUARTER,
            };
            by_rows!(
                BATCH.min(n - c * BATCH),
                quarter_rows::<S>(&at, chunk, out, stride, lanes.clone())
            );
        }
    }
}

/// Where a quarter group lies in a part.
struct Quarter<'a> {
    w: &'a Part,
    group: usize,
    /// Its first lane within the group (0, 4, 8 or 12).
    lane0: usize,
}

/// One quarter group of 4 weight rows against N activation rows.
#[inline(always)]
unsafe fn quarter_rows<const N: usize, S: Sums>(
    at: &Quarter<'_>,
    xs: RowAt,
    out: *mut f32,
    stride: usize,
    lanes: Range<usize>,
) {
    let w = at.w;
    let nb = w.cols / BLOCK;
    let bytes = w.kind.block_bytes();
    let codes = w.q.as_ptr().add(at.group * nb * bytes + at.lane0 * QUARTER);
    let mut acc = [vdupq_n_f32(0.0); N];
    let mut regs = [vdupq_n_s8(0); 8];
    for blk in 0..nb {
        load_regs(w.kind, codes.add(blk * bytes), &mut regs);
        let (scale0, scale1, offset) = factors(at, blk);
        let xq = xs.q.add(blk * BATCH * BLOCK);
        let (xd, xdsum) = (xs.d.add(blk * BATCH), xs.dsum.add(blk * BATCH));
        for (j, a) in acc.iter_mut().enumerate() {
            let x = xq.add(j * BLOCK);
            let (h0, h1) = (S::half(&regs, 0, x), S::half(&regs, 1, x));
            let dx = *xd.add(j);
            // the float operations of the AVX2 kernel and the portable loops, in their order
            if w.kind == QuantKind::Q6 {
                *a = vfmaq_f32(*a, vcvtq_f32_s32(h0), vmulq_n_f32(scale0, dx));
                *a = vfmaq_f32(*a, vcvtq_f32_s32(h1), vmulq_n_f32(scale1, dx));
            } else {
                *a = vfmaq_f32(
                    *a,
                    vcvtq_f32_s32(vaddq_s32(h0, h1)),
                    vmulq_n_f32(scale0, dx),
                );
                *a = vfmaq_n_f32(*a, offset, *xdsum.add(j));
            }
        }
    }
    for (b, a) in acc.iter().enumerate() {
        let mut lane_values = [0f32; QUARTER];
        vst1q_f32(lane_values.as_mut_ptr(), *a);
        for lane in lanes.clone() {
            *out.add(b * stride + lane) = lane_values[lane];
        }
    }
}

/// The quarter's 8 registers of block codes at `p` (the group's block), signed.
#[inline(always)]
unsafe fn load_regs(kind: QuantKind, p: *const u8, regs: &mut [int8x16_t; 8]) {
    if kind == QuantKind::Q8 {
        let flip = vdupq_n_u8(0x80); // s + 128 back to s
        for (k, r) in regs.iter_mut().enumerate() {
            *r = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p.add(k * REG_BYTES)), flip));
        }
        return;
    }
    let low = vdupq_n_u8(0x0F);
    let mut codes = [vdupq_n_u8(0); 8];
    for k in 0..4 {
        let v = vld1q_u8(p.add(k * REG_BYTES));
        codes[k] = vandq_u8(v, low);
        codes[k + 4] = vshrq_n_u8::<4>(v);
    }
    match kind {
        QuantKind::Q5 => {
            // register k's fifth bits at bit k of one plane
            let plane = vld1q_u8(p.add(PLANES));
            let one = vdupq_n_u8(1);
            for (k, c) in codes.iter_mut().enumerate() {
                let bit = vandq_u8(vshlq_u8(plane, vdupq_n_s8(-(k as i8))), one);
                *c = vorrq_u8(*c, vshlq_n_u8::<4>(bit));
            }
        }
        QuantKind::Q6 => {
            // register k's top 2 bits at bits 2 (k % 4) of plane k / 4; codes stand for q - 32
            let planes = [vld1q_u8(p.add(PLANES)), vld1q_u8(p.add(PLANES + REG_BYTES))];
            let (three, bias) = (vdupq_n_u8(3), vdupq_n_u8(32));
            for (k, c) in codes.iter_mut().enumerate() {
                let bits = vandq_u8(
                    vshlq_u8(planes[k / 4], vdupq_n_s8(-2 * (k % 4) as i8)),
                    three,
                );
                *c = vsubq_u8(vorrq_u8(*c, vshlq_n_u8::<4>(bits)), bias);
            }
        }
        QuantKind::Q4 | QuantKind::Q4K | QuantKind::Q8 => {}
    }
    for (r, c) in regs.iter_mut().zip(codes) {
        *r = vreinterpretq_s8_u8(c);
    }
}

/// A quarter's factors of block `blk`: the scales of its two halves (the
/// same but for [`QuantKind::Q6`]) and the offset `m` (zero where the kind
/// has none to add: Q6, and Q8 whose codes were made signed).
#[inline(always)]
unsafe fn factors(at: &Quarter<'_>, blk: usize) -> (float32x4_t, float32x4_t, float32x4_t) {
    let w = at.w;
    let nb = w.cols / BLOCK;
    let lanes = |base: usize| base * GROUP_ROWS + at.lane0;
    let per_block = lanes(at.group * nb + blk);
    let per_super = lanes(at.group * (nb / SUPER_BLOCKS) + blk / SUPER_BLOCKS);
    let sub = |which: usize| i8x4(w.sub.as_ptr().add(lanes((at.group * nb + blk) * 2 + which)));
    let zero = vdupq_n_f32(0.0);
    match w.kind {
        QuantKind::Q4 | QuantKind::Q5 => {
            let d = f16x4(w.d.as_ptr().add(per_block));
            (d, d, f16x4(w.m.as_ptr().add(per_block)))
        }
        QuantKind::Q8 => {
            let d = f16x4(w.d.as_ptr().add(per_block));
            (d, d, zero)
        }
        QuantKind::Q4K => {
            let d = vmulq_f32(f16x4(w.d.as_ptr().add(per_super)), sub(0));
            (d, d, vmulq_f32(f16x4(w.m.as_ptr().add(per_super)), sub(1)))
        }
        QuantKind::Q6 => {
            let d = f16x4(w.d.as_ptr().add(per_super));
            (vmulq_f32(d, sub(0)), vmulq_f32(d, sub(1)), zero)
        }
    }
}
