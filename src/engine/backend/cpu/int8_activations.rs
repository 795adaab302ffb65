//! The activation side of `int8.rs` (its child module): rows quantized per token and per 64
//! inputs at run time, asymmetric, into the bytes, scales and offsets its GEMM reads; the scalar
//! reference and the dispatch to the vector quantizers of `int8_kernels.rs`, which agree with it
//! bit for bit. `int8.rs` says why this scheme.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::kernels;
use super::{groups, padded_k, Kernel, PackedWeight, ACT_MAX, GROUP};

/// Activations quantized per row and group of 64 inputs for [`gemm`]: `x(i, k) ≈ (u(i, k) −
/// z(i, g))·t(i, g)`, stored as `u`, `t` and `z·t`.
pub struct QuantRows {
    pub(super) m: usize,
    pub(super) kq: usize,
    pub(super) u: Vec<u8>,
    /// `[m, groups]` scales `t`.
    pub(super) scale: Vec<f32>,
    /// `[m, groups]` offsets `z·t`.
    pub(super) offset: Vec<f32>,
}

impl QuantRows {
    /// Quantize `x` (`[m, k]`) per row and group, asymmetric, to `0 ≤ u ≤ 255`.
    pub fn quantize(x: &[f32], m: usize, k: usize) -> QuantRows {
        Self::quantize_with(x, m, k, Kernel::best())
    }

    /// [`quantize`](Self::quantize) with the vector code of a chosen kernel's instruction set
    /// (tests compare them; every one gives the same bytes).
    pub fn quantize_with(x: &[f32], m: usize, k: usize, kernel: Kernel) -> QuantRows {
        Self::quantize_scaled(x, m, k, &vec![1.0; k], kernel)
    }

    /// Quantize `x` (`[m, k]`) for `w`, each input channel multiplied by the weight's smoothing.
    pub fn quantize_for(x: &[f32], m: usize, w: &PackedWeight) -> QuantRows {
        Self::quantize_scaled(x, m, w.k, &w.input_factor, Kernel::best())
    }

    /// The quantized bytes (`[m, kq]`), and per row and group the scales `t` and offsets `z·t`.
    pub fn parts(&self) -> (&[u8], &[f32], &[f32]) {
        (&self.u, &self.scale, &self.offset)
    }

    fn quantize_scaled(x: &[f32], m: usize, k: usize, factor: &[f32], kernel: Kernel) -> QuantRows {
        assert_eq!(x.len(), m * k, "activation data does not match its shape");
        assert_eq!(factor.len(), k, "one smoothing factor per input channel");
        assert!(
            Kernel::available().contains(&kernel),
            "int8 kernel {} does not run on this CPU",
            kernel.name()
        );
        let (kq, groups) = (padded_k(k), groups(k));
        let mut u = vec![0u8; m * kq];
        let mut scale = vec![0f32; m * groups];
        let mut offset = vec![0f32; m * groups];
        let rows = (16 * 1024 / kq.max(1)).clamp(1, m.max(1));
        u.par_chunks_mut(rows * kq)
            .zip(scale.par_chunks_mut(rows * groups))
            .zip(offset.par_chunks_mut(rows * groups))
            .zip(x.par_chunks(rows * k))
            .for_each(|(((u, scale), offset), x)| {
                let rows = u.chunks_exact_mut(kq).zip(x.chunks_exact(k));
                for (r, (u, x)) in rows.enumerate() {
                    let by_group = u[..k].chunks_mut(GROUP).zip(x.chunks(GROUP));
                    for (g, (u, x)) in by_group.enumerate() {
                        let (f, at) = (&factor[g * GROUP..][..x.len()], r * groups + g);
                        let group = quantize_group_with(kernel, x, f, u);
                        (scale[at], offset[at]) = group;
                    }
                }
            });
        QuantRows {
            m,
            kq,
            u,
            scale,
            offset,
        }
    }
}

/// One group with the vector code of `kernel`'s instruction set where the group is whole;
/// returns its scale and offset.
#[inline(always)]
fn quantize_group_with(kernel: Kernel, x: &[f32], factor: &[f32], u: &mut [u8]) -> (f32, f32) {
    // SAFETY (both): `quantize_scaled` checked that the CPU runs `kernel`, which implies
    // AVX512F (512-bit) or AVX2 (the others); the group is whole, as each requires.
    match (kernel, x.len() == GROUP) {
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx512Vnni, true) => unsafe { kernels::quantize::avx512(x, factor, u) },
        #[cfg(target_arch = "x86_64")]
        (Kernel::Avx2 | Kernel::AvxVnni, true) => unsafe { kernels::quantize::avx2(x, factor, u) },
        _ => quantize_group(x, factor, u),
    }
}

/// `1.5·2^23`: adding it rounds an f32 in `[0, 2^22)` to an integer, ties to even, which then
/// sits in the float's low bits.
pub(super) const ROUND: f32 = 12_582_912.0;

/// The reference: quantize one group of at most 64 values, each times its `factor`, into `u`;
/// returns its scale `t` and offset `z·t`. The vector versions (`int8_kernels.rs`) compute the
/// same operations and agree bit for bit.
///
/// Per lane `v < lo` selects (as `vminps` does; a NaN is never selected, it poisons the scale
/// instead), so the range is the smallest and largest value with 0 included, and `Σ v·0` is NaN
/// once any value is not finite.
fn quantize_group(x: &[f32], factor: &[f32], u: &mut [u8]) -> (f32, f32) {
    let mut scaled = [0f32; GROUP];
    let scaled = &mut scaled[..x.len()];
    for ((s, &v), &f) in scaled.iter_mut().zip(x).zip(factor) {
        *s = v * f;
    }
    let (mut lo, mut hi, mut poison) = (0f32, 0f32, 0f32);
    for &v in scaled.iter() {
        lo = if v < lo { v } else { lo };
        hi = if v > hi { v } else { hi };
        poison += v * 0.0;
    }
    let (inv, z, group) = group_range(lo, hi, poison == 0.0);
    for (u, &v) in u.iter_mut().zip(scaled.iter()) {
        *u = (clamp_round(v * inv + z).to_bits() & 0xff) as u8;
    }
    group
}

/// From a group's range `[lo, hi]` (0 included) and whether all its values are finite: the
/// reciprocal of the step `1 / t`, the integer zero `z`, and what [`QuantRows`] stores, `(t, z·t)`
/// (NaN for a group with an infinity or NaN, so its row's outputs are NaN as in f32).
#[inline(always)]
pub(super) fn group_range(lo: f32, hi: f32, finite: bool) -> (f32, f32, (f32, f32)) {
    let t = if hi > lo { (hi - lo) / ACT_MAX } else { 1.0 };
    let inv = 1.0 / t;
    // The zero: 0 maps to an integer, so exact zeros (padding, ReLU) stay exact.
    let z = ((-lo * inv).min(ACT_MAX) + ROUND) - ROUND;
    let group = if finite {
        (t, z * t)
    } else {
        (f32::NAN, f32::NAN)
    };
    (inv, z, group)
}

/// `r` clamped to `[0, 255]` (a NaN to 0, as `vmaxps` does) plus [`ROUND`]: the rounded value is
/// the float's low byte.
#[inline(always)]
fn clamp_round(r: f32) -> f32 {
    let r = if r > 0.0 { r } else { 0.0 };
    let r = if r < ACT_MAX { r } else { ACT_MAX };
    r + ROUND
}

/// The `avx2` kernel's form of `x`'s bytes: per row `v = u − 128` (two's complement) and then
/// `|v|` (at most 128), so the row at stride `2·kq`; the kernel multiplies `|v|` by the weights
/// carrying `v`'s sign and adds `128·Σq` back (`int8.rs`).
#[cfg(target_arch = "x86_64")]
pub(super) fn signed_rows(x: &QuantRows) -> Vec<u8> {
    let kq = x.kq;
    let mut out = vec![0u8; 2 * x.u.len()];
    let rows = (16 * 1024 / kq.max(1)).max(1);
    out.par_chunks_mut(2 * kq * rows)
        .zip(x.u.par_chunks(kq * rows))
        .for_each(|(out, u)| {
            for (out, u) in out.chunks_exact_mut(2 * kq).zip(u.chunks_exact(kq)) {
                let (v, abs) = out.split_at_mut(kq);
                for ((v, abs), &u) in v.iter_mut().zip(abs).zip(u) {
                    let signed = (u ^ 0x80) as i8;
                    (*v, *abs) = (signed as u8, signed.unsigned_abs());
                }
            }
        });
    out
}
